"""SalUn: saliency-masked random labels at the data holder, then recovery (Fan et al.,
ICLR 2024; NoT paper, Table 2)."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ArrayRecord

from . import register_method
from .data_holder import DataHolderUnlearning
from .params import MethodParams


@dataclass(frozen=True)
class SalUnParams(MethodParams):
    """SalUn's parameters (the reference's CIFAR-10, 10%: 10 epochs, lr 0.013, mask 0.5).

    epochs, lr, weight_decay : the target's masked SGD (the federation's momentum and
        batch size).
    mask_ratio : share of all weights (one global ranking) that may change.
    exclude_true_label : as RandL's.
    """

    epochs: int = 10
    lr: float = 0.013
    weight_decay: float = 5e-4
    mask_ratio: float = 0.5
    exclude_true_label: bool = True

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        if not 0.0 < self.mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio={self.mask_ratio} must be in (0, 1]")


@register_method("salun")
class SalUn(DataHolderUnlearning):
    """Saliency unlearning: the target ranks weights by the forget loss's gradient and
    runs RandL on the top ``mask_ratio`` of them only (client action
    ``saliency_unlearning``); then recovery on the retained data.

    Needs retained data at the target: client-wise requests are refused. The target
    holds the gradient sums and then the mask (parameter-sized) while it runs.
    """

    Params = SalUnParams
    model_fn_use = "to count the bytes its targets hold"
    action = "saliency_unlearning"
    needs_retained = True

    def temporary_bytes(self, arrays: ArrayRecord) -> int:
        return 2 * self.parameter_bytes()
