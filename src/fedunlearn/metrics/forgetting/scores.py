"""Per-example scores of K models: the margin and the logit-scaled confidence.

Both read an ``(n, C)`` or ``(K, n, C)`` array of logits and ``n`` integer labels and
return one number per model and example, in float64:

- :func:`margins`: the correct-class logit minus the largest other logit (positive when
  the example is classified correctly). KLOM bins these.
- :func:`logit_confidence`: ``phi = log(p_y / (1 - p_y))`` of the softmax probability
  ``p_y`` of the true class, computed stably as ``z_y - logsumexp_{c != y} z_c`` (LiRA's
  statistic, Carlini et al., S&P 2022). The per-example attack fits Gaussians to these.

Numpy only.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["as_logits", "as_labels", "logit_confidence", "margins"]


def as_logits(logits: ArrayLike, name: str = "logits") -> NDArray[np.float64]:
    """``logits`` as a finite float64 array of shape ``(n, C)`` or ``(K, n, C)``, C >= 2."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim not in (2, 3):
        raise ValueError(f"{name} must have shape (n, C) or (K, n, C), got shape {z.shape}")
    if z.shape[-1] < 2:
        raise ValueError(f"{name} must have at least 2 classes (last axis), got shape {z.shape}")
    if not np.isfinite(z).all():
        bad = np.argwhere(~np.isfinite(z))[0].tolist()
        raise ValueError(f"{name} must be finite, got {z[tuple(bad)]} at index {bad}")
    return z


def as_labels(labels: ArrayLike, n: int, num_classes: int) -> NDArray[np.int64]:
    """``labels`` as ``n`` int64 values in ``0 .. num_classes - 1``."""
    raw = np.asarray(labels)
    if raw.ndim != 1 or raw.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},) to match the outputs' {n} examples, "
                         f"got shape {raw.shape}")
    if n and not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(f"labels must be integers (class indices), got dtype {raw.dtype}")
    y = raw.astype(np.int64)
    out = (y < 0) | (y >= num_classes)
    if out.any():
        i = int(np.flatnonzero(out)[0])
        raise ValueError(f"labels must lie in 0..{num_classes - 1} (the outputs have "
                         f"{num_classes} classes), got {int(y[i])} at position {i}")
    return y


def _split_true(logits: ArrayLike, labels: ArrayLike):
    z = as_logits(logits)
    y = as_labels(labels, z.shape[-2], z.shape[-1])
    true = np.take_along_axis(z, np.broadcast_to(y[:, None], z.shape[:-1] + (1,)), axis=-1)
    others = z.copy()
    np.put_along_axis(others, np.broadcast_to(y[:, None], z.shape[:-1] + (1,)), -np.inf,
                      axis=-1)
    return true[..., 0], others


def margins(logits: ArrayLike, labels: ArrayLike) -> NDArray[np.float64]:
    """The margin of every example: its correct-class logit minus its largest other logit.

    Parameters
    ----------
    logits : array_like
        ``(n, C)`` logits of one model, or ``(K, n, C)`` of K models on the same examples.
    labels : array_like
        ``n`` integer class indices in ``0 .. C - 1``.

    Returns
    -------
    np.ndarray
        float64, shape ``(n,)`` or ``(K, n)``: positive where the example is classified
        correctly, negative where it is not.
    """
    true, others = _split_true(logits, labels)
    return true - others.max(axis=-1)


def logit_confidence(logits: ArrayLike, labels: ArrayLike) -> NDArray[np.float64]:
    """``phi = log(p_y / (1 - p_y))`` of every example, ``p_y`` the softmax probability of
    its true class, as ``z_y - logsumexp_{c != y} z_c`` (exact, no overflow).

    Same shapes as :func:`margins`.
    """
    true, others = _split_true(logits, labels)
    top = others.max(axis=-1, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(others - top).sum(axis=-1))
    return true - lse
