"""Membership inference attack (MIA) used to score unlearning.

Definition (see :func:`mia_score`): a logistic-regression attack is trained on
per-sample features (loss, true-label confidence, entropy) of *retained*
training samples (members, label 1) versus test samples (non-members, label
0), class-balanced. It is then applied to the forget samples and to an equal
number of held-out test samples, and the balanced attack accuracy
``100 * (TPR_forget + TNR_heldout) / 2`` is reported: about 50 when the forget
set is indistinguishable from unseen data (Retrain), towards 100 when the
model still treats it like training data.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["MIA_MIN_SAMPLES", "membership_features", "mia_result", "mia_score",
           "split_nonmembers"]

MIA_MIN_SAMPLES = 50
"""Below this many forget (or held-out) samples the score is too noisy to mean much:
with 50 of each, the 95% interval of a balanced accuracy near 50 is about +-10 points."""


def membership_features(logits: ArrayLike, labels: ArrayLike) -> NDArray[np.float64]:
    """Per-sample membership features from logits.

    Computed in float64 from a numerically stable log-softmax.

    Parameters
    ----------
    logits : array_like
        Scores of shape ``[N, num_classes]``.
    labels : array_like
        Integer labels of shape ``[N]``.

    Returns
    -------
    np.ndarray
        ``float64`` array of shape ``[N, 3]`` with columns

        0. cross-entropy loss ``-log p[y]``,
        1. confidence ``p[y]`` (softmax probability of the true label),
        2. prediction entropy ``-sum_c p[c] log p[c]``.
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if y.size == 0:
        return np.zeros((0, 3), dtype=np.float64)
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] != y.size:
        raise ValueError(f"logits shape {z.shape} does not match {y.size} labels")
    shifted = z - z.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    log_p_true = log_p[np.arange(y.size), y]
    loss = -log_p_true
    confidence = np.exp(log_p_true)
    # p * log p -> 0 as p -> 0; exp underflow gives p == 0 and finite log_p, so no NaN.
    entropy = -(p * log_p).sum(axis=1)
    return np.stack([loss, confidence, entropy], axis=1)


def split_nonmembers(n: int, seed: int = 0) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Deterministically split ``range(n)`` (test-set positions) in two halves.

    Parameters
    ----------
    n : int
        Size of the test set.
    seed : int, default 0
        Seed of the permutation.

    Returns
    -------
    attack_train : np.ndarray
        Sorted ``int64`` positions (``n // 2`` of them) used as non-members to
        fit the attack.
    heldout : np.ndarray
        Sorted ``int64`` positions (the remaining ``n - n // 2``) used as
        held-out non-members when scoring the attack.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    perm = np.random.default_rng(seed).permutation(n).astype(np.int64)
    half = n // 2
    return np.sort(perm[:half]), np.sort(perm[half:])


def _as_features(x: ArrayLike) -> NDArray[np.float64]:
    """2-D float64 feature matrix with non-finite values replaced."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a.reshape(-1, 1)
    if a.ndim != 2:
        raise ValueError(f"features must be 1-D or 2-D, got shape {a.shape}")
    return np.nan_to_num(a, nan=0.0, posinf=1e6, neginf=-1e6)


def _subsample(rng: np.random.Generator, x: NDArray[np.float64], n: int) -> NDArray[np.float64]:
    """``n`` rows of ``x`` without replacement (``x`` itself if it has ``n`` rows)."""
    if len(x) == n:
        return x
    return x[np.sort(rng.choice(len(x), size=n, replace=False))]


def _attack_model(seed: int):
    # scikit-learn is imported here: clients only need membership_features.
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        StandardScaler(),
        LogisticRegression(C=1.0, max_iter=1000, random_state=seed),
    )


def mia_score(
    member: ArrayLike,
    nonmember: ArrayLike,
    target: ArrayLike,
    heldout: ArrayLike,
    seed: int = 0,
) -> float:
    """Balanced membership-inference attack accuracy (percent).

    1. Fit ``StandardScaler -> LogisticRegression`` on ``member`` features
       (label 1) vs ``nonmember`` features (label 0); the larger of the two is
       subsampled (without replacement, with ``seed``) to the size of the
       smaller one.
    2. Subsample the larger of ``target`` / ``heldout`` so both have
       ``n = min(len(target), len(heldout))`` rows and predict membership.
    3. Return ``100 * (TPR_target + TNR_heldout) / 2`` where ``TPR_target`` is
       the fraction of ``target`` rows predicted member and ``TNR_heldout`` the
       fraction of ``heldout`` rows predicted non-member.

    Parameters
    ----------
    member : array_like
        Features ``[N_m, F]`` of retained training samples (e.g. from
        :func:`membership_features`).
    nonmember : array_like
        Features ``[N_n, F]`` of test samples used to fit the attack.
    target : array_like
        Features ``[N_t, F]`` of the forget samples.
    heldout : array_like
        Features ``[N_h, F]`` of test samples *not* used to fit the attack
        (see :func:`split_nonmembers`).
    seed : int, default 0
        Seed for subsampling and the classifier; the result is deterministic.

    Returns
    -------
    float
        Attack accuracy in ``[0, 100]``: ~50 when ``target`` looks like unseen
        data, towards 100 when it looks like training members. NaN when
        ``target`` or ``heldout`` is empty, or when fewer than 2 samples of
        either class are available to fit the attack.
    """
    return _attack(member, nonmember, target, heldout, seed)[0]


def _attack(member, nonmember, target, heldout, seed) -> tuple[float, int, float, float]:
    """(score, samples scored per side, TPR on target, TNR on held-out)."""
    mem, non, tgt, held = (_as_features(a) for a in (member, nonmember, target, heldout))
    if len(tgt) == 0 or len(held) == 0:
        return float("nan"), 0, math.nan, math.nan
    n_fit = min(len(mem), len(non))
    if n_fit < 2:
        return float("nan"), 0, math.nan, math.nan
    widths = {a.shape[1] for a in (mem, non, tgt, held)}
    if len(widths) != 1:
        raise ValueError(f"all feature arrays must have the same width, got {sorted(widths)}")

    rng = np.random.default_rng(seed)
    mem = _subsample(rng, mem, n_fit)
    non = _subsample(rng, non, n_fit)
    x_fit = np.concatenate([mem, non], axis=0)
    y_fit = np.concatenate([np.ones(n_fit, dtype=np.int64), np.zeros(n_fit, dtype=np.int64)])

    clf = _attack_model(seed)
    with warnings.catch_warnings():
        from sklearn.exceptions import ConvergenceWarning

        warnings.simplefilter("ignore", category=ConvergenceWarning)
        clf.fit(x_fit, y_fit)

    n_eval = min(len(tgt), len(held))
    tgt = _subsample(rng, tgt, n_eval)
    held = _subsample(rng, held, n_eval)
    tpr = float(np.mean(clf.predict(tgt) == 1))
    tnr = float(np.mean(clf.predict(held) == 0))
    return 100.0 * (tpr + tnr) / 2.0, n_eval, tpr, tnr


def mia_result(member: ArrayLike, nonmember: ArrayLike, target: ArrayLike,
               heldout: ArrayLike, seed: int = 0) -> dict:
    """:func:`mia_score` with what it rests on: ``{"score", "n_forget", "n_heldout",
    "ci95", "too_small"}``.

    ``n_forget`` / ``n_heldout`` are the samples actually scored (the larger side is
    subsampled to the smaller); ``ci95`` is a conservative 95% interval of the balanced
    accuracy: the mean of the Wilson score intervals of TPR and TNR (it stays wide when a
    rate is 0 or 1 on few samples, where a normal approximation collapses to a point);
    ``too_small`` is true below :data:`MIA_MIN_SAMPLES`.
    """
    score, n, tpr, tnr = _attack(member, nonmember, target, heldout, seed)
    if math.isnan(score) or n == 0:
        return {"score": score, "n_forget": 0, "n_heldout": 0, "ci95": [math.nan, math.nan],
                "too_small": True}
    (tpr_lo, tpr_hi), (tnr_lo, tnr_hi) = _wilson(tpr, n), _wilson(tnr, n)
    return {"score": score, "n_forget": int(n), "n_heldout": int(n),
            "ci95": [100.0 * (tpr_lo + tnr_lo) / 2.0, 100.0 * (tpr_hi + tnr_hi) / 2.0],
            "too_small": n < MIA_MIN_SAMPLES}


def _wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` observed on ``n`` samples."""
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
