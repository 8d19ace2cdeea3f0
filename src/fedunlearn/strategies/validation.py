"""Federated validation of a model on the retained nodes, and the stopping rule that
ends recovery once the model is recovered (:mod:`.stopping`)."""

from __future__ import annotations

from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from ..logs import log
from flwr.serverapp import Grid

from .. import protocol as P
from ..metrics import arrayrecord_nbytes
from ..protocol import EVALUATE_UNLEARN, MODEL_KEY, reply_timeout
from .costs import CostMeter
from .stopping import StoppingRule


class Validating:
    """The validation part of :class:`~fedunlearn.strategies.UnlearningStrategy`."""

    def stopping_rule(self, grid: Grid) -> StoppingRule:
        """The rule for this job: the target is the original model's validation accuracy
        on the retained clients minus ``unlearn.target-gap``. The original is validated
        once per job (shared by its methods, each charged its cost)."""
        r, info = self.recovery, self.context.info
        if "original_validation" not in info:
            if self.context.original_arrays is None:
                raise RuntimeError("the stopping rule needs the original model "
                                   "(context.original_arrays)")
            probe = CostMeter()
            accuracy = self._validate(grid, self.context.original_arrays, probe)
            info["original_validation"] = (accuracy, probe)
        accuracy, probe = info["original_validation"]
        meter = self.costs.setdefault("validation", CostMeter())
        meter.add(probe)
        self.notes["original_validation"] = round(accuracy, 4)
        return StoppingRule(target=accuracy - r.target_gap, patience=r.patience,
                            min_delta=r.min_delta)

    def validate(self, grid: Grid, arrays: ArrayRecord) -> float:
        """Federated validation accuracy (%) of ``arrays`` on the retained clients,
        metered under ``validation``."""
        return self._validate(grid, arrays, self.costs.setdefault("validation", CostMeter()))

    def _validate(self, grid: Grid, arrays: ArrayRecord, meter: CostMeter) -> float:
        nodes = self.participants("retained", grid)
        messages = []
        for node_id in nodes:
            config = self.node_config(node_id, ConfigRecord({P.SPLIT: P.VALIDATION_SPLIT}))
            messages.append(Message(RecordDict({MODEL_KEY: arrays, P.CONFIG_KEY: config}),
                                    dst_node_id=node_id, message_type=EVALUATE_UNLEARN))
        correct = total = 0
        meter.bytes_down += sum(arrayrecord_nbytes(arrays) for _ in messages)
        meter.messages_down += len(messages)
        for msg in grid.send_and_receive(messages, timeout=reply_timeout(grid)):
            if msg.has_error():
                log(WARNING, "[%s] validation failed on node %s: %s", self.phase,
                    msg.metadata.src_node_id, msg.error.reason)
                continue
            meter.messages_up += 1
            meter.bytes_up += sum(arrayrecord_nbytes(r)
                                  for r in msg.content.array_records.values())
            try:
                m = msg.content[P.METRICS_KEY]
                c, t = int(m[P.VAL_CORRECT]), int(m[P.VAL_TOTAL])
            except (KeyError, TypeError, ValueError, OverflowError) as err:
                log(WARNING, "[%s] malformed validation reply from node %s (%s): ignored",
                    self.phase, msg.metadata.src_node_id, err)
                continue
            if not 0 <= c <= t:
                log(WARNING, "[%s] validation reply from node %s reports %d of %d correct: "
                    "ignored", self.phase, msg.metadata.src_node_id, c, t)
                continue
            correct, total = correct + c, total + t
            meter.forward_samples += t
        meter.forward_flops_per_sample = self.context.forward_flops_per_sample
        return 100.0 * correct / total if total else float("nan")



def check_needs(strategy) -> None:
    """Refuse at construction what a method needs and was not given: a model factory
    (``model_fn_use``) or an input batch to trace the model with (``example_input_use``),
    unless the run's context supplies it (the experiment harness)."""
    name, context = type(strategy).__name__, strategy.context
    if strategy.model_fn_use and strategy._model_fn is None and context.model_factory is None:
        raise ValueError(f"{name} needs model_fn, {strategy.model_fn_use}: pass "
                         f"{name}(..., model_fn=Net), Net being the callable that builds a "
                         "fresh model of your architecture")
    if (strategy.example_input_use and strategy._example_input is None
            and context.example_input is None):
        raise ValueError(f"{name} needs example_input, {strategy.example_input_use}: pass "
                         f"{name}(..., example_input=x), x one input batch of your model, "
                         "e.g. torch.zeros(1, 3, 32, 32)")
