"""Relearn time (run-config ``audit.relearn-rounds``): how many rounds of plain federated
training, the targets' forget data included, bring a method's forgetting back to the
original model's level.

After a method's model is measured and saved, the harness plays up to
``audit.relearn-rounds`` rounds from it through the strategies' one round loop
(:meth:`~fedunlearn.strategies.UnlearningStrategy.play_round`): FedAvg over every
verified node with the pretraining settings (``pretrain.lr``,
``federation.local-epochs``), each node on **all** of its training data, a target's
forget data (and a backdoor client's trigger) included: the relearning attack. After each
round it measures

* ``"forget"``: forget accuracy (client-, class- or instance-wise), reached when it is
  ``>=`` the original model's;
* ``"asr"`` (a backdoor is planted): the attack success rate, reached when it is
  ``>=`` the original's minus :data:`ASR_TOLERANCE` points;

and stops at the first round that reaches it. Round 0 is the method's own model (0
rounds: it never lost what the metric sees). Retrain gets the same audit: its value is
the reference. The rounds run on copies: the method's model, metrics and costs are
untouched, and the relearn's own traffic is metered apart, in ``relearn.cost``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from logging import INFO, WARNING

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from ..audit import model_digest
from ..console import emit
from ..logs import log
from ..strategies.base import PretrainingProtocol, UnlearningStrategy
from ..strategies.context import UnlearningFailed
from .methods import HarnessContext, build, training_from

#: Relearned on the backdoor preset: ASR within this many points of the original's (the
#: same tolerance as ``unlearn.target-gap``'s default for recovery).
ASR_TOLERANCE = 1.0
METRICS = ("forget", "asr")


class RelearnStrategy(PretrainingProtocol, UnlearningStrategy):
    """Plain FedAvg over every verified node on all of its training data (requests do
    not shape it: a target trains on its forget data too), with the pretraining
    settings."""

    name = "relearn"
    uses_requests = False


@dataclasses.dataclass(frozen=True)
class RelearnTarget:
    """What counts as relearned: ``metric`` back at ``value`` (the original model's)
    within ``tolerance`` points."""

    metric: str
    value: float
    tolerance: float = 0.0

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"relearn metric {self.metric!r}; allowed: {METRICS}")

    def reached(self, value: float) -> bool:
        return math.isfinite(value) and value >= self.value - self.tolerance


def relearn_target(original: dict, backdoor: bool) -> RelearnTarget:
    """ASR (within :data:`ASR_TOLERANCE`) when a backdoor is planted, else forget
    accuracy, at the ``original`` model's value."""
    if backdoor:
        return RelearnTarget("asr", float(original["asr"]), ASR_TOLERANCE)
    return RelearnTarget("forget", float(original["forget"]))


def relearn(grid: Grid, context: HarnessContext, arrays: ArrayRecord, rounds: int,
            target: RelearnTarget, measure: Callable[[ArrayRecord], float],
            label: str) -> dict:
    """Up to ``rounds`` relearning rounds from ``arrays`` (``measure`` gives the
    target's metric of a model); ``results.json``'s ``relearn`` record. ``arrays`` is
    never changed (checked by its digest)."""
    record = {"rounds_max": rounds, "rounds": None, "target": round(target.value, 4),
              "metric": target.metric, "tolerance": target.tolerance, "curve": []}
    if not math.isfinite(target.value):
        log(WARNING, "[%s] relearn not measured: the original's %s is missing (a node "
            "failed its evaluation)", label, target.metric)
        record["unmeasured"] = f"the original's {target.metric} is missing"
        return record
    before = model_digest(arrays)
    strategy = _strategy(context, rounds, label)
    phase = strategy.recovery_phase()
    current, played_rounds = arrays, 0
    with strategy.cost_phase(phase.name):
        strategy.begin_phase(phase)
        try:
            played_rounds = _play(grid, strategy, phase, current, target, measure, record,
                                  label)
        finally:
            strategy.current_phase = None
    if model_digest(arrays) != before:
        raise RuntimeError(f"[{label}] the relearn rounds changed the method's model")
    cost = strategy.cost
    record["cost"] = {"rounds": played_rounds, "comm_bytes": cost.comm_bytes,
                      "flops": cost.flops, "wall_s": round(cost.wall_s, 3)}
    log(INFO, "[%s] relearn: %s %s after %s (target %.2f%s)", label, target.metric,
        "reached" if record["rounds"] is not None else "not reached",
        f"{record['rounds']} round(s)" if record["rounds"] is not None else
        f"{rounds} round(s)", target.value,
        f" - {target.tolerance:g}" if target.tolerance else "")
    return record


def _strategy(context: HarnessContext, rounds: int, label: str) -> RelearnStrategy:
    """The relearn's own strategy: the pretraining settings for ``rounds`` rounds, a
    context of its own without progress measurement (its rounds are no method's)."""
    cfg = context.cfg
    quiet = dataclasses.replace(context, progress=None, on_round=None, trajectory=False)
    training = dataclasses.replace(training_from(cfg), rounds=rounds)
    return build(RelearnStrategy, cfg, quiet, training=training, phase=label)


def _play(grid: Grid, strategy: RelearnStrategy, phase, arrays: ArrayRecord,
          target: RelearnTarget, measure: Callable[[ArrayRecord], float], record: dict,
          label: str) -> int:
    """Measure round 0, then play rounds until ``target`` is reached or the rounds run
    out; fill ``record``'s curve and rounds; the rounds played."""
    value = measure(arrays)
    record["curve"].append([0, _finite(value)])
    if target.reached(value):
        record["rounds"] = 0
        return 0
    for rnd in range(1, phase.rounds + 1):
        played = strategy.play_round(grid, arrays, phase, rnd)
        if not played.messages:
            raise UnlearningFailed(f"[{label}] no node can take part in the relearn rounds")
        if played.arrays is None:
            asked = sorted(int(m.metadata.dst_node_id) for m in played.messages)
            raise UnlearningFailed(f"[{label}] relearn round {rnd}: no usable reply from "
                                   f"nodes {asked}")
        arrays = played.arrays
        value = measure(arrays)
        record["curve"].append([rnd, _finite(value)])
        emit("round", phase=label, round=rnd, rounds=phase.rounds)
        if target.reached(value):
            record["rounds"] = rnd
            return rnd
    return phase.rounds


def _finite(value: float) -> float | None:
    return round(float(value), 4) if math.isfinite(value) else None
