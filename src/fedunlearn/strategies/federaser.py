"""FedEraser: calibrated replay of stored client updates (Liu et al., IWQoS 2021).

https://arxiv.org/abs/2012.13891
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord
from ..logs import log
from flwr.serverapp import Grid

from ..history import HistorySpec
from ..protocol import MODEL_KEY
from ..training import to_state
from . import register_method
from .base import Phase
from .history_based import HistoryUnlearning, to_record
from .params import MethodParams

NORM_SCOPES = ("layer", "model")
EPS = 1e-12


@dataclass(frozen=True)
class FedEraserParams(MethodParams):
    """FedEraser's parameters.

    delta_t : retaining interval: updates of rounds 1, 1+delta_t, ... are stored and
        replayed (the official code's 1; the paper uses 2).
    calibration_ratio : r: calibration training runs ``ceil(r * federation.local-epochs)``
        local epochs (the paper's and the code's 0.5).
    norm_scope : ``layer`` (one norm per parameter tensor, the code's robustness) or
        ``model`` (one norm over the whole update, the paper's formula); per client
        either way.
    recover : run the usual recovery rounds after the replay (off: the calibrated
        replay is the retraining).
    """

    delta_t: int = 1
    calibration_ratio: float = 0.5
    norm_scope: str = "layer"
    recover: bool = False

    def validate(self) -> None:
        if self.delta_t < 1:
            raise ValueError(f"delta_t={self.delta_t} must be >= 1")
        if not 0.0 < self.calibration_ratio <= 1.0:
            raise ValueError(f"calibration_ratio={self.calibration_ratio} must be in (0, 1]")
        if self.norm_scope not in NORM_SCOPES:
            raise ValueError(f"norm_scope={self.norm_scope!r}; allowed: {NORM_SCOPES}")


def calibrate_update(stored: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor],
                     keys: list[str], scope: str = "layer") -> dict[str, torch.Tensor]:
    """``|U| * U_hat / |U_hat|`` on ``keys``: the stored update gives the step's length,
    the fresh calibration update its direction.

    ``scope="layer"``: one norm per tensor; ``"model"``: one norm over all ``keys``.
    Only ``keys`` (trainable floating-point parameters) are returned: buffers such as
    BatchNorm statistics and integer counters are never rescaled. A fresh update of
    norm 0 stays 0."""
    if scope not in NORM_SCOPES:
        raise ValueError(f"norm_scope={scope!r}; allowed: {NORM_SCOPES}")
    if scope == "layer":
        return {k: fresh[k] * (torch.linalg.vector_norm(stored[k].double())
                               / torch.linalg.vector_norm(fresh[k].double()).clamp_min(EPS)
                               ).to(fresh[k].dtype)
                for k in keys}
    old = math.sqrt(sum(float(stored[k].double().pow(2).sum()) for k in keys))
    new = math.sqrt(sum(float(fresh[k].double().pow(2).sum()) for k in keys))
    scale = old / max(new, EPS)
    return {k: fresh[k] * scale for k in keys}


def weighted_sum(updates: dict[int, dict[str, torch.Tensor]], weights: dict[int, float],
                 keys: list[str]) -> dict[str, torch.Tensor]:
    """``sum_k p_k U_k[key]`` with ``p_k = w_k / sum_j w_j`` over the partitions of
    ``updates``."""
    total = float(sum(weights[pid] for pid in updates))
    if total <= 0:
        raise ValueError("the update weights sum to 0")
    return {k: sum((weights[pid] / total) * u[k].double() for pid, u in updates.items()
                   ).to(next(iter(updates.values()))[k].dtype) for k in keys}


@register_method("federaser")
class FedEraser(HistoryUnlearning):
    """Replay the stored rounds from the initial model without the forgotten clients,
    each step's length taken from the stored updates and its direction from a short
    calibration training on the retained clients.

    With ``M~`` starting at the stored initial model ``M^1``: the first stored round
    is applied uncalibrated (``M~ += sum_k p'_k U_k``, ``p'_k`` the retained clients'
    example shares), because ``M^1`` has not seen the target. For every later stored
    round ``t``, the retained clients train ``M~`` for ``ceil(r * local-epochs)`` epochs
    at ``pretrain.lr`` (plain local training); each fresh update is rescaled to the norm
    of that client's update stored at round ``t`` (:func:`calibrate_update`, trainable
    parameters only), and ``M~ += sum_k p'_k U~_k``; normalisation buffers come from the
    fresh aggregate. The client updates stored at round ``t`` are paired with the model
    that round started from (the official code pairs them with the model after it, an
    off-by-one). Stores the recorded updates (``storage_bytes``: the history files
    read); the targets never take part; serves client-wise requests.
    """

    Params = FedEraserParams

    @classmethod
    def history_needs(cls, params: FedEraserParams) -> HistorySpec:
        return HistorySpec(updates_every=params.delta_t)

    def recovery_phase(self) -> Phase:
        phase = super().recovery_phase()
        if self.params.recover:
            return phase
        return Phase(phase.name, rounds=0, lr=phase.lr, local_epochs=phase.local_epochs)

    def unlearning_step(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        p: FedEraserParams = self.params
        history = self.history
        rounds = history.stored_rounds(p.delta_t)
        if not rounds:
            raise RuntimeError(f"federaser: the training history {history.directory} holds "
                               "no stored round (pretraining ran no round)")
        retained = self.participants("retained", grid)
        if not retained:
            raise RuntimeError("federaser: no retained node is connected for calibration")
        keep = {self.history_key(n) for n in retained}
        keys = self.parameter_keys()
        epochs = max(1, math.ceil(p.calibration_ratio * self.training.local_epochs))
        calibration = Phase("unlearning", rounds=1, lr=self.training.lr, local_epochs=epochs)

        model, numel = self._replay_first_round(rounds[0], keep, keys)
        # Floating-point buffers (e.g. BatchNorm statistics) come from the fresh aggregate.
        buffers = [k for k in model if k not in keys and model[k].is_floating_point()]
        for rnd in rounds[1:]:
            self._replay_calibrated_round(grid, model, rnd, calibration, retained, keys,
                                          buffers, numel, last=rounds[-1])
        self.charge_storage()
        self.notes["replayed_rounds"] = len(rounds)
        self.notes["calibration_epochs"] = epochs
        log(INFO, "[federaser] replayed %d stored round(s) (every %d), %d calibrated on %d "
            "retained node(s)", len(rounds), p.delta_t, len(rounds) - 1, len(retained))
        return to_record(model)

    def _replay_first_round(self, rnd: int, keep: set, keys: list[str]
                            ) -> tuple[dict[str, torch.Tensor], int]:
        """``(model, numel)``: the model stored round ``rnd`` started from plus the
        weighted sum of the retained partitions' (``keep``) stored updates, as is; and
        the number of trainable parameters (``keys``)."""
        start, updates, counts = self.history.round(rnd)
        model = {k: v.clone() for k, v in start.items()}
        first = {pid: u for pid, u in updates.items() if pid in keep}
        if not first:
            raise RuntimeError(f"federaser: round {rnd} of the history holds no update "
                               f"of the retained partitions {sorted(keep)}")
        floats = list(next(iter(first.values())))
        for k, step in weighted_sum(first, counts, floats).items():
            model[k] += step
        numel = sum(model[k].numel() for k in keys)
        self.meter.extra_flops += 2 * numel * len(first)
        return model, numel

    def _replay_calibrated_round(self, grid: Grid, model: dict[str, torch.Tensor], rnd: int,
                                 calibration: Phase, retained, keys: list[str],
                                 buffers: list[str], numel: int, last: int) -> None:
        """Replay stored round ``rnd`` on ``model`` (in place): the retained nodes train
        it, each fresh update calibrated to the norm of the stored one, and the
        calibrated updates (and the fresh buffers) aggregated into ``model``."""
        _, updates, _ = self.history.round(rnd)
        self.meter.rounds += 1
        replies = self.exchange(grid, self.build_messages(
            to_record(model), calibration, retained, rnd))
        calibrated, weights, fresh_models = self._calibrate_replies(replies, model, rnd,
                                                                    updates, keys)
        if not calibrated:
            raise RuntimeError(f"federaser: no retained node calibrated round {rnd}")
        for k, step in weighted_sum(calibrated, weights, keys).items():
            model[k] += step
        if buffers:
            model.update(weighted_sum(fresh_models, weights, buffers))
        self.meter.extra_flops += 6 * numel * len(calibrated)
        if self.context.progress is not None and (
                rnd == last or self.meter.rounds % self.eval_every == 0):
            self.context.progress(f"{self.phase}:replay", rnd, to_record(model),
                                  self.training.rounds)

    def _calibrate_replies(self, replies, model: dict[str, torch.Tensor], rnd: int,
                           updates: dict, keys: list[str]) -> tuple[dict, dict, dict]:
        """``(calibrated, weights, fresh_models)`` per partition of a reply: the fresh
        update rescaled to the stored one's norm, the node's example count, its model. A
        partition with no stored update at ``rnd`` is left out (logged)."""
        parts = self.context.node_partitions
        calibrated, weights, fresh_models = {}, {}, {}
        for msg in replies:
            src = int(msg.metadata.src_node_id)
            pid = self.history_key(src) if src in parts else None
            if pid not in updates:
                log(WARNING, "[federaser] round %d: no stored update of partition %s; "
                    "its calibration is left out", rnd, pid)
                continue
            local = to_state(msg.content[MODEL_KEY])
            fresh = {k: local[k] - model[k] for k in keys}
            calibrated[pid] = calibrate_update(updates[pid], fresh, keys, self.params.norm_scope)
            weights[pid] = float(msg.content["metrics"]["num-examples"])
            fresh_models[pid] = local
        return calibrated, weights, fresh_models
