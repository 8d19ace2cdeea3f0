"""The in-process engine: a Flower app's ServerApp and ClientApp in one process.

:class:`LocalGrid` is a Flower :class:`~flwr.serverapp.Grid` that delivers each message
to the ClientApp's real handlers in the calling process: one
:class:`~flwr.app.Context` per node (its node-config, and its state kept across
messages, as in Flower's simulation), message ids and metadata set as the SuperLink sets
them, a handler that raises answered with an error reply
(``CLIENT_APP_RAISED_EXCEPTION``), message contents copied so that no node sees another
node's (or the server's) objects. No Ray, no SuperLink, no process per message: the
strategies, the client actions, the checks of the verified grid and the metering are
the same code as under ``flwr run``.

:func:`run_app` runs a whole Flower app this way (its ``[tool.flwr.app.components]``
and run-config defaults from its ``pyproject.toml``), :func:`local_run` is the
launcher the command line and the Hydra runner use (``--engine local``).

Choose ``flwr run`` (the default engine) for GPU actors, Ray clusters and anything that
needs processes per client; choose the in-process engine for sweeps on one machine.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import random
import sys
import time
import traceback
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from .arrays import copy_record
from .batching import BatchedTraining, check_batch_clients
from .logs import log

ENGINES = ("flower", "local")
"""``flower``: ``flwr run`` on Flower's simulation engine (Ray); ``local``: in-process."""


class LocalGrid(Grid):
    """A federation of ``num_nodes`` nodes served by ``client_app`` in this process.

    Parameters
    ----------
    client_app : flwr.clientapp.ClientApp
        The app whose handlers answer (any callable ``(Message, Context) -> Message``).
    num_nodes : int
        Nodes; node ``i`` has node-config ``partition-id=i``, ``num-partitions=num_nodes``
        (as Flower's simulation gives them).
    run_config : mapping
        The run-config every node's Context carries.
    node_configs : mapping, optional
        Extra node-config pairs by partition id (e.g. ``{1: {"inbox": "/abs/inbox"}}``).
    run_id : int, optional
        The run id (default: a random one); node ids are drawn from it, so a run id
        fixes them.
    batch_clients : int, optional
        0 (the default): every message is delivered on its own. ``N > 0``: the batched
        mode: the plain train messages of one delivery are trained together, at most
        ``N`` clients per pass (:mod:`fedunlearn.batching`); their replies are the
        messages the handler would have sent.
    """

    def __init__(self, client_app, num_nodes: int, run_config: Mapping[str, Any],
                 node_configs: Mapping[int, Mapping[str, Any]] | None = None,
                 run_id: int | None = None, batch_clients: int = 0) -> None:
        if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
            raise ValueError(f"num_nodes={num_nodes!r}: expected a positive integer")
        extra = dict(node_configs or {})
        bad = sorted(set(extra) - set(range(num_nodes)), key=str)
        if bad:
            raise ValueError(f"node_configs names partitions {bad} outside 0..{num_nodes - 1}")
        self.client_app = client_app
        self.batched = BatchedTraining(client_app, batch_clients, _node_identity)
        self._run = Run.create_empty(int(run_id if run_id is not None
                                         else random.getrandbits(63)))
        draw = random.Random(self._run.run_id)
        ids: list[int] = []
        while len(ids) < num_nodes:  # distinct, never the SuperLink's own id
            node = draw.getrandbits(63)
            if node > SUPERLINK_NODE_ID and node not in ids:
                ids.append(node)
        self.contexts: dict[int, Context] = {
            node: Context(run_id=self._run.run_id, node_id=node,
                          node_config={"partition-id": i, "num-partitions": num_nodes,
                                       **extra.get(i, {})},
                          state=RecordDict(), run_config=dict(run_config))
            for i, node in enumerate(ids)}
        self._replies: dict[str, Message] = {}
        self.messages_delivered = 0

    @property
    def batch_clients(self) -> int:
        """The batched mode's chunk (0: every message on its own): part of what a
        pretrained model depends on (batched sums run in another float order)."""
        return self.batched.batch_clients

    # -- Grid ---------------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        inbound = [(msg, self._inbound(msg, str(uuid.uuid4()))) for msg in messages]
        batched = self.batched.deliver([
            (i, m, self.contexts[m.metadata.dst_node_id]) for i, (_, m) in enumerate(inbound)
            if m.metadata.dst_node_id in self.contexts])
        self.messages_delivered += len(batched)
        for i, (_, m) in enumerate(inbound):
            reply = batched.get(i)
            self._replies[m.metadata.message_id] = reply if reply is not None else \
                self._deliver(m)
        return [m.metadata.message_id for _, m in inbound]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in message_ids if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(list(self.push_messages(messages))))

    # -- delivery -----------------------------------------------------------------------
    def _inbound(self, msg: Message, message_id: str) -> Message:
        """The message as node ``dst`` receives it (metadata as the SuperLink sets it, a
        copy of the content); the sent message gets its id."""
        dst = int(msg.metadata.dst_node_id)
        sent = msg.metadata
        md = Metadata(run_id=self._run.run_id, message_id=message_id,
                      src_node_id=SUPERLINK_NODE_ID, dst_node_id=dst, reply_to_message_id="",
                      group_id=sent.group_id, created_at=time.time(), ttl=sent.ttl,
                      message_type=sent.message_type)
        sent.__dict__["_message_id"] = message_id  # as the SuperLink sets it
        return Message(copy_content(msg.content), metadata=md)

    def _deliver(self, inbound: Message) -> Message:
        """The reply of node ``dst``'s ClientApp to ``inbound`` (an error reply when it
        raises or the node is unknown)."""
        msg, dst = inbound, int(inbound.metadata.dst_node_id)
        if dst not in self.contexts:
            return Message(Error(code=ErrorCode.NODE_UNAVAILABLE,
                                 reason=f"node {dst} is not part of this federation"),
                           reply_to=inbound)
        self.messages_delivered += 1
        with _node_identity(dst):
            try:
                reply = self.client_app(inbound, self.contexts[dst])
            except Exception as err:  # noqa: BLE001 - Flower turns it into an error reply
                log(logging.ERROR, "ClientApp of node %d raised on %s: %s", dst,
                    msg.metadata.message_type, traceback.format_exc())
                return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                     reason=f"{type(err).__name__}: {err}"),
                               reply_to=inbound)
        if not isinstance(reply, Message):
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                 reason=f"the ClientApp returned {type(reply).__name__}, "
                                 "not a Message"), reply_to=inbound)
        return reply


def copy_content(content: RecordDict) -> RecordDict:
    """A copy of a message's content that shares nothing mutable with it: new records,
    new Arrays (an Array's bytes are immutable and shared), lists in config and metric
    records copied. What ``copy.deepcopy`` gives, without walking every object."""
    out = RecordDict()
    for key, record in content.items():
        if isinstance(record, ArrayRecord):
            out[key] = copy_record(record)  # new Arrays, the same (immutable) bytes
        elif isinstance(record, (ConfigRecord, MetricRecord)):
            out[key] = type(record)({k: list(v) if isinstance(v, list) else v
                                     for k, v in record.items()})
        else:
            out[key] = copy.deepcopy(record)
    return out


@contextlib.contextmanager
def _node_identity(node_id: int) -> Iterator[None]:
    """The process's task identity while a node's handler runs (messages it builds carry
    it, as in a ClientApp process)."""
    saved = TaskIdentity._node_id
    TaskIdentity.node_id = node_id
    try:
        yield
    finally:
        TaskIdentity._node_id = saved


@contextlib.contextmanager
def server_identity(run_id: int) -> Iterator[None]:
    """The ServerApp's task identity for ``run_id`` while the block runs (messages the
    server side builds carry it, as in Flower's ServerApp process): for code that drives
    strategies on a :class:`LocalGrid` itself instead of through :func:`run_app`."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def project_root() -> Path:
    """The Flower App directory (the one holding ``pyproject.toml``)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").exists() and (parent / "flower_apps").is_dir():
            return parent
    return Path.cwd()


def flatten(table: Mapping, prefix: str = "") -> dict:
    """Nested tables -> dotted keys, as Flower flattens run-config tables."""
    out: dict = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


_server_identity = server_identity  # the former private name


def load_components(app: str | Path) -> tuple[Any, Any, dict]:
    """The ServerApp, the ClientApp and the flattened run-config defaults of the Flower
    app in folder ``app`` (its ``pyproject.toml``)."""
    import tomllib

    root = Path(app).resolve()
    data = tomllib.loads((root / "pyproject.toml").read_text())
    try:
        flwr_app = data["tool"]["flwr"]["app"]
        components = flwr_app["components"]
        refs = components["serverapp"], components["clientapp"]
    except KeyError as err:
        raise ValueError(f"{root / 'pyproject.toml'} has no [tool.flwr.app.components] "
                         f"{err} (serverapp/clientapp = \"module:attribute\")") from None
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    loaded = []
    for ref in refs:
        module, _, attr = str(ref).partition(":")
        if not module or not attr:
            raise ValueError(f"component {ref!r}: expected \"module:attribute\"")
        loaded.append(getattr(importlib.import_module(module), attr))
    return loaded[0], loaded[1], flatten(flwr_app.get("config", {}))


def run_app(run_config: Mapping[str, Any], num_nodes: int, app: str | Path | None = None,
            node_configs: Mapping[int, Mapping[str, Any]] | None = None,
            run_id: int | None = None, batch_clients: int = 0) -> LocalGrid:
    """Run the Flower app in ``app`` (default: fedunlearn's own) in this process on
    ``num_nodes`` nodes, with ``run_config`` over the app's defaults; returns the grid
    (its nodes' contexts hold their state). ``batch_clients``: see :class:`LocalGrid`.
    Raises what the ServerApp raises."""
    server_app, client_app, defaults = load_components(app or project_root())
    merged = {**defaults, **dict(run_config)}
    grid = LocalGrid(client_app, num_nodes, merged, node_configs, run_id, batch_clients)
    context = Context(run_id=grid.run.run_id, node_id=0, node_config={},
                      state=RecordDict(), run_config=merged)
    with server_identity(grid.run.run_id):
        server_app(grid, context)
    return grid


class _Tee(logging.Handler):
    """Flower's log records to the echo stream and the job's log file, as ``flwr run
    --stream`` shows them."""

    def __init__(self, streams) -> None:
        super().__init__(logging.INFO)
        self.streams = [s for s in streams if s is not None]
        self.setFormatter(logging.Formatter("%(levelname)-8s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record) + "\n"
        for stream in self.streams:
            stream.write(line)
            stream.flush()


def local_run(run_config: Mapping, *, num_supernodes: int = 10, num_cpus: int = 1,
              num_gpus: float = 0.0, app: str | Path | None = None,
              log_file: str | Path | None = None, echo: bool = True,
              finished_marker=None, batch_clients: int = 0) -> int:
    """:func:`fedunlearn.launch.flwr_run`'s counterpart on the in-process engine: run
    the job, its log to stdout (``echo``) and ``log_file``; return 0, or 1 when the
    ServerApp raised (its traceback in the log). ``num_cpus`` is the number of torch
    threads the job runs with (what a Ray actor with that many CPUs gets; one is fastest
    for small models and leaves the machine's other cores alone); ``num_gpus`` does not
    apply: the job uses the run-config's ``device`` in this process. ``batch_clients``:
    the batched mode's chunk (0: off; see :class:`LocalGrid`)."""
    del finished_marker  # the ServerApp returns or raises: nothing to infer
    check_batch_clients(batch_clients)
    if isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1:
        raise ValueError(f"num_cpus={num_cpus!r}: expected a positive integer (the threads "
                         "the nodes' handlers use, as a Ray actor's CPUs)")
    if num_gpus:
        log(logging.WARNING, "--num-gpus=%s does not apply to the in-process engine: "
            "the job uses device=%s in this process", num_gpus,
            run_config.get("device", "auto"))
    log_stream = open(log_file, "a") if log_file else None  # noqa: SIM115
    handler = _Tee([sys.stdout if echo else None, log_stream])
    console = [h for h in FLOWER_LOGGER.handlers if not isinstance(h, logging.FileHandler)]
    for h in console:
        FLOWER_LOGGER.removeHandler(h)
    FLOWER_LOGGER.addHandler(handler)
    # The job's lines go to the echo stream and the log file only, not also to handlers
    # an embedding program put on the root logger (Hydra's job logging).
    propagate, FLOWER_LOGGER.propagate = FLOWER_LOGGER.propagate, False
    threads = torch.get_num_threads()
    torch.set_num_threads(num_cpus)  # as Ray gives an actor its CPUs
    try:
        grid = run_app(run_config, num_supernodes, app, batch_clients=batch_clients)
        if batch_clients:
            log(logging.INFO, "batched engine: %d of %d messages trained batched",
                grid.batched.trained, grid.messages_delivered)
        return 0
    except Exception:  # noqa: BLE001 - the job failed: say so, as flwr run would
        log(logging.ERROR, "The ServerApp raised:\n%s", traceback.format_exc())
        return 1
    finally:
        torch.set_num_threads(threads)
        FLOWER_LOGGER.propagate = propagate
        FLOWER_LOGGER.removeHandler(handler)
        for h in console:
            FLOWER_LOGGER.addHandler(h)
        if log_stream is not None:
            log_stream.close()
