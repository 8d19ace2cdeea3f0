"""FUKD: subtract the target's stored updates, repair by knowledge distillation on the
server (Wu, Zhu, Mitra 2022).

https://arxiv.org/abs/2201.09441
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord
from ..logs import log
from flwr.serverapp import Grid
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..history import HistorySpec
from ..training import load_arrays, resolve_device, to_arrays, to_state
from . import register_method
from .history_based import HistoryUnlearning, to_record
from .params import MethodParams


@dataclass(frozen=True)
class FUKDParams(MethodParams):
    """FUKD's parameters (distillation: a common re-implementation's values; the paper's
    are not published).

    temperature : T of the softened softmax (the loss is scaled by T^2).
    epochs, lr, momentum, batch_size : the server's SGD over its unlabeled data.
    """

    temperature: float = 2.0
    epochs: int = 10
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 64

    def validate(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if self.epochs < 0:
            raise ValueError(f"epochs={self.epochs} must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum={self.momentum} must be in [0, 1)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")


def subtract_updates(global_state: dict[str, torch.Tensor],
                     sums: list[dict[str, torch.Tensor]], keys: list[str]
                     ) -> dict[str, torch.Tensor]:
    """``theta - sum_u sum_t p_u^t dM_t^u`` on ``keys`` ("lazy" erasure: as if each
    target had taken part with zero updates); every other array is kept as it is.

    ``sums`` holds each target's recorded weighted update sum (the weights ``p_u^t``,
    its FedAvg share in each round, were applied when recording)."""
    out = {k: v.clone() for k, v in global_state.items()}
    for total in sums:
        for k in keys:
            out[k] -= total[k].to(out[k].dtype)
    return out


def distill(student: nn.Module, teacher: nn.Module, dataset, indices: np.ndarray, *,
            temperature: float, epochs: int, lr: float, momentum: float, batch_size: int,
            device: torch.device, seed: int) -> tuple[float, int]:
    """Train ``student`` to match ``teacher``'s softened predictions on
    ``dataset[indices]`` (labels unused): ``T^2 KL(softmax(z_t/T) || softmax(z_s/T))``.

    The student trains in train mode (normalisation statistics re-estimated), the
    teacher is frozen in eval mode. Returns the last epoch's mean loss and the samples
    seen."""
    student.to(device).train()
    teacher.to(device).eval()
    generator = torch.Generator().manual_seed(int(seed))
    loader = DataLoader(Subset(dataset, np.asarray(indices).tolist()), batch_size=batch_size,
                        shuffle=True, generator=generator)
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=momentum)
    seen, loss_mean = 0, float("nan")
    for _ in range(epochs):
        total, count = 0.0, 0
        for x, _y in loader:
            x = x.to(device)
            with torch.no_grad():
                target = F.softmax(teacher(x) / temperature, dim=1)
            log_p = F.log_softmax(student(x) / temperature, dim=1)
            loss = F.kl_div(log_p, target, reduction="batchmean") * temperature ** 2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(x)
            count += len(x)
        seen += count
        loss_mean = total / max(count, 1)
    return loss_mean, seen


@register_method("fukd")
class FUKD(HistoryUnlearning):
    """Server-only erasure, then recovery.

    The server subtracts each target's recorded weighted update sum from the global
    model (trainable parameters only: normalisation statistics are not additive, the
    distillation re-estimates them), then distils the original model (teacher) into the
    subtracted one (student) on its own unlabeled data (``server-data.fraction`` of the
    training pool, in no client's partition, so the target's data never comes back),
    counting the distillation's FLOPs as server FLOPs. Recovery: FedAvg on the retained
    data (``unlearn.*``). Stores every client's update sum (``storage_bytes``); no client
    takes part in the unlearning step; serves client-wise requests.
    """

    Params = FUKDParams

    @classmethod
    def history_needs(cls, params: FUKDParams) -> HistorySpec:
        return HistorySpec(update_sums=True)

    def __init__(self, *args, server_data=None, **kwargs) -> None:
        """``server_data`` (required outside the harness): data the server itself holds
        to distil on, a map-style dataset yielding ``(x, y)`` (labels unused) of the
        same kind of inputs as the clients' (e.g. a public or synthetic set, or a share
        the operator keeps back), in no client's training set, and **not** the test set
        the unlearned model is scored on (distilling on it inflates that score); the
        harness gives its reserved share (``server-data.fraction``)."""
        super().__init__(*args, **kwargs)
        if server_data is None and not self.context.managed:
            raise ValueError(
                "FUKD needs server_data: unlabeled data the server itself holds, in no "
                "client's training set and not the test set it is scored on (a public "
                "or synthetic set of the same inputs, or a share you keep back): pass "
                "FUKD(..., server_data=<a map-style dataset yielding (x, y)>)")
        if server_data is not None and not (hasattr(server_data, "__getitem__")
                                            and hasattr(server_data, "__len__")):
            raise TypeError(f"server_data: expected a map-style dataset yielding (x, y), got "
                            f"{type(server_data).__name__}")
        if server_data is not None and len(server_data) == 0:
            raise ValueError("server_data is empty: FUKD distils on the server's own data")
        self.server_data = server_data

    def distillation_data(self) -> tuple[object, np.ndarray]:
        """``(dataset, indices)`` the server distils on (``None`` dataset: none)."""
        if self.server_data is not None:
            return self.server_data, np.arange(len(self.server_data), dtype=np.int64)
        data = self.context.data
        ids = getattr(data, "server_indices", np.zeros(0, dtype=np.int64))
        return (data.train if ids.size else None), ids

    def refusal(self, requests) -> str | None:
        reason = super().refusal(requests)
        if reason is None and not self.context.managed and self.distillation_data()[0] is None:
            reason = ("fukd distils on unlabeled data the server holds, and it was given "
                      "none: pass FUKD(..., server_data=<a dataset in no client's training "
                      "set>)")
        return reason

    def unlearning_step(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        p: FUKDParams = self.params
        sums = self.history.update_sums()
        targets = self.target_partitions()
        missing = [pid for pid in targets if pid not in sums]
        if missing:
            raise RuntimeError(f"fukd: the training history holds no update of partition(s) "
                               f"{missing}")
        keys = self.parameter_keys()
        subtracted = subtract_updates(to_state(arrays), [sums[pid] for pid in targets], keys)
        numel = sum(subtracted[k].numel() for k in keys)
        self.meter.extra_flops += numel * len(targets)
        dataset, server_ids = self.distillation_data()
        if dataset is None:
            raise RuntimeError("fukd: the server holds no data to distil on (pass "
                               "server_data=, or server-data.fraction > 0 in the harness)")
        device = resolve_device(self.device)
        student = load_arrays(self.model_factory(), to_record(subtracted))
        teacher = load_arrays(self.model_factory(), arrays)
        loss, seen = distill(student, teacher, dataset, server_ids,
                             temperature=p.temperature, epochs=p.epochs, lr=p.lr,
                             momentum=p.momentum, batch_size=p.batch_size, device=device,
                             seed=self.seed + 31)
        # The student's forward + backward and the teacher's forward, per sample seen.
        self.meter.extra_flops += seen * (self.context.flops_per_sample
                                          + self.context.forward_flops_per_sample)
        self.charge_storage()
        self.notes["distillation"] = {"server_samples": int(server_ids.size),
                                      "samples_seen": seen, "final_loss": round(loss, 6)}
        self.notes["subtracted_partitions"] = targets
        log(INFO, "[fukd] subtracted the updates of partition(s) %s; distilled %d epoch(s) "
            "on %d server samples (loss %.4f)", targets, p.epochs, server_ids.size, loss)
        return to_arrays(student.cpu())
