"""PGD: projected gradient ascent at the target around a reference model, then
post-training (Halimi et al. 2022; reference: IBM's federated-unlearning notebook).

https://arxiv.org/abs/2207.05521
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from ..logs import log
from flwr.serverapp import Grid

from ..history import HistorySpec
from ..protocol import LAST_LOCAL_KEY, params_to_config
from ..training import random_model, to_state
from . import register_method
from .base import Phase
from .history_based import HistoryUnlearning, to_record
from .params import MethodParams


@dataclass(frozen=True)
class PGDParams(MethodParams):
    """PGD's parameters (the reference notebook's values, but the threshold).

    epochs, lr, momentum, clip_norm : the target's SGD ascent on its forget data.
    distance_threshold : early stop once ``|w - w_u|^2`` exceeds it (``w_u``: the
        target's last local model). It depends on the architecture: the reference's 2.2
        (tuned for its MNIST network) wrecks the digits CNN (test accuracy 63% after
        recovery); 0.5 is the measured default for it.
    radius_fraction, random_inits : the ball's squared radius is ``radius_fraction`` x
        the mean ``|w_ref - w_rand|^2`` over ``random_inits`` random initialisations.
    """

    epochs: int = 5
    lr: float = 0.01
    momentum: float = 0.9
    clip_norm: float = 5.0
    distance_threshold: float = 0.5
    radius_fraction: float = 1.0 / 3.0
    random_inits: int = 10

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} must be >= 1")
        for key in ("lr", "distance_threshold", "radius_fraction"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}={getattr(self, key)} must be > 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum={self.momentum} must be in [0, 1)")
        if self.clip_norm < 0:
            raise ValueError(f"clip_norm={self.clip_norm} must be >= 0 (0: off)")
        if self.random_inits < 1:
            raise ValueError(f"random_inits={self.random_inits} must be >= 1")


def reference_model(global_state: dict[str, torch.Tensor],
                    last_local: dict[int, dict[str, torch.Tensor]],
                    weights: dict[int, float], targets: list[int],
                    keys: list[str]) -> dict[str, torch.Tensor]:
    """``w_ref = (w^T - sum_u p_u w_u) / (1 - sum_u p_u)`` on ``keys``: the average of the
    other clients' last local models, with ``p_u`` the targets' FedAvg weights in the
    last round (weighted FedAvg). Every other array is the global model's."""
    share = float(sum(weights[u] for u in targets))
    if not 0.0 <= share < 1.0:
        raise ValueError(f"the targets' FedAvg share {share} leaves no other client")
    out = {k: v.clone() for k, v in global_state.items()}
    for k in keys:
        removed = sum(weights[u] * last_local[u][k].double() for u in targets)
        out[k] = ((global_state[k].double() - removed) / (1.0 - share)).to(out[k].dtype)
    return out


def ball_radius(reference: dict[str, torch.Tensor], random_states: list[dict[str, torch.Tensor]],
                keys: list[str], fraction: float) -> float:
    """``fraction`` x the mean squared distance from ``reference`` to random models."""
    distances = [sum(float((reference[k].double() - r[k].double()).pow(2).sum()) for k in keys)
                 for r in random_states]
    return fraction * sum(distances) / len(distances)


@register_method("pgd")
class PGD(HistoryUnlearning):
    """Reference model, projected ascent at the targets, then recovery.

    The server builds ``w_ref`` from the global model and the targets' last local
    models recorded in the training history (:func:`reference_model`), and the ball's
    squared radius from random initialisations (:func:`ball_radius`). Each target
    receives ``w_ref`` and its own last local model and runs ``projected_ascent`` on its
    forget data; the server averages the targets' models by forget-set size. Recovery:
    FedAvg on the retained data (``unlearn.*``). Stores every client's last local model
    (``storage_bytes``: the history file read); the targets take part; serves
    client-wise requests.
    """

    Params = PGDParams

    @classmethod
    def history_needs(cls, params: PGDParams) -> HistorySpec:
        return HistorySpec(last_local=True)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._last_local: dict[int, ArrayRecord] = {}

    def node_content(self, node_id: int, arrays: ArrayRecord,
                     config: ConfigRecord) -> RecordDict:
        content = super().node_content(node_id, arrays, config)
        if node_id in self._last_local:
            content[LAST_LOCAL_KEY] = self._last_local[node_id]
        return content

    def unlearning_step(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        p: PGDParams = self.params
        targets = self.participants("targets", grid)
        if not targets:
            raise RuntimeError("pgd: no target node is connected for projected ascent")
        models, weights = self.history.last_local()
        target_pids = [self.history_key(n) for n in targets]
        missing = [pid for pid in target_pids if pid not in models]
        if missing:
            raise RuntimeError(f"pgd: the training history holds no last local model of "
                               f"partition(s) {missing}")
        keys = self.parameter_keys()
        reference = reference_model(to_state(arrays), models, weights, target_pids, keys)
        randoms = [random_model(self.model_factory, self.seed * 1000 + 17 + i)
                   .state_dict() for i in range(p.random_inits)]
        radius = ball_radius(reference, randoms, keys, p.radius_fraction)
        numel = sum(reference[k].numel() for k in keys)
        self.meter.extra_flops += numel * (3 * len(target_pids) + 3 * p.random_inits)
        self._last_local = {n: to_record(models[self.history_key(n)]) for n in targets}
        phase = Phase("unlearning", rounds=1, lr=p.lr, local_epochs=p.epochs,
                      action="projected_ascent", role="targets")
        config = self.round_config(phase, 1)
        values = p.as_dict()
        values.update(radius=radius)
        config.update(params_to_config(values))
        self.meter.rounds += 1
        try:
            replies = self.exchange(grid, self.build_messages(to_record(reference), phase,
                                                              targets, 1, config=config))
        finally:
            self._last_local = {}
        usable = [m for m in replies if int(m.content["metrics"]["num-examples"]) > 0]
        if not usable:
            raise RuntimeError("pgd: no target returned a model from projected_ascent")
        self.charge_storage()
        self.notes["radius"] = radius
        self.notes["targets_answered"] = len(usable)
        log(INFO, "[pgd] %d target(s) ran projected ascent within squared radius %.4g",
            len(usable), radius)
        return self.weighted_average(usable)
