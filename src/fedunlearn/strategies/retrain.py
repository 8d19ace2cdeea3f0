"""Retrain: FedAvg from scratch on the retained data only (exact unlearning)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from flwr.app import ArrayRecord

from ..training import to_arrays
from . import register_method
from .base import Phase, PretrainingProtocol, UnlearningStrategy
from .params import MethodParams

#: Retrain's round budgets: ``pretrain`` trains as many rounds as pretraining (the
#: reference of every table), ``matched`` as many as pretraining plus recovery (the rounds
#: every other method's model has seen: the original's and its recovery's).
BUDGETS = ("pretrain", "matched")


@dataclass(frozen=True)
class RetrainParams(MethodParams):
    """Retrain's parameters.

    budget : ``pretrain`` (``pretrain.rounds``, the default) or ``matched``
        (``pretrain.rounds + unlearn.rounds``: a budget-matched reference).
    """

    budget: str = "pretrain"

    def validate(self) -> None:
        if self.budget not in BUDGETS:
            raise ValueError(f"budget={self.budget!r}; choose from {BUDGETS} (pretrain: "
                             "pretrain.rounds, matched: pretrain.rounds + unlearn.rounds)")


@register_method("retrain")
class Retrain(PretrainingProtocol, UnlearningStrategy):
    """The gold standard every other method is measured against.

    A freshly initialised model (seeded with ``seed``) trained on the retained data only,
    at ``pretrain.lr`` and ``federation.local-epochs``, for as many rounds as pretraining
    (``budget="pretrain"``, the default) or as pretraining plus recovery
    (``budget="matched"``: ``pretrain.rounds + unlearn.rounds``, the rounds the other
    methods' models have seen). Its cost is the whole retraining (phase ``training``).
    Stores nothing; the targets never take part.
    """

    Params = RetrainParams
    model_fn_use = "to build the fresh model it retrains"

    def recovery_phase(self) -> Phase:
        phase = super().recovery_phase()
        if self.params.budget == "matched":
            return replace(phase, rounds=self.training.rounds + self.recovery.rounds)
        return phase

    def initial_arrays(self, pretrained: ArrayRecord) -> ArrayRecord:
        # A different stream from pretraining's initialisation, same for every run.
        torch.manual_seed(self.seed + 1)
        return to_arrays(self.model_factory())
