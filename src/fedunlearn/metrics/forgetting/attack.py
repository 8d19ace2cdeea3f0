"""A per-example membership attack referenced to Retrain (offline, U-LiRA style).

Hayes et al., "Inexact Unlearning Needs More Careful Evaluations to Avoid a False Sense of
Privacy", SaTML 2025 (U-LiRA); Carlini et al., "Membership Inference Attacks From First
Principles", S&P 2022 (LiRA, its offline variant). The attacker holds reference models
that never saw the data (Retrain) and asks, for one model and one example, whether the
model is an unlearned one or another Retrain:

1. the reference models are split three ways: F (fits the attack), H (held-out Retrain
   models, the negatives) and P (held-out Retrain models that stand in for the method:
   the floor); ``h = max(1, L // 4)`` models each in H and P, the rest in F;
2. per example i, a Gaussian ``N(mu_i, sd_i^2)`` is fitted to the F models' scores
   (``phi = log(p/(1-p))`` of the true class, or margins when only margins are given);
3. a (model, example) pair scores ``|s - mu_i| / sd_i`` (``tail="two-sided"``: a model
   too confident or not confident enough stands out) or ``(s - mu_i) / sd_i``
   (``tail="greater"``: only over-confidence, LiRA's one-sided offline test); both are
   monotone in the Gaussian's likelihood ratio against a flat alternative;
4. the AUC and the TPR at 1% and 5% FPR of separating the method's pairs (every method
   model x every example) from H's pairs; the floor is the same with P's pairs in place
   of the method's. Averaged over ``splits`` random three-way splits.

scikit-learn's ``roc_curve`` and ``auc``; numpy otherwise.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ["ATTACK_TAILS", "FPR_LEVELS", "ROC_FPR_GRID", "attack_with_floor",
           "attack_with_floor_roc", "roc_points", "roc_summary", "tpr_at"]

ATTACK_TAILS = ("two-sided", "greater")
FPR_LEVELS = (0.01, 0.05)
#: The FPRs at which :func:`attack_with_floor_roc` reports the ROC curve: 1e-3 .. 1,
#: log-spaced (ROC curves of membership attacks are read on a log-FPR axis).
ROC_FPR_GRID = np.logspace(-3, 0, 61)
_MIN_SD = 1e-6


def roc_points(positive: NDArray, negative: NDArray) -> tuple[NDArray, NDArray]:
    """``(fpr, tpr)`` of scikit-learn's ``roc_curve`` for scores where larger means
    "positive" (both non-decreasing, starting at FPR 0)."""
    from sklearn.metrics import roc_curve

    y = np.concatenate([np.ones(positive.size), np.zeros(negative.size)])
    s = np.concatenate([positive.ravel(), negative.ravel()])
    fpr, tpr, _ = roc_curve(y, s)
    return fpr, tpr


def tpr_at(fpr: NDArray, tpr: NDArray, levels) -> NDArray:
    """The highest TPR of a ROC curve reached without exceeding each FPR in ``levels``."""
    idx = np.searchsorted(fpr, np.asarray(levels, dtype=np.float64) + 1e-12, side="right")
    return tpr[np.maximum(idx - 1, 0)]


def roc_summary(positive: NDArray, negative: NDArray) -> dict[str, float]:
    """``{"auc", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr"}`` of scores where larger means
    "positive"; the TPR at a level is the highest reached without exceeding that FPR."""
    return _summary(*roc_points(positive, negative))


def _summary(fpr: NDArray, tpr: NDArray) -> dict[str, float]:
    from sklearn.metrics import auc

    out = {"auc": float(auc(fpr, tpr))}  # as roc_auc_score computes it, from one curve
    for level in FPR_LEVELS:
        out[f"tpr_at_{round(level * 100)}pct_fpr"] = float(tpr[fpr <= level + 1e-12].max())
    return out


def _scores(fit: NDArray, models: NDArray, tail: str) -> NDArray:
    mu = fit.mean(axis=0)
    sd = np.maximum(fit.std(axis=0, ddof=1), _MIN_SD)
    z = (models - mu) / sd
    return np.abs(z) if tail == "two-sided" else z


def attack_with_floor(method_scores: NDArray, reference_scores: NDArray, *, splits: int,
                      tail: str, rng: np.random.Generator) -> tuple[dict, dict, dict]:
    """The attack on the method and on held-out Retrain models (the floor), each the mean
    over ``splits`` random splits of the reference models.

    ``method_scores`` ``(K, n)``, ``reference_scores`` ``(L, n)`` with ``L >= 4``.
    Returns ``(method, floor, sizes)``; ``sizes`` gives the models per role.
    """
    return attack_with_floor_roc(method_scores, reference_scores, splits=splits, tail=tail,
                                 rng=rng)[:3]


def attack_with_floor_roc(method_scores: NDArray, reference_scores: NDArray, *, splits: int,
                          tail: str, rng: np.random.Generator
                          ) -> tuple[dict, dict, dict, dict[str, NDArray]]:
    """:func:`attack_with_floor` (the same numbers from the same ``rng``) and the ROC
    curves behind them: ``{"fpr": ROC_FPR_GRID, "tpr", "floor_tpr"}``, the TPR reached at
    each FPR of the grid (:func:`tpr_at`), averaged over the splits."""
    if tail not in ATTACK_TAILS:
        raise ValueError(f"attack_tail must be one of {list(ATTACK_TAILS)}, got {tail!r}")
    n_ref = reference_scores.shape[0]
    h = max(1, n_ref // 4)
    method_runs, floor_runs, curves = [], [], ([], [])
    for _ in range(splits):
        perm = rng.permutation(n_ref)
        held, proxy, fit = (reference_scores[perm[:h]], reference_scores[perm[h:2 * h]],
                            reference_scores[perm[2 * h:]])
        negative = _scores(fit, held, tail)
        for positive, runs, curve in ((_scores(fit, method_scores, tail), method_runs,
                                       curves[0]),
                                      (_scores(fit, proxy, tail), floor_runs, curves[1])):
            fpr, tpr = roc_points(positive, negative)
            runs.append(_summary(fpr, tpr))
            curve.append(tpr_at(fpr, tpr, ROC_FPR_GRID))
    sizes = {"fit": n_ref - 2 * h, "negatives": h, "floor_positives": h,
             "positives": int(method_scores.shape[0])}
    roc = {"fpr": ROC_FPR_GRID.copy(), "tpr": np.mean(curves[0], axis=0),
           "floor_tpr": np.mean(curves[1], axis=0)}
    return _mean(method_runs), _mean(floor_runs), sizes, roc


def _mean(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}
