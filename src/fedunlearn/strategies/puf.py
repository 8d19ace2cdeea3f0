"""PUF: federated unlearning with negated pseudo-gradients (Mora et al.).

"Federated Unlearning Made Practical: Seamless Integration via Negated Pseudo-Gradients".
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord
from ..logs import log
from flwr.serverapp import Grid

from ..protocol import MODEL_KEY
from . import register_method
from .base import Phase, UnlearningStrategy
from .params import MethodParams


@dataclass(frozen=True)
class PUFParams(MethodParams):
    """PUF's parameters (defaults: the reference's ``puf_special`` setting).

    alpha : scale of the negated pseudo-gradient (2.0: the update reversed twice over).
    local_epochs, lr : the targets' local training on their forget data.
    """

    alpha: float = 2.0
    local_epochs: int = 1
    lr: float = 0.01

    def validate(self) -> None:
        if not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha} must be > 0")
        if self.local_epochs < 1:
            raise ValueError(f"local_epochs={self.local_epochs} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")


def negated_pseudo_gradient(global_arrays: ArrayRecord,
                            target_updates: list[tuple[ArrayRecord, float]],
                            alpha: float) -> ArrayRecord:
    """``theta - alpha * sum_u w_u (theta_u - theta) / sum_u w_u``.

    ``target_updates`` holds each target's locally trained model and its weight (its
    forget-set size), so several concurrent requests are served in one step, as one
    pseudo-gradient of their union. Only floating-point arrays move; integer buffers
    (e.g. BatchNorm's ``num_batches_tracked``) keep the global model's values.
    """
    if not target_updates:
        raise ValueError("no target update to negate")
    total = float(sum(w for _, w in target_updates))
    if total <= 0:
        raise ValueError("the targets' update weights sum to 0")
    out = {}
    for key, array in global_arrays.items():
        theta = array.numpy()
        if not np.issubdtype(theta.dtype, np.floating):
            out[key] = Array(theta.copy())
            continue
        delta = np.zeros_like(theta, dtype=np.float64)
        for record, weight in target_updates:
            delta += (weight / total) * (record[key].numpy().astype(np.float64) - theta)
        out[key] = Array((theta - alpha * delta).astype(theta.dtype))
    return ArrayRecord(out)


@register_method("puf")
class PUF(UnlearningStrategy):
    """Negated pseudo-gradients, then recovery.

    Unlearning step (one round, the targets only): every target node trains the global
    model on the data it wants forgotten (client action ``pseudo_gradient``: its whole
    split for a client-wise request, its forget classes or samples otherwise); the
    server takes ``theta - alpha * Delta``, with ``Delta`` the targets' pseudo-gradients
    averaged by forget-set size (:func:`negated_pseudo_gradient`). Several concurrent
    requests are served together. Recovery: FedAvg on the retained data
    (``unlearn.*``); class-/instance-wise targets stay in with their retained data.
    Stores nothing between rounds; the targets must take part.
    """

    Params = PUFParams

    def unlearning_step(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        p: PUFParams = self.params
        phase = Phase("unlearning", rounds=1, lr=p.lr, local_epochs=p.local_epochs,
                      action="pseudo_gradient", role="targets")
        targets = self.participants(phase.role, grid)
        if not targets:
            raise RuntimeError("puf: no target node is connected to compute its "
                               "pseudo-gradient")
        self.meter.rounds += 1
        replies = self.exchange(grid, self.build_messages(arrays, phase, targets, 1))
        updates = [(m.content[MODEL_KEY], float(m.content["metrics"]["num-examples"]))
                   for m in replies if int(m.content["metrics"]["num-examples"]) > 0]
        if not updates:
            raise RuntimeError("puf: no target returned a pseudo-gradient")
        self.notes["targets_answered"] = len(updates)
        self.notes["alpha"] = p.alpha
        numel = sum(a.numpy().size for a in arrays.values())
        self.meter.extra_flops += 3 * numel * len(updates)  # delta, weighting, update
        log(INFO, "[puf] applied -%.2f x the pseudo-gradient of %d target(s)", p.alpha,
            len(updates))
        return negated_pseudo_gradient(arrays, updates, p.alpha)
