"""MoDE: momentum degradation and memory guidance (Zhao et al., IEEE IoT-J 2023)."""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from ..logs import log
from flwr.serverapp import Grid

from ..metrics import arrayrecord_nbytes
from ..protocol import DEGRADATION_KEY
from ..training import to_arrays
from . import register_method
from .base import Phase, UnlearningStrategy
from .params import MethodParams


@dataclass(frozen=True)
class MoDEParams(MethodParams):
    """MoDE's parameters (defaults: the values of the reference re-implementation).

    degradation_rounds : rounds R_deg in which the retained clients train the
        degradation model and the server applies the momentum step.
    guidance_rounds : rounds R_max of memory guidance (R_deg of them with degradation).
    momentum : lambda of ``theta <- lambda * theta + (1 - lambda) * theta_d``.
    degradation_lr, degradation_weight_decay : the retained clients' SGD on theta_d.
    guidance_lr : the target's learning rate when it trains towards theta_d's
        predictions (the retained clients train normally at ``unlearn.lr``).
    """

    degradation_rounds: int = 6
    guidance_rounds: int = 10
    momentum: float = 0.95
    degradation_lr: float = 0.1
    degradation_weight_decay: float = 1e-3
    guidance_lr: float = 5e-4

    def validate(self) -> None:
        if self.degradation_rounds < 0:
            raise ValueError(f"degradation_rounds={self.degradation_rounds} must be >= 0")
        if self.guidance_rounds < max(1, self.degradation_rounds):
            raise ValueError(f"guidance_rounds={self.guidance_rounds} must be >= 1 and >= "
                             f"degradation_rounds={self.degradation_rounds}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum={self.momentum} must be in [0, 1]")
        for key in ("degradation_lr", "guidance_lr"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}={getattr(self, key)} must be > 0")
        if self.degradation_weight_decay < 0:
            raise ValueError(f"degradation_weight_decay={self.degradation_weight_decay} "
                             "must be >= 0")


def momentum_degradation(global_arrays: ArrayRecord, degradation: ArrayRecord,
                         momentum: float) -> ArrayRecord:
    """``lambda * theta + (1 - lambda) * theta_d`` on every floating-point array
    (normalisation buffers included); integer buffers keep the global model's values."""
    out = {}
    for key, array in global_arrays.items():
        theta = array.numpy()
        if not np.issubdtype(theta.dtype, np.floating):
            out[key] = Array(theta.copy())
            continue
        mixed = momentum * theta.astype(np.float64) + (1.0 - momentum) * degradation[key].numpy()
        out[key] = Array(mixed.astype(theta.dtype))
    return ArrayRecord(out)


@register_method("mode")
class MoDE(UnlearningStrategy):
    """Momentum degradation + memory guidance, then recovery.

    The server holds a randomly initialised degradation model ``theta_d`` for the
    unlearning step (counted as ``storage_bytes``). For ``guidance_rounds`` rounds:

    1. while ``round <= degradation_rounds``: the retained clients train ``theta_d``
       (FedAvg), then ``theta <- lambda * theta + (1 - lambda) * theta_d``;
    2. memory guidance: the targets get ``theta`` and ``theta_d`` and train ``theta`` on
       their forget data labelled by ``theta_d`` (client action ``mode_guidance``);
       the other retained clients train ``theta`` normally; FedAvg over all of them.

    Then recovery: FedAvg on the retained data (``unlearn.*``) without client-wise
    targets. A degradation round moves two models per retained client, and every
    guidance round two models down to each target.
    """

    Params = MoDEParams
    model_fn_use = "to build its degradation model"

    def unlearning_step(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        p: MoDEParams = self.params
        targets = self.participants("targets", grid)
        if not targets:
            raise RuntimeError("mode: no target node is connected for memory guidance")
        torch.manual_seed(self.seed + 2)  # its own stream, same for every run
        degradation = to_arrays(self.model_factory())
        self.meter.storage_bytes = arrayrecord_nbytes(degradation)
        deg_phase = Phase("unlearning", rounds=p.degradation_rounds, lr=p.degradation_lr,
                          local_epochs=self.training.local_epochs,
                          weight_decay=p.degradation_weight_decay)
        guide_phase = Phase("unlearning", rounds=p.guidance_rounds, lr=p.guidance_lr,
                            local_epochs=self.training.local_epochs, action="mode_guidance",
                            role="targets")
        normal_phase = Phase("unlearning", rounds=p.guidance_rounds, lr=self.recovery.lr,
                             local_epochs=self.recovery.local_epochs)
        numel = sum(a.numpy().size for a in arrays.values())
        for rnd in range(1, p.guidance_rounds + 1):
            self.meter.rounds += 1
            if rnd <= p.degradation_rounds:
                retained = self.participants("retained", grid)
                replies = self.exchange(grid, self.build_messages(
                    degradation, deg_phase, retained, rnd))
                degradation = self.weighted_average(replies)
                arrays = momentum_degradation(arrays, degradation, p.momentum)
                self.meter.extra_flops += 3 * numel
            others = [n for n in self.participants("retained", grid) if n not in targets]
            messages = self.build_messages(arrays, guide_phase, targets, rnd,
                                           extra={DEGRADATION_KEY: degradation})
            messages += self.build_messages(arrays, normal_phase, others, rnd)
            arrays = self.weighted_average(self.exchange(grid, messages))
            if self.context.progress is not None and (
                    rnd % self.eval_every == 0 or rnd == p.guidance_rounds):
                self.context.progress(f"{self.phase}:unlearning", rnd, arrays,
                                      p.guidance_rounds)
        log(INFO, "[mode] %d guidance rounds done (%d with momentum degradation, lambda %.3f)",
            p.guidance_rounds, p.degradation_rounds, p.momentum)
        return arrays
