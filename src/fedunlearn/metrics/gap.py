"""Deltas and average gap with respect to the Retrain reference (NoT paper)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["METRIC_KEYS", "deltas", "average_gap"]

METRIC_KEYS: tuple[str, ...] = ("retain", "forget", "test", "mia")


def _get(values: Mapping[str, float], key: str) -> float:
    value = values.get(key)
    return float("nan") if value is None else float(value)


def deltas(
    metrics: Mapping[str, float],
    reference: Mapping[str, float],
    keys: Sequence[str] = METRIC_KEYS,
) -> dict[str, float]:
    """Signed per-metric differences ``metrics[k] - reference[k]``.

    Parameters
    ----------
    metrics : Mapping[str, float]
        Metrics of the evaluated method (percentages).
    reference : Mapping[str, float]
        Metrics of the reference (Retrain).
    keys : sequence of str, default ``METRIC_KEYS``
        Metrics to compare.

    Returns
    -------
    dict
        ``{key: delta}``; NaN when the key is missing or NaN on either side.
    """
    return {k: _get(metrics, k) - _get(reference, k) for k in keys}


def average_gap(
    metrics: Mapping[str, float],
    reference: Mapping[str, float],
    keys: Sequence[str] = METRIC_KEYS,
) -> float:
    """Mean absolute delta to the reference (NoT "Avg. Gap").

    ``Avg.Gap = (|dRetain| + |dForget| + |dTest| + |dMIA|) / 4``. If any delta is
    NaN (a metric missing or not computed on either side, e.g. a node failed its
    evaluation) the gap is NaN: a mean of fewer terms would not be comparable.

    Parameters
    ----------
    metrics : Mapping[str, float]
        Metrics of the evaluated method (percentages).
    reference : Mapping[str, float]
        Metrics of the reference (Retrain).
    keys : sequence of str, default ``METRIC_KEYS``
        Metrics to average over.

    Returns
    -------
    float
        The average gap in percentage points; NaN if any delta is NaN (or no keys).
    """
    gaps = [abs(d) for d in deltas(metrics, reference, keys).values()]
    if not gaps or any(math.isnan(g) for g in gaps):
        return float("nan")
    return sum(gaps) / len(gaps)
