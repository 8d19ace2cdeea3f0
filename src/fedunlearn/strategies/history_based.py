"""Methods that remember training: the shared base of FedEraser, FUKD and PGD.

They read what pretraining recorded (:mod:`fedunlearn.history`), keyed by partition id.
A recorded client update mixes everything the client trained on, so these methods
remove whole clients: they serve client-wise requests and refuse the others up front.
What they read of the history is their ``storage_bytes``: the server must keep it for
as long as any client may ask to be forgotten.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from ..history import TrainingHistory, recorded_model_digest
from ..requests import UnlearningRequest
from .base import UnlearningStrategy


class HistoryUnlearning(UnlearningStrategy):
    """An :class:`UnlearningStrategy` that reads the training history."""

    scopes = ("client",)
    model_fn_use = "to name the model's trainable parameters in the training history"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._history: TrainingHistory | None = None

    def refusal(self, requests: dict[int, UnlearningRequest]) -> str | None:
        shared = self.context.history
        if shared is None and not self.context.managed:
            return (f"{self.name} needs the training history recorded while the model was "
                    "trained, and none is bound to this serving run (wrap your training "
                    "strategy in fedunlearn.HistoryKeeper and pass serve(..., history=keeper))")
        need = self.history_needs(self.params)
        if shared is not None and not shared.spec.covers(need):
            return (f"{self.name} needs a training history with {need.describe()}, and the "
                    f"one bound ({shared.directory}) recorded {shared.spec.describe()}")
        recorded = recorded_model_digest(shared.manifest) if shared is not None else None
        original = self.context.original_arrays
        if recorded and original is not None and not self.context.managed:
            from ..audit import model_digest

            if model_digest(original) != recorded:
                return (f"{self.name} replays the training history {shared.directory}, "
                        f"which ended at the model with array digest {recorded[:12]}, and is "
                        f"asked to unlearn from a different model ({model_digest(original)[:12]}):"
                        " serve the model the recorded training produced")
        if shared is not None and shared.manifest.get("keyed_by") == "node-id":
            missing = sorted(n for n in requests if n not in self.recorded_keys(shared))
            if missing:
                return (f"{self.name}: the training history {shared.directory} holds "
                        f"nothing of node(s) {missing} (a node that joined later or under "
                        "a new id)")
        reason = super().refusal(requests)
        if reason is not None:
            reason += (" (its training history records whole-client updates, which mix a "
                       "client's forget and retained data)")
        return reason

    @property
    def history(self) -> TrainingHistory:
        """This method's reader of the job's training history (its own byte count)."""
        if self._history is None:
            shared = self.context.history
            need = self.history_needs(self.params)
            if shared is None or not shared.spec.covers(need):
                raise RuntimeError(f"{self.name} needs a training history with "
                                   f"{need.describe()}, and pretraining recorded "
                                   f"{shared.spec.describe() if shared else 'none'}")
            self._history = shared.reader()
        return self._history

    def history_key(self, node_id: int) -> int:
        """The key of ``node_id``'s records in the history: its partition id (the
        harness's pretraining) or the node id itself (a :class:`fedunlearn.HistoryKeeper`
        around a user's strategy)."""
        if self.history.manifest.get("keyed_by") == "node-id":
            return int(node_id)
        return self.context.node_partitions[node_id]

    @staticmethod
    def recorded_keys(history: TrainingHistory) -> set[int]:
        """The keys (node or partition ids) the history holds records of."""
        reader = history.reader()  # its own byte count: the method's stays as it reads
        if history.spec.update_sums:
            return set(reader.update_sums())
        if history.spec.last_local:
            return set(reader.last_local()[0])
        return {k for r in reader.stored_rounds(history.spec.updates_every)
                for k in reader.round(r)[1]}

    def target_partitions(self) -> list[int]:
        """The history keys of the target nodes."""
        parts = self.context.node_partitions
        return sorted(self.history_key(n) for n in self.context.requests if n in parts)

    def parameter_keys(self) -> list[str]:
        """Names of the model's floating-point trainable parameters (buffers such as
        BatchNorm statistics and integer counters are not)."""
        return [n for n, p in self.model_factory().named_parameters()
                if p.is_floating_point()]

    def charge_storage(self) -> None:
        """Storage: the history files this method read; noted with what they hold."""
        h = self.history
        self.meter.storage_bytes = max(self.meter.storage_bytes, h.bytes_read)
        self.notes["history"] = {"path": str(h.directory), "files_read": sorted(h.files_read),
                                 "bytes_read": h.bytes_read, "recorded": h.spec.describe()}


def to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


__all__ = ["HistoryUnlearning", "to_record"]
