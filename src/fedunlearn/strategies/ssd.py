"""SSD: selective synaptic dampening at the data holder, then recovery (Foster et al.,
AAAI 2024; NoT paper, Table 2)."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ArrayRecord

from . import register_method
from .data_holder import DataHolderUnlearning
from .params import MethodParams


@dataclass(frozen=True)
class SSDParams(MethodParams):
    """SSD's parameters (the reference's: alpha 10, lambda 1, exponent 1).

    alpha : selection weighting: weights with ``I_Du > alpha * I_D`` are dampened.
    dampening : lambda of ``beta = min(lambda * I_D / I_Du, 1)``.
    """

    alpha: float = 10.0
    dampening: float = 1.0

    def validate(self) -> None:
        if not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha} must be > 0")
        if not self.dampening > 0:
            raise ValueError(f"dampening={self.dampening} must be > 0")


@register_method("ssd")
class SSD(DataHolderUnlearning):
    """Training-free: the target measures each weight's importance (squared gradients)
    on all its data and on its forget data and dampens the weights far more important
    to the forget data (client action ``synaptic_dampening``); then recovery.

    Needs retained data at the target (importance over all data): client-wise requests
    are refused. The target holds two parameter-sized importance maps while it runs.
    """

    Params = SSDParams
    model_fn_use = "to count the bytes its targets hold"
    action = "synaptic_dampening"
    needs_retained = True

    def temporary_bytes(self, arrays: ArrayRecord) -> int:
        return 2 * self.parameter_bytes()
