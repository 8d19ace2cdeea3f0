"""KLOM: per example, the KL divergence between two sets of models' margin distributions.

Georgiev et al., "Attribute-to-Delete: Machine Unlearning via Datamodel Matching",
ICLR 2025, App. E.1. For one example with margins ``a_1..a_K`` under the unlearned models
and ``b_1..b_L`` under the reference (Retrain) models:

1. ``bins`` equal-width bins span ``[min(a, b), max(a, b)]`` (the pooled range of that
   example; all margins equal: one bin holds everything and KLOM is 0);
2. additive smoothing: ``p_j = (count_a(j) + s) / (K + s * bins)``, likewise ``q_j`` from
   ``b`` (``s = smoothing``);
3. ``KLOM = sum_j p_j log(p_j / q_j)`` in nats, KL(unlearned || reference).

The noise floor (:func:`klom_with_floor`) is the same statistic between two disjoint
halves of the reference models: what KLOM reads when nothing but the training seed
differs. Numpy only.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["DEFAULT_BINS", "DEFAULT_SMOOTHING", "klom", "klom_with_floor", "check_settings"]

DEFAULT_BINS = 20
DEFAULT_SMOOTHING = 0.1


def check_settings(bins: int, smoothing: float) -> None:
    """Refuse a bin count or smoothing KLOM cannot use, naming the value."""
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 2:
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
    if not isinstance(smoothing, (int, float, np.floating)) or not np.isfinite(smoothing) \
            or smoothing <= 0:
        raise ValueError(f"smoothing must be a finite number > 0 (the additive count per "
                         f"bin; 0 makes KL infinite on an empty bin), got {smoothing!r}")


def _as_margins(x: ArrayLike, name: str) -> NDArray[np.float64]:
    m = np.asarray(x, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"{name} must have shape (K, n): K models' margins on n examples, "
                         f"got shape {m.shape}")
    if m.shape[0] < 1 or m.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one model and one example, "
                         f"got shape {m.shape}")
    if not np.isfinite(m).all():
        bad = np.argwhere(~np.isfinite(m))[0].tolist()
        raise ValueError(f"{name} must be finite, got {m[tuple(bad)]} at index {bad}")
    return m


def _binned(m: NDArray[np.float64], lo, width, bins: int) -> NDArray[np.float64]:
    """(bins, n) counts of each example's K margins."""
    idx = np.floor((m - lo) / width).astype(np.int64)
    idx = np.clip(idx, 0, bins - 1)
    counts = np.zeros((bins, m.shape[1]))
    np.add.at(counts, (idx, np.broadcast_to(np.arange(m.shape[1]), m.shape)), 1.0)
    return counts


def klom(method_margins: ArrayLike, reference_margins: ArrayLike, *,
         bins: int = DEFAULT_BINS, smoothing: float = DEFAULT_SMOOTHING) -> NDArray[np.float64]:
    """KLOM of every example: KL(method || reference) of its binned margins, in nats.

    Parameters
    ----------
    method_margins : array_like
        ``(K, n)``: margins (:func:`fedunlearn.metrics.forgetting.margins`) of K unlearned
        models on n examples.
    reference_margins : array_like
        ``(L, n)``: margins of L reference (Retrain) models on the same n examples.
    bins : int, default 20
        Equal-width bins over each example's pooled range of the K + L margins.
    smoothing : float, default 0.1
        Count added to every bin of both histograms before normalising.

    Returns
    -------
    np.ndarray
        float64, shape ``(n,)``: 0 when the two histograms agree, larger the more the
        unlearned models' margins differ from the reference's on that example.
    """
    check_settings(bins, smoothing)
    a = _as_margins(method_margins, "method_margins")
    b = _as_margins(reference_margins, "reference_margins")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"method_margins has {a.shape[1]} examples, reference_margins "
                         f"{b.shape[1]}: both must hold the same examples (shapes {a.shape} "
                         f"and {b.shape})")
    lo = np.minimum(a.min(axis=0), b.min(axis=0))
    hi = np.maximum(a.max(axis=0), b.max(axis=0))
    width = np.where(hi > lo, (hi - lo) / bins, 1.0)
    p = _binned(a, lo, width, bins) + smoothing
    q = _binned(b, lo, width, bins) + smoothing
    p /= p.sum(axis=0)
    q /= q.sum(axis=0)
    return (p * np.log(p / q)).sum(axis=0)


def klom_with_floor(method_margins: ArrayLike, reference_margins: ArrayLike, *,
                    bins: int, smoothing: float, splits: int,
                    rng: np.random.Generator) -> tuple[NDArray, NDArray, int]:
    """KLOM of the method and of the noise floor, per split and example, matched in size.

    A binned KL estimate grows as the number of models per side shrinks, so the method is
    scored exactly as the floor is: in each of ``splits`` random splits the reference
    models give two disjoint halves A and B of ``h = min(K, L // 2)`` models; the floor is
    KLOM(B || A) and the method's value KLOM(h of its models || A) (all K when K == h,
    else a random h). Within one split both are KLOMs of two independent samples of h
    models, so when the method's models are Retrains of other seeds the two have the same
    distribution. The values are kept per split, not averaged: an average over splits
    would smooth the floor (its halves are re-drawn from one pool) more than the method
    (its models stay the same K), and make a Retrain look above its own floor.

    Returns ``(method, floor, h)``, both ``(splits, n)``.
    """
    a = _as_margins(method_margins, "method margins")
    b = _as_margins(reference_margins, "reference margins")
    h = min(a.shape[0], b.shape[0] // 2)
    method = np.empty((splits, a.shape[1]))
    floor = np.empty((splits, a.shape[1]))
    for r in range(splits):
        perm = rng.permutation(b.shape[0])
        half_a, half_b = b[perm[:h]], b[perm[h:2 * h]]
        chosen = a if a.shape[0] == h else a[np.sort(rng.choice(a.shape[0], h, replace=False))]
        method[r] = klom(chosen, half_a, bins=bins, smoothing=smoothing)
        floor[r] = klom(half_b, half_a, bins=bins, smoothing=smoothing)
    return method, floor, h
