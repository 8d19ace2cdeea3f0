"""Unlearning metrics: accuracy, membership inference, costs and average gap."""

from fedunlearn.metrics.accuracy import accuracy, accuracy_from_logits, predict
from fedunlearn.metrics.cost import arrayrecord_nbytes, flops_per_sample, state_nbytes
from fedunlearn.metrics.gap import METRIC_KEYS, average_gap, deltas
from fedunlearn.metrics.mia import (MIA_MIN_SAMPLES, membership_features, mia_result,
                                    mia_score, split_nonmembers)

__all__ = [
    "METRIC_KEYS",
    "MIA_MIN_SAMPLES",
    "accuracy",
    "accuracy_from_logits",
    "arrayrecord_nbytes",
    "average_gap",
    "deltas",
    "flops_per_sample",
    "membership_features",
    "mia_result",
    "mia_score",
    "predict",
    "split_nonmembers",
    "state_nbytes",
]
