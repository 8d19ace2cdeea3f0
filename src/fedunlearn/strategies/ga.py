"""GA: bounded gradient ascent at the data holder, then recovery (Thudi et al., EuroS&P
2022; NoT paper, Table 2)."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ArrayRecord

from . import register_method
from .data_holder import DataHolderUnlearning
from .params import MethodParams


@dataclass(frozen=True)
class GAParams(MethodParams):
    """GA's parameters.

    epochs, lr : the target's SGD ascent on its forget data (the reference's 5 epochs;
        the federation's momentum and batch size). The reference's lr 1e-4 (CIFAR,
        ResNet-18, batch 256) leaves a digits CNN untouched: 0.02 is the smallest rate
        at which ascent moves it within 5 epochs there.
    max_steps : step budget, whatever the number of epochs.
    loss_bound : stop once a forget batch's loss exceeds ``loss_bound x ln(C)`` (ln C:
        the loss of a uniform guess over C classes; 0.5: half-way to chance). Ascent
        jumps once it starts, so the bound sits below chance.
    clip_norm : gradient-norm clipping of each ascent step (0: off).
    """

    epochs: int = 5
    lr: float = 0.02
    max_steps: int = 200
    loss_bound: float = 0.5
    clip_norm: float = 5.0

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps} must be >= 1")
        if not self.loss_bound > 0:
            raise ValueError(f"loss_bound={self.loss_bound} must be > 0")
        if self.clip_norm < 0:
            raise ValueError(f"clip_norm={self.clip_norm} must be >= 0 (0: off)")


@register_method("ga")
class GA(DataHolderUnlearning):
    """Gradient ascent on the forget data at the target (client action
    ``gradient_ascent``), bounded by a step budget, a stop rule at chance-level loss and a
    guard that restores the last finite weights; then recovery on the retained data.

    Needs only the forget data, so it serves client-wise requests too. The target keeps
    a copy of its last finite weights while it runs.
    """

    Params = GAParams
    action = "gradient_ascent"

    def temporary_bytes(self, arrays: ArrayRecord) -> int:
        return self.model_bytes(arrays)
