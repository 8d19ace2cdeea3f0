"""Mean and t-interval of a scalar metric over seeds (``mean_ci``), for tables."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["MeanCI", "mean_ci"]


@dataclass(frozen=True)
class MeanCI:
    """``mean`` with its two-sided ``confidence`` interval ``[low, high]`` over ``n`` values."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.half_width:.2f}"

    def to_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high,
                "half_width": self.half_width, "n": self.n, "confidence": self.confidence}


def mean_ci(values: ArrayLike, confidence: float = 0.95) -> MeanCI:
    """Mean of ``values`` (one per seed) and its Student-t interval:
    ``mean ± t_{(1+confidence)/2, n-1} * sd / sqrt(n)``, ``sd`` with ``n - 1`` degrees of
    freedom. Needs at least 2 finite values; a metric missing for a seed is refused, not
    skipped (drop the seed and say so)."""
    from scipy.stats import t

    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"values must be 1-D (one value per seed), got shape {v.shape}")
    if v.size < 2:
        raise ValueError(f"a confidence interval needs at least 2 values (seeds), got {v.size}")
    if not np.isfinite(v).all():
        i = int(np.flatnonzero(~np.isfinite(v))[0])
        raise ValueError(f"values must be finite, got {v[i]} at position {i}")
    if isinstance(confidence, bool) or not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence!r}")
    mean = float(v.mean())
    half = float(t.ppf((1.0 + confidence) / 2.0, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return MeanCI(mean=mean, low=mean - half, high=mean + half, n=int(v.size),
                  confidence=float(confidence))
