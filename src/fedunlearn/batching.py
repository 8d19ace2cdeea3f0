"""The in-process engine's batched mode: the plain train messages of one delivery,
trained together (:mod:`fedunlearn.client.batched`), answered with the replies their
handlers would have sent.

:class:`~fedunlearn.engine.LocalGrid` built with ``batch_clients=N`` hands every batch of
messages it delivers to :meth:`BatchedTraining.deliver` first. A message is trained
batched when

* its type is ``train`` or ``train.retained`` and the ClientApp serves it with
  fedunlearn's own local-training handler (:func:`fedunlearn.client.action_handler` of
  the ``default`` / ``retained`` action, registered without Flower mods: a mod, a
  forget guard or the app's own ``@app.train()`` may do anything);
* the node trains with fedunlearn's SGD (no ``train_fn`` of its owner);
* it carries one model, whose names, shapes and dtype (float32) are the node's model's,
  and that model is vectorisable (no buffers, no random numbers in its forward pass).

The others, and any node whose preparation raises (the per-message path then answers
with the same error reply it always does), go through the per-message path; the job's
log says so once per reason. Nodes of the same architecture and device are trained in
chunks of at most ``N`` clients.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message

from .arrays import record_from_state, state_dict
from .client.actions import ActionJob, train_reply
from .client.batched import ClientJob, read_samples, train_batched, vectorisable
from .client.node import resolve_view, split_local
from .logs import log
from .protocol import (
    CONFIG_KEY,
    DEFAULT_ACTION,
    MODEL_KEY,
    RETAINED_ACTION,
    message_type,
)
from .requests import request_from_config
from .training import resolve_device

BATCHED_ACTIONS = (DEFAULT_ACTION, RETAINED_ACTION)
"""The client actions the batched mode trains: local SGD on the retained data."""
TRAIN_TYPES = {message_type(a): a for a in BATCHED_ACTIONS}


def check_batch_clients(value) -> int:
    """``batch_clients`` as an int >= 0 (0: every message on its own), else a
    ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"batch_clients={value!r}: expected an integer >= 0 (the most "
                         "clients trained in one batched pass; 0: one message at a time)")
    return value


@dataclass
class _Pending:
    """One message the batched mode trains: where its reply goes and what it needs."""

    index: int
    inbound: Message
    dst: int
    job: ActionJob
    record: ArrayRecord


class _NotBatched(Exception):
    """Why a message goes through the per-message path (the log's reason)."""


class BatchedTraining:
    """Trains a delivery's eligible train messages in chunks of ``batch_clients``.

    ``node_identity(dst)`` is the context manager under which node ``dst``'s reply is
    built (the grid's task identity for that node)."""

    def __init__(self, client_app, batch_clients: int, node_identity) -> None:
        self.client_app = client_app
        self.batch_clients = check_batch_clients(batch_clients)
        self.node_identity = node_identity
        self.told: set[str] = set()
        self.verdicts: dict[tuple, str | None] = {}
        self.templates: dict[tuple, torch.nn.Module] = {}
        self.samples: dict[int, tuple[np.ndarray, int, tuple]] = {}
        self.trained = 0

    def deliver(self, pending: Sequence[tuple[int, Message, Context]]) -> dict[int, Message]:
        """Replies, by position, to the messages ``(position, inbound, context)`` it
        trains; the others are left to the per-message path."""
        if not self.batch_clients:
            return {}
        groups: dict[tuple, list[_Pending]] = {}
        for index, inbound, context in pending:
            if inbound.metadata.message_type.partition(".")[0] != "train":
                continue  # queries and evaluations: the per-message path, nothing to say
            try:
                key, item = self._prepare(index, inbound, context)
            except _NotBatched as why:
                self._tell(inbound, str(why))
                continue
            except Exception as err:  # noqa: BLE001 - its handler answers it as always
                self._tell(inbound, f"preparing it raised {type(err).__name__} (the "
                           "handler answers it)")
                continue
            groups.setdefault(key, []).append(item)
        replies: dict[int, Message] = {}
        models: dict[tuple, dict] = {}  # the models sent, decoded once per delivery
        for key, items in groups.items():
            items.sort(key=lambda p: (len(p.job.retained), p.index))  # similar steps together
            for start in range(0, len(items), self.batch_clients):
                replies.update(self._train(key, items[start:start + self.batch_clients],
                                           models))
        return replies

    def _tell(self, inbound: Message, reason: str) -> None:
        line = f"{inbound.metadata.message_type}: {reason}"
        if line not in self.told:
            self.told.add(line)
            log(logging.INFO, "batched engine: %s -> per-message path (said once)", line)

    def _prepare(self, index: int, inbound: Message, context: Context):
        kind = inbound.metadata.message_type
        action = TRAIN_TYPES.get(kind)
        if action is None:
            raise _NotBatched(f"action {kind.partition('.')[2]!r} is not local training "
                              f"(batched: {', '.join(sorted(TRAIN_TYPES))})")
        handler = self._handler(kind)
        marker = getattr(handler, "fedunlearn_action", None)
        if marker is None or marker[0] != action:
            raise _NotBatched("the ClientApp serves it with a handler of its own or with "
                              "Flower mods around fedunlearn's")
        view = resolve_view(marker[1], context)
        if view.train_fn is not None:
            raise _NotBatched("the node trains with its owner's train_fn")
        arrays = [r for r in inbound.content.values() if isinstance(r, ArrayRecord)]
        config = inbound.content.get(CONFIG_KEY)
        if len(arrays) != 1 or MODEL_KEY not in inbound.content or \
                not isinstance(config, ConfigRecord):
            raise _NotBatched(f"the message does not carry exactly one model "
                              f"({MODEL_KEY!r}) and a config")
        retained, forget = split_local(view, request_from_config(config, view.partition_id))
        device = resolve_device(view.device)
        job = ActionJob(view, config, {}, retained, forget, device)
        job.lr(), job.local_epochs()  # a missing setting: the handler's error reply
        key, template = self._template(view, str(device))
        reason = self._verdict(key, template, view, retained)
        if reason:
            raise _NotBatched(reason)
        self._check_record(arrays[0], template)
        return key, _Pending(index, inbound, int(context.node_id), job, arrays[0])

    def _handler(self, kind: str):
        app = self.client_app
        funcs = getattr(app, "_registered_funcs", None)
        if funcs is None or getattr(app, "_call", None) is not None:
            raise _NotBatched("the ClientApp is not made of registered handlers (a "
                              "client_fn app)")
        if getattr(app._lifespan, "__name__", "") != "_empty_lifespan":
            raise _NotBatched("the ClientApp has a lifespan of its own")
        category, _, action = kind.partition(".")
        return funcs.get(f"{category}.{action or DEFAULT_ACTION}")

    def _template(self, view, device: str) -> tuple[tuple, torch.nn.Module]:
        """The group of nodes this one trains with, and a model of their architecture:
        the harness's ``model_key`` (what determines ``model_fn()``'s architecture), else
        the model's class and its state's names, shapes and dtypes."""
        if view.model_key is not None:
            key = ("model_key", view.model_key, device)
            if key not in self.templates:
                self.templates[key] = view.new_model().to(device).train()
            return key, self.templates[key]
        model = view.new_model()
        key = (type(model).__module__, type(model).__qualname__,
               tuple((k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()),
               device)
        if key not in self.templates:
            self.templates[key] = model.to(device).train()
        return key, self.templates[key]

    @staticmethod
    def _check_record(record: ArrayRecord, template: torch.nn.Module) -> None:
        expected = {k: (tuple(v.shape), v.dtype) for k, v in template.state_dict().items()}
        got = {k: (tuple(a.shape), a.dtype) for k, a in record.items()}
        if list(got) != list(expected) or any(
                got[k][0] != expected[k][0] or got[k][1] != "float32" for k in got):
            raise _NotBatched("its model arrays are not the node model's parameters "
                              "(names, shapes, float32)")

    def _verdict(self, key: tuple, template, view, retained) -> str | None:
        if key not in self.verdicts:
            if not len(retained):
                return None  # no sample to probe with; nothing to train either
            example = read_samples(view.dataset, retained[:1])[0][0].to(key[-1])
            self.verdicts[key] = vectorisable(template, example)
        return self.verdicts[key]

    def _train(self, key: tuple, items: list[_Pending], models: dict[tuple, dict]
               ) -> Iterator[tuple[int, Message]]:
        jobs = [self._client_job(p, models) for p in items]
        results = train_batched(self.templates[key], jobs, torch.device(key[-1]))
        self.trained += len(items)
        for p, result in zip(items, results):
            with self.node_identity(p.dst):
                yield p.index, train_reply(p.inbound, record_from_state(result.state),
                                           result.num_examples, result.loss,
                                           result.samples_processed)

    def _client_job(self, p: _Pending, models: dict[tuple, dict]) -> ClientJob:
        job, view = p.job, p.job.view
        config = job.config
        return ClientJob(
            state=_start_state(p.record, models), dataset=view.dataset, indices=job.retained,
            epochs=job.local_epochs(), batch_size=view.batch_size, lr=job.lr(),
            momentum=view.momentum, seed=job.seed,
            clip_norm=float(config.get("clip-norm", 0.0)),
            weight_decay=float(config.get("weight-decay", 0.0)),
            transform=view.poison_transform(), samples=self._samples_of(p))

    def _samples_of(self, p: _Pending) -> tuple | None:
        """The node's training samples, read once per node and set of ids (the same
        tensors ``read_samples`` gives)."""
        ids, dataset = p.job.retained, p.job.view.dataset
        if not len(ids):
            return None
        cached = self.samples.get(p.dst)
        if cached is not None and cached[1] == id(dataset) and np.array_equal(cached[0], ids):
            return cached[2]
        samples = read_samples(dataset, ids)
        self.samples[p.dst] = (np.array(ids), id(dataset), samples)
        return samples


def _start_state(record: ArrayRecord, models: dict[tuple, dict]) -> dict[str, torch.Tensor]:
    """The tensors of a message's model, decoded once for every message that carries
    the same bytes (the engine's copies of one sent model share them; the chunk stacks
    them into tensors of its own, so the messages may share these)."""
    key = tuple((name, id(array.data)) for name, array in record.items())
    state = models.get(key)
    if state is None:
        state = models[key] = dict(state_dict(record))
    return state


__all__ = ["BATCHED_ACTIONS", "BatchedTraining", "check_batch_clients"]
