"""Forgetting measured against Retrain, example by example: margins, KLOM with its noise
floor, a per-example membership attack (U-LiRA style) with its floor, and
:func:`audit_forgetting` that runs them on K unlearned and L reference models' outputs.

Definitions, formulas and citations: ``docs/measuring-forgetting.md``.
"""

from fedunlearn.metrics.forgetting.audit import (MIN_REFERENCE_MODELS, ForgettingAudit,
                                                 PointSetAudit, audit_forgetting)
from fedunlearn.metrics.forgetting.klom import DEFAULT_BINS, DEFAULT_SMOOTHING, klom
from fedunlearn.metrics.forgetting.outputs import model_outputs
from fedunlearn.metrics.forgetting.scores import logit_confidence, margins

__all__ = ["DEFAULT_BINS", "DEFAULT_SMOOTHING", "MIN_REFERENCE_MODELS", "ForgettingAudit",
           "PointSetAudit", "audit_forgetting", "klom", "logit_confidence", "margins",
           "model_outputs"]
