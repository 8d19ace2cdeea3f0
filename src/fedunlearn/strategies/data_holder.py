"""Unlearning run by the data holder: one client action at the targets, then recovery.

FCU and the centralized unlearning methods of the NoT paper's Table 2 (RandL, GA, BadT,
l1-sparse, SSD, SalUn) are procedures run by whoever holds the forget data. In
fedunlearn that is the target node: :class:`DataHolderUnlearning` sends each target the
global model with the method's parameters (``param.<name>`` config entries) and the
message type ``train.<action>``, takes back one model per target, averages them by the
number of samples each used (one target: its model as it is), then runs the usual
recovery rounds on the retained data.

A federation of one client holding all training data is the centralized setting: the
same code path runs the centralized methods there (preset ``centralized``).
"""

from __future__ import annotations

from logging import INFO, WARNING

from flwr.app import ArrayRecord
from ..logs import log
from flwr.serverapp import Grid

from ..metrics import arrayrecord_nbytes
from ..protocol import RANDOM_MODEL_SEED_KEY, params_to_config
from ..requests import UnlearningRequest
from ..training import parameter_nbytes
from .base import Phase, UnlearningStrategy

#: Offset of the seed of the random model a method builds on the nodes (FCU's
#: downgraded model, BadT's incompetent teacher) from the job's seed.
RANDOM_MODEL_SEED_OFFSET = 7919


class DataHolderUnlearning(UnlearningStrategy):
    """A client action at every target, one round; then recovery.

    Subclasses set :attr:`action` (the client action), :attr:`needs_retained` (the
    action needs retained data at the target: client-wise requests, whose target keeps
    nothing, are refused up front) and say what the target holds while it runs
    (:meth:`temporary_bytes`, reported in ``notes``). A target answers with the number
    of samples it used as ``num-examples``; several targets' models are averaged by it.
    """

    #: The client action the targets run (message type ``train.<action>``).
    action: str = ""
    #: Whether the action needs retained data at the target.
    needs_retained: bool = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.scopes = ("class", "instance") if cls.needs_retained else ("client", "class",
                                                                       "instance")

    def refusal(self, requests: dict[int, UnlearningRequest]) -> str | None:
        if not self.needs_retained:
            return super().refusal(requests)
        client_wise = sorted(n for n, r in requests.items() if r.scope == "client")
        if client_wise:
            return (f"{self.name} needs retained data at the data holder, and the target of "
                    f"a client-wise request keeps none (node(s) {client_wise}); it serves "
                    "class- and instance-wise requests")
        empty = sorted(n for n in requests if n in self.context.fully_forgotten)
        if empty:
            return (f"{self.name} needs retained data at the data holder, and node(s) "
                    f"{empty} ask to forget all of their training data")
        return super().refusal(requests)

    # -- what the targets run ------------------------------------------------------------
    def unlearning_phase(self) -> Phase:
        p = self.params
        return Phase("unlearning", rounds=1, lr=float(getattr(p, "lr", self.recovery.lr)),
                     local_epochs=int(getattr(p, "epochs", 1)), action=self.action,
                     role="targets")

    def action_config(self) -> dict:
        """The method's parameters and the random-model seed, for the targets."""
        out = params_to_config(self.params.as_dict())
        out[RANDOM_MODEL_SEED_KEY] = self.seed + RANDOM_MODEL_SEED_OFFSET
        return out

    def temporary_bytes(self, arrays: ArrayRecord) -> int:
        """Bytes a target holds besides the model it trains, while its action runs."""
        return 0

    def model_bytes(self, arrays: ArrayRecord) -> int:
        return arrayrecord_nbytes(arrays)

    def parameter_bytes(self) -> int:
        return parameter_nbytes(self.model_factory())

    def unlearning_step(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        targets = self.participants("targets", grid)
        if not targets:
            raise RuntimeError(f"{self.name}: no target node is connected to run "
                               f"{self.action}")
        phase = self.unlearning_phase()
        config = self.round_config(phase, 1)
        config.update(self.action_config())
        self.meter.rounds += 1
        replies = self.exchange(grid, self.build_messages(arrays, phase, targets, 1,
                                                          config=config))
        usable = [m for m in replies if int(m.content["metrics"]["num-examples"]) > 0]
        if not usable:
            raise RuntimeError(f"{self.name}: no target returned a model from {self.action}")
        answered = {int(m.metadata.src_node_id) for m in usable}
        missing = sorted(set(targets) - answered)
        if missing:  # their data was not unlearned by this step: say so
            log(WARNING, "[%s] target node(s) %s returned no model from %s; the step "
                "averages the other %d", self.name, missing, self.action, len(usable))
        self.notes["target_action"] = self.action
        self.notes["targets_asked"] = len(targets)
        self.notes["targets_answered"] = len(usable)
        self.notes["target_temporary_bytes"] = self.temporary_bytes(arrays)
        log(INFO, "[%s] %d target(s) ran %s", self.name, len(usable), self.action)
        return self.weighted_average(usable)


__all__ = ["RANDOM_MODEL_SEED_OFFSET", "DataHolderUnlearning"]
