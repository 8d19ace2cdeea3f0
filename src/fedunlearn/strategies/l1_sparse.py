"""l1-sparse: l1-regularised fine-tuning at the data holder, then recovery (Jia et al.,
NeurIPS 2023; NoT paper, Table 2)."""

from __future__ import annotations

from dataclasses import dataclass

from . import register_method
from .data_holder import DataHolderUnlearning
from .params import MethodParams


@dataclass(frozen=True)
class L1SparseParams(MethodParams):
    """l1-sparse's parameters (the reference's ``FT_l1``: 10 epochs, lr 0.01).

    epochs, lr, weight_decay : the target's SGD on its retained data.
    alpha : gamma, the l1 coefficient, decayed linearly per epoch to 0 (the reference
        sets it on the command line; 5e-4 is a typical value).
    no_l1_epochs : last epochs without the penalty (E0).
    """

    epochs: int = 10
    lr: float = 0.01
    alpha: float = 5e-4
    no_l1_epochs: int = 0
    weight_decay: float = 5e-4

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.alpha < 0:
            raise ValueError(f"alpha={self.alpha} must be >= 0")
        if not 0 <= self.no_l1_epochs < self.epochs:
            raise ValueError(f"no_l1_epochs={self.no_l1_epochs} must be in "
                             f"[0, epochs={self.epochs})")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")


@register_method("l1_sparse")
class L1Sparse(DataHolderUnlearning):
    """Fine-tuning with an l1 penalty on every weight at the target, on its retained data
    (client action ``l1_sparse_finetune``); then recovery on the retained data.

    Needs retained data at the target: client-wise requests are refused. Stores nothing.
    """

    Params = L1SparseParams
    action = "l1_sparse_finetune"
    needs_retained = True
