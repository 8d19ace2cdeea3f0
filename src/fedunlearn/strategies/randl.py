"""RandL: random labels at the data holder, then recovery (NoT paper, Table 2)."""

from __future__ import annotations

from dataclasses import dataclass

from . import register_method
from .data_holder import DataHolderUnlearning
from .params import MethodParams


@dataclass(frozen=True)
class RandLParams(MethodParams):
    """RandL's parameters (the reference's CIFAR-10 setting: 10 epochs, lr 0.01).

    epochs, lr, weight_decay : the target's SGD (the federation's momentum and batch size).
    exclude_true_label : draw each forget sample's label from the other classes, so it is
        always wrong (the SSD repository's variant); false: uniform over all classes.
    """

    epochs: int = 10
    lr: float = 0.01
    weight_decay: float = 5e-4
    exclude_true_label: bool = True

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")


@register_method("randl")
class RandL(DataHolderUnlearning):
    """Random labels: the target relabels its forget samples at random and fine-tunes the
    global model on them together with its retained data (client action
    ``random_label_finetune``); then recovery on the retained data.

    Needs retained data at the target: client-wise requests are refused. Stores nothing.
    """

    Params = RandLParams
    action = "random_label_finetune"
    needs_retained = True
