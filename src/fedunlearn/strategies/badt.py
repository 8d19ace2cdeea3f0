"""BadT: competent and incompetent teachers at the data holder, then recovery
(Chundawat et al., AAAI 2023; NoT paper, Table 2)."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ArrayRecord

from . import register_method
from .data_holder import DataHolderUnlearning
from .params import MethodParams


@dataclass(frozen=True)
class BadTParams(MethodParams):
    """BadT's parameters (the reference's: Adam lr 1e-4, 1 epoch, T = 1, 30% retained).

    epochs, lr : the student's Adam steps (the federation's batch size).
    temperature : distillation temperature T.
    retain_fraction : share of the target's retained samples distilled from the
        competent teacher (drawn at random each time the target runs).
    """

    epochs: int = 1
    lr: float = 1e-4
    temperature: float = 1.0
    retain_fraction: float = 0.3

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if not 0.0 <= self.retain_fraction <= 1.0:
            raise ValueError(f"retain_fraction={self.retain_fraction} must be in [0, 1]")


@register_method("badt")
class BadT(DataHolderUnlearning):
    """Bad teaching: the target distils the global model from a randomly initialised
    teacher on its forget data and from the global model itself on part of its retained
    data (client action ``bad_teacher``); then recovery on the retained data.

    Needs retained data at the target: client-wise requests are refused. The target
    holds both teachers while it runs; the random one is built there from a seed.
    """

    Params = BadTParams
    action = "bad_teacher"
    needs_retained = True

    def temporary_bytes(self, arrays: ArrayRecord) -> int:
        return 2 * self.model_bytes(arrays)
