"""Retrain: FedAvg from scratch on the retained data only (exact unlearning)."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from ..training import to_arrays
from . import register_method
from .base import PretrainingProtocol, UnlearningStrategy


@register_method("retrain")
class Retrain(PretrainingProtocol, UnlearningStrategy):
    """The gold standard every other method is measured against.

    A freshly initialised model (seeded with ``seed``) trained for as many rounds as
    pretraining (``pretrain.rounds``, at ``pretrain.lr`` and ``federation.local-epochs``)
    on the retained data only. Its cost is the whole retraining (phase ``training``).
    Stores nothing; the targets never take part.
    """

    model_fn_use = "to build the fresh model it retrains"

    def initial_arrays(self, pretrained: ArrayRecord) -> ArrayRecord:
        # A different stream from pretraining's initialisation, same for every run.
        torch.manual_seed(self.seed + 1)
        return to_arrays(self.model_factory())
