"""``audit_forgetting``: KLOM and the per-example attack of K unlearned models against K
reference models, with the Retrain-vs-Retrain floor beside every number.

The function API of the plugin path: a user with K unlearned and L retrained models (any
framework; :func:`fedunlearn.model_outputs` reads torch modules) hands their outputs on
the same examples and gets a :class:`ForgettingAudit`. Definitions:
``docs/measuring-forgetting.md``.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .attack import ATTACK_TAILS, attack_with_floor_roc
from .klom import DEFAULT_BINS, DEFAULT_SMOOTHING, check_settings, klom_with_floor
from .scores import as_labels, as_logits, logit_confidence, margins

__all__ = ["MIN_REFERENCE_MODELS", "ForgettingAudit", "PointSetAudit", "audit_forgetting"]

MIN_REFERENCE_MODELS = 4
"""Fewest reference models: the floor needs two disjoint halves of 2, the attack 2 to fit
its Gaussians plus 1 held-out negative and 1 held-out stand-in for the method."""
ABOVE_TOLERANCE = 1e-9
"""Relative margin by which a point's KLOM must exceed the floor's p95 to count as above
it (values equal up to floating-point rounding are not above)."""
PERCENTILES = (50, 95, 99)


@dataclass(frozen=True)
class PointSetAudit:
    """One point set's numbers; each method number has its floor beside it.

    ``klom_values`` and ``floor_values`` are ``(splits, n_points)``: the KLOM of every point
    in every split, which the percentiles and the share above the floor summarise
    (``klom_values.mean(axis=0)`` ranks the points). ``roc`` holds the attack's ROC curves
    behind ``attack`` and ``attack_floor``: ``{"fpr", "tpr", "floor_tpr"}``, the TPR at
    each FPR of a log-spaced grid from 1e-3 to 1, averaged over the splits.
    """

    name: str
    ids: NDArray[np.int64]
    klom: dict[str, float]
    klom_floor: dict[str, float]
    share_above_floor: float
    floor_share_above_floor: float
    attack: dict[str, float]
    attack_floor: dict[str, float]
    klom_values: NDArray[np.float64] = field(repr=False)
    floor_values: NDArray[np.float64] = field(repr=False)
    roc: dict[str, NDArray[np.float64]] | None = field(default=None, repr=False)

    @property
    def n_points(self) -> int:
        return int(self.ids.size)

    def to_dict(self, per_point: bool = False) -> dict:
        out = {"n_points": self.n_points, "klom": dict(self.klom),
               "klom_floor": dict(self.klom_floor),
               "share_above_floor": self.share_above_floor,
               "floor_share_above_floor": self.floor_share_above_floor,
               "attack": dict(self.attack), "attack_floor": dict(self.attack_floor)}
        if per_point:
            out["ids"] = self.ids.tolist()
            out["klom_values"] = self.klom_values.tolist()
            out["floor_values"] = self.floor_values.tolist()
            if self.roc is not None:
                out["roc"] = {key: np.asarray(v).tolist() for key, v in self.roc.items()}
        return out


@dataclass(frozen=True)
class ForgettingAudit:
    """What :func:`audit_forgetting` measured: every number is against ``reference``."""

    method: str
    reference: str
    k_method: int
    k_reference: int
    attack_score: str
    settings: dict
    point_sets: dict[str, PointSetAudit]

    def __getitem__(self, name: str) -> PointSetAudit:
        if name not in self.point_sets:
            raise KeyError(f"no point set {name!r} in this audit; it has "
                           f"{sorted(self.point_sets)}")
        return self.point_sets[name]

    def to_dict(self, per_point: bool = False) -> dict:
        """Strict-JSON-ready dict (``per_point=True`` adds each set's ids and the KLOM of
        every point in every split, of the method and of the floor)."""
        return {"method": self.method, "reference": self.reference,
                "k_method": self.k_method, "k_reference": self.k_reference,
                "attack_score": self.attack_score, "settings": dict(self.settings),
                "point_sets": {name: audit.to_dict(per_point)
                               for name, audit in self.point_sets.items()}}

    def table(self) -> str:
        """A plain-text table: per point set, the method's row and the floor's."""
        head = (f"{self.method} (K={self.k_method}) against {self.reference} "
                f"(K={self.k_reference}); floor: {self.reference} vs {self.reference}")
        cols = (f"{'set':<10}{'models':<14}{'n':>5}{'KLOM p50':>10}{'p95':>7}{'p99':>7}"
                f"{'>floor95':>10}{'AUC':>7}{'TPR@1%':>8}{'TPR@5%':>8}")
        lines = [head, cols, "-" * len(cols)]
        for name, a in self.point_sets.items():
            for row, k, share, att in (
                    (self.method[:13], a.klom, a.share_above_floor, a.attack),
                    ("floor", a.klom_floor, a.floor_share_above_floor, a.attack_floor)):
                lines.append(f"{name[:9]:<10}{row:<14}{a.n_points:>5}{k['p50']:>10.2f}"
                             f"{k['p95']:>7.2f}{k['p99']:>7.2f}{share:>10.2f}"
                             f"{att['auc']:>7.2f}{att['tpr_at_1pct_fpr']:>8.2f}"
                             f"{att['tpr_at_5pct_fpr']:>8.2f}")
        return "\n".join(lines)


def _scores(outputs: ArrayLike, labels, name: str) -> tuple[NDArray, NDArray, str]:
    """(margins, attack scores, kind) of (K, n, C) logits or (K, n) margins."""
    raw = np.asarray(outputs)
    if raw.ndim == 3:
        z = as_logits(raw, name)
        if labels is None:
            raise ValueError(f"{name} are logits {raw.shape}: pass labels (n integer classes)")
        y = as_labels(labels, z.shape[1], z.shape[2])
        return margins(z, y), logit_confidence(z, y), "logits"
    if raw.ndim == 2:
        m = np.asarray(raw, dtype=np.float64)
        if not np.isfinite(m).all():
            bad = np.argwhere(~np.isfinite(m))[0].tolist()
            raise ValueError(f"{name} must be finite, got {m[tuple(bad)]} at index {bad}")
        return m, m, "margins"
    raise ValueError(f"{name} must be (K, n, C) logits or (K, n) margins of K models on n "
                     f"examples, got shape {raw.shape}")


def _check_models(method: NDArray, reference: NDArray, kinds: tuple[str, str],
                  labels) -> None:
    if kinds[0] != kinds[1]:
        raise ValueError(f"method_outputs are {kinds[0]} and reference_outputs {kinds[1]}: "
                         "give both as (K, n, C) logits or both as (K, n) margins")
    if method.shape[1] != reference.shape[1]:
        raise ValueError(f"method_outputs cover {method.shape[1]} examples and "
                         f"reference_outputs {reference.shape[1]}: both must be the same "
                         "examples in the same order")
    if kinds[0] == "margins" and labels is not None and np.shape(labels) != method.shape[1:]:
        raise ValueError(f"labels have shape {np.shape(labels)}, the outputs cover "
                         f"{method.shape[1]} examples (margins need no labels)")
    if method.shape[0] < 2:
        raise ValueError(f"method_outputs hold {method.shape[0]} model(s): the audit "
                         "compares distributions over models, give at least 2")
    if reference.shape[0] < MIN_REFERENCE_MODELS:
        raise ValueError(f"reference_outputs hold {reference.shape[0]} model(s): the floor "
                         f"needs at least {MIN_REFERENCE_MODELS} (two disjoint halves of "
                         "2; the attack 2 to fit, 1 held out, 1 as the floor's stand-in)")


def _point_sets(point_sets: Mapping | None, n: int) -> dict[str, NDArray[np.int64]]:
    if point_sets is None:
        return {"all": np.arange(n, dtype=np.int64)}
    if not isinstance(point_sets, Mapping) or not point_sets:
        raise ValueError("point_sets must be a non-empty dict {name: example ids}, got "
                         f"{point_sets!r}")
    out = {}
    for name, ids in point_sets.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"point set names must be non-empty strings, got {name!r}")
        raw = np.asarray(ids)
        if raw.ndim != 1 or raw.size == 0 or not np.issubdtype(raw.dtype, np.integer):
            raise ValueError(f"point set {name!r} must be a non-empty 1-D list of integer "
                             f"example ids, got {raw.dtype} array of shape {raw.shape}")
        bad = raw[(raw < 0) | (raw >= n)]
        if bad.size:
            raise ValueError(f"point set {name!r} has id {int(bad[0])} outside 0..{n - 1} "
                             f"(the outputs cover {n} examples)")
        if np.unique(raw).size != raw.size:
            raise ValueError(f"point set {name!r} repeats ids: each example counts once")
        out[name] = raw.astype(np.int64)
    return out


def _percentiles(values: NDArray) -> dict[str, float]:
    return {f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES))}


def _audit_set(name, ids, margin_pair, score_pair, opts) -> PointSetAudit:
    seq = np.random.SeedSequence([opts["seed"], zlib.crc32(name.encode())])
    klom_rng, attack_rng = (np.random.default_rng(s) for s in seq.spawn(2))
    method_kl, floor_kl, _ = klom_with_floor(
        margin_pair[0][:, ids], margin_pair[1][:, ids], bins=opts["bins"],
        smoothing=opts["smoothing"], splits=opts["splits"], rng=klom_rng)
    attack, floor_attack, _, roc = attack_with_floor_roc(
        score_pair[0][:, ids], score_pair[1][:, ids], splits=opts["splits"],
        tail=opts["attack_tail"], rng=attack_rng)
    klom, floor = _percentiles(method_kl), _percentiles(floor_kl)
    # KLOM takes few distinct values (binned counts), so many equal the floor's p95 up
    # to rounding; "above" means above it by more than that rounding.
    threshold = floor["p95"] + ABOVE_TOLERANCE * max(1.0, abs(floor["p95"]))
    return PointSetAudit(
        name=name, ids=ids, klom=klom, klom_floor=floor,
        share_above_floor=float(np.mean(method_kl > threshold)),
        floor_share_above_floor=float(np.mean(floor_kl > threshold)),
        attack=attack, attack_floor=floor_attack,
        klom_values=method_kl, floor_values=floor_kl, roc=roc)


def audit_forgetting(method_outputs: ArrayLike, reference_outputs: ArrayLike,
                     labels: ArrayLike | None = None, *, reference: str,
                     point_sets: Mapping[str, ArrayLike] | None = None,
                     method: str = "method", bins: int = DEFAULT_BINS,
                     smoothing: float = DEFAULT_SMOOTHING, splits: int = 20,
                     attack_tail: str = "two-sided", seed: int = 0) -> ForgettingAudit:
    """Audit K unlearned models against L reference (Retrain) models, example by example.

    Parameters
    ----------
    method_outputs, reference_outputs : array_like
        ``(K, n, C)`` logits (:func:`fedunlearn.model_outputs`) or ``(K, n)`` margins of
        the unlearned and the reference models on the same n examples; ``L >= 4``.
    labels : array_like, optional
        ``n`` integer classes; required with logits.
    reference : str
        What the reference models are (e.g. ``"retrain-30"``); every number is against it.
    point_sets : dict, optional
        ``{"forget": ids, "retain": ids, "test": ids}``: example ids (positions along n)
        audited separately; default one set ``"all"``.
    method : str, default "method"
        The unlearned models' name in the audit.
    bins, smoothing : KLOM's equal-width bins per example and additive count per bin.
    splits : int, default 20
        Random splits of the reference models for the floor and the attack.
    attack_tail : {"two-sided", "greater"}
        Whether the attack flags any departure from Retrain's confidence or only a higher one.
    seed : int, default 0
        Seeds the splits; the same inputs and seed give the same audit.
    """
    check_settings(bins, smoothing)
    if isinstance(splits, bool) or not isinstance(splits, (int, np.integer)) or splits < 1:
        raise ValueError(f"splits must be an integer >= 1, got {splits!r}")
    for label, value in (("reference", reference), ("method", method)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{label} must name the models (a non-empty string), got {value!r}")
    if attack_tail not in ATTACK_TAILS:
        raise ValueError(f"attack_tail must be one of {list(ATTACK_TAILS)}, got {attack_tail!r}")
    m_margin, m_score, m_kind = _scores(method_outputs, labels, "method_outputs")
    r_margin, r_score, r_kind = _scores(reference_outputs, labels, "reference_outputs")
    _check_models(m_margin, r_margin, (m_kind, r_kind), labels)
    sets = _point_sets(point_sets, m_margin.shape[1])
    opts = {"bins": int(bins), "smoothing": float(smoothing), "splits": int(splits),
            "attack_tail": attack_tail, "seed": int(seed)}
    audits = {name: _audit_set(name, ids, (m_margin, r_margin), (m_score, r_score), opts)
              for name, ids in sets.items()}
    k, l_ref = m_margin.shape[0], r_margin.shape[0]
    settings = {**opts, "klom_models_per_side": min(k, l_ref // 2),
                "attack_fit_models": l_ref - 2 * max(1, l_ref // 4),
                "attack_heldout_models": max(1, l_ref // 4)}
    return ForgettingAudit(method=method, reference=reference, k_method=k, k_reference=l_ref,
                           attack_score="logit_confidence" if m_kind == "logits" else "margin",
                           settings=settings, point_sets=audits)
