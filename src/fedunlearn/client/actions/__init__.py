"""Client actions: the named procedures a node runs when the server asks it to train.

An action is a plain function ``fn(job: ActionJob) -> ActionResult`` in its own module
of this package, registered with :func:`register_action`. Every module here is imported
by :func:`discover` (``pkgutil``), and ``flower_apps/client_app.py`` registers every
action with the ClientApp in one loop, so message type ``train.<name>`` reaches
``<name>``; the plain ``train`` message type reaches the ``default`` action (local
training on the retained data). Adding an action means adding a module here, nothing
else.

The job carries every model of the message (each ArrayRecord, loaded into a fresh
model), the config, and this node's retained and forget split, computed locally from
the accepted request the server echoed: the forget data never leaves the node. The
reply carries exactly one ArrayRecord (``arrays``) and one MetricRecord with a fixed
set of keys (Flower's FedAvg checks both): ``num-examples`` (the aggregation weight),
``train-loss``, ``samples-processed`` (samples through forward + backward) and
``forward-samples`` (forward-only passes, e.g. a frozen teacher's predictions).
"""

from __future__ import annotations

import importlib
import math
import pkgutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from ...arrays import records, to_numpy
from ...registry import Registry
from ...requests import request_from_config
from ...training import load_arrays, resolve_device, to_arrays
from ..node import NodeView, resolve_view, split_local

from ...protocol import CONFIG_KEY, DEFAULT_ACTION, METRIC_KEYS, MODEL_KEY, message_type


@dataclass
class ActionJob:
    """What a train message asks of this node, unpacked.

    ``models`` maps every ArrayRecord key of the message to a model on ``device``
    (``models["arrays"]`` is the one to update); ``retained`` and ``forget`` are the
    global ids of this node's training split without / within its accepted request.
    """

    view: NodeView
    config: ConfigRecord
    models: dict[str, nn.Module]
    retained: np.ndarray
    forget: np.ndarray
    device: torch.device
    borrowed: list = field(default_factory=list)

    @property
    def model(self) -> nn.Module:
        return self.models[MODEL_KEY]

    @property
    def seed(self) -> int:
        """Per round and per node: every shuffle differs, and repeats exactly."""
        return int(self.config.get("seed", 0)) * 1000 + self.view.draw_id

    def exclude(self, ids) -> None:
        """Move training positions ``ids`` from the retained to the forget set."""
        ids = np.asarray(ids, dtype=np.int64)
        self.forget = np.union1d(self.forget, np.intersect1d(ids, self.retained))
        self.retained = np.setdiff1d(self.retained, ids)

    def lr(self) -> float:
        return float(self.config["lr"])

    def local_epochs(self) -> int:
        return int(self.config["local-epochs"])

    @classmethod
    def from_message(cls, msg: Message, context: Context, view_for=None,
                     reuse: bool = False) -> ActionJob:
        """Unpack ``msg``. With ``reuse`` (actions registered with ``reuses_models``),
        a harness node loads the message's models into instances kept from an earlier
        message of this process (every parameter and buffer is overwritten, so the
        result is the same as with fresh ones, without building a model per message)."""
        view = resolve_view(view_for, context)
        config = msg.content[CONFIG_KEY]
        retained, forget = split_local(view, request_from_config(config, view.partition_id))
        device = resolve_device(view.device)
        reuse = reuse and view.model_key is not None and view.train_fn is None
        models, borrowed = {}, []
        for key, record in records(msg.content, ArrayRecord).items():
            spare = (view.model_key, str(device), key)
            model = _SPARE_MODELS.pop(spare, None) if reuse else None
            if model is None:
                model = view.new_model()
            else:  # as a fresh model would be: training mode, trainable, no gradients
                model.train()
                for p in model.parameters():
                    p.requires_grad_(True)
                    p.grad = None
            if not (reuse and _load_reused(model, record)):
                load_arrays(model, record)
            if not (reuse and getattr(model, "_fedunlearn_device", None) == device):
                model = model.to(device)
            if reuse:
                model._fedunlearn_device = device
                borrowed.append((spare, model))
            models[key] = model
        if MODEL_KEY not in models:
            raise ValueError(f"a train message must carry the model as ArrayRecord "
                             f"{MODEL_KEY!r}; got {sorted(models)}")
        job = cls(view, config, models, retained, forget, device)
        job.borrowed = borrowed
        return job


@dataclass
class ActionResult:
    """What an action hands back: the model to reply with and what it cost."""

    model: nn.Module
    num_examples: int
    loss: float = float("nan")
    samples_processed: int = 0
    forward_samples: int = 0
    extra: dict = field(default_factory=dict)


Action = Callable[[ActionJob], ActionResult]
_ACTIONS: Registry[Action] = Registry("client action")
_REUSING: set[str] = set()
_SPARE_MODELS: dict[tuple, nn.Module] = {}


def _load_reused(model: nn.Module, record: ArrayRecord) -> bool:
    """Copy ``record`` into a model kept from an earlier message, tensor by tensor, when
    its names, shapes and dtypes are exactly the model's (what a strict
    ``load_state_dict`` would accept); ``False`` (nothing loaded) otherwise."""
    targets = getattr(model, "_fedunlearn_targets", None)
    if targets is None:
        targets = list(model.state_dict(keep_vars=True).items())
        model._fedunlearn_targets = targets
    if len(targets) != len(record):
        return False
    sources = []
    for (name, target), (key, array) in zip(targets, record.items()):
        if name != key:
            return False
        values = to_numpy(array, writable=False)
        if values.shape != tuple(target.shape) or values.dtype != _NUMPY_DTYPES.get(
                target.dtype):
            return False
        sources.append(values)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only sources: only read here
        for (_, target), values in zip(targets, sources):
            target.copy_(torch.from_numpy(values))
    return True


_NUMPY_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64),
                 torch.float16: np.dtype(np.float16), torch.int64: np.dtype(np.int64),
                 torch.int32: np.dtype(np.int32), torch.uint8: np.dtype(np.uint8),
                 torch.bool: np.dtype(np.bool_)}


def register_action(name: str, reuses_models: bool = False) -> Callable[[Action], Action]:
    """Decorator: make ``fn`` reachable as Flower message type ``train.<name>``.

    ``reuses_models``: the action only trains its models' parameters in place (no hooks,
    no frozen layers, no change of structure), so the node may hand it models kept from
    an earlier message (see :meth:`ActionJob.from_message`). ``name``: a lower-case
    letter, then lower-case letters, digits and '_' (see :mod:`fedunlearn.registry`)."""
    register = _ACTIONS.register(name)

    def deco(fn: Action) -> Action:
        register(fn)
        if reuses_models:
            _REUSING.add(name)
        return fn

    return deco


_discovered = False


def discover() -> None:
    """Import every module of this package (each registers its actions); once per
    process (the package's modules do not change while it runs)."""
    global _discovered
    if _discovered:
        return
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    _discovered = True


def list_actions() -> list[str]:
    discover()
    return _ACTIONS.names()


def get_action(name: str) -> Action:
    discover()
    return _ACTIONS.get(name)


def handle_action(name: str, msg: Message, context: Context, view_for=None,
                  exclude=None) -> Message:
    """Run action ``name`` on a train message and build the reply (``view_for(context)``
    gives the node's :class:`NodeView`; default: the harness's). ``exclude``: training
    positions kept out besides the message's request (the node's persistent forget list,
    :mod:`fedunlearn.client.forget_guard`)."""
    action = get_action(name)
    job = ActionJob.from_message(msg, context, view_for, reuse=name in _REUSING)
    if exclude is not None:
        job.exclude(exclude)
    result = action(job)
    reply = train_reply(msg, to_arrays(result.model), result.num_examples,  # CPU copies
                        result.loss, result.samples_processed, result.forward_samples)
    for spare, model in job.borrowed:  # the reply holds copies: the models are free
        if len(_SPARE_MODELS) < 16:
            _SPARE_MODELS[spare] = model
    return reply


def train_reply(msg: Message, arrays: ArrayRecord, num_examples: int, loss: float | None,
                samples_processed: int, forward_samples: int = 0) -> Message:
    """The reply to train message ``msg``: the model ``arrays`` and the metrics of
    :data:`METRIC_KEYS` (a NaN or missing loss is sent as 0.0)."""
    metrics = MetricRecord({
        "num-examples": int(num_examples),
        "train-loss": 0.0 if loss is None or math.isnan(loss) else float(loss),
        "samples-processed": int(samples_processed),
        "forward-samples": int(forward_samples),
    })
    return Message(RecordDict({MODEL_KEY: arrays, "metrics": metrics}), reply_to=msg)


def action_handler(name: str, view_for=None) -> Callable[[Message, Context], Message]:
    """A ClientApp handler for ``name`` (what ``app.train(name)`` registers)."""

    def handler(msg: Message, context: Context) -> Message:
        return handle_action(name, msg, context, view_for)

    handler.__name__ = f"train_{name}"
    # What the in-process engine's batched mode reads to train this node with others
    # (fedunlearn.batching): the action and the node's view.
    handler.fedunlearn_action = (name, view_for)
    return handler


__all__ = ["ActionJob", "ActionResult", "DEFAULT_ACTION", "METRIC_KEYS", "MODEL_KEY",
           "action_handler", "discover", "get_action", "handle_action", "list_actions",
           "message_type", "register_action", "train_reply"]
