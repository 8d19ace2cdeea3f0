"""What a ClientApp knows about its node: config, data, partition, request, split.

A node learns which partition it holds from its node-config (``partition-id``,
``num-partitions``; the simulation engine sets both). It asks to be forgotten, in this
order of precedence, when

* its request inbox (node-config ``inbox``, see :mod:`fedunlearn.inbox`) holds pending
  requests filed by its data owner with ``fedunlearn request file``;
* its node-config has ``forget-scope`` (a real SuperNode: ``forget-scope``,
  ``forget-classes``, ``forget-sample-ids``, ``forget-fraction``);
* the view that built it carries a planned request (``forget_spec``: the experiment
  harness's run-config ``forget.*`` for this partition) and the server allows run-config
  requests (simulations only: on a deployment a request comes from the node).

Views are built by whoever owns the node's data: :func:`fedunlearn.client.attach` over
the user's data, the experiment harness over a partition of a public data set
(:mod:`fedunlearn.harness.node`). Every handler takes ``view_for(context) -> NodeView``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from logging import WARNING

import numpy as np
from flwr.app import Context
from ..logs import log

from ..inbox import FINAL, INBOX_KEY, Inbox, InboxRequest
from ..requests import UnlearningRequest, forget_indices, validate_request
from ..parsing import parse_int_list


@dataclass
class NodeView:
    """What one node needs: its data, its model, its local training settings.

    ``dataset`` is any map-style dataset yielding ``(x, y)`` (a plugin node: the user's
    data read through :mod:`.user_data`); ``train_ids`` and
    ``val_ids`` are positions in it (the harness: global ids of a public training set; a
    plugin node: its own training set, its validation set appended after it);
    ``labels`` holds the label of every position; ``partition_id`` is the node-config's
    ``partition-id`` (``None``: a node with private data has none; its requests bind to
    the node that sends them); :attr:`draw_id` seeds per-node draws.

    What only the experiment harness sets: ``partitions`` (the node holds one of that many
    partitions of a data set the server knows, and reports it), ``transform`` (applied
    to the node's training samples: a planted backdoor), ``forget_spec`` (the request
    the run-config plans for this node: ``scope``, ``classes``, ``sample_ids``,
    ``fraction``, ``data_of``) and ``forget_fraction`` (an instance-wise request's
    default share).
    """

    dataset: object
    train_ids: np.ndarray
    val_ids: np.ndarray
    label_array: np.ndarray
    model_fn: object
    num_classes: int
    partition_id: int | None = 0
    batch_size: int = 32
    momentum: float = 0.9
    seed: int = 0
    device: str = "auto"
    partitions: int | None = None
    reports_partition: bool = False
    transform: object = None
    forget_spec: object = None
    forget_fraction: float = 0.1
    train_fn: object = None
    evaluate_fn: object = None
    sample_ids: np.ndarray | None = None
    """The data owner's id of each training sample (``None``: ids are positions)."""
    user_train: object = None
    """The training set as the user holds it (:class:`.user_data.UserData`): ``train_fn``
    gets batches of it, in the user's format (``None``: batches of ``dataset``)."""
    node_key: int = 0
    """Seeds this node's draws when it has no ``partition_id``: a stable number from its
    node-config (:func:`fedunlearn.client.plugin.node_key`)."""
    model_key: tuple | None = None
    """What determines ``model_fn()``'s architecture when fedunlearn builds it (the
    harness: model name and data shape), so that a node may load a message's model into
    an instance it built before (:mod:`.actions`); ``None``: always a fresh one."""

    @property
    def draw_id(self) -> int:
        """The number that seeds this node's random draws (local shuffles, membership
        samples, a forget fraction's ids): its partition id, else :attr:`node_key`."""
        return self.partition_id if self.partition_id is not None else self.node_key

    def train_indices(self) -> np.ndarray:
        return self.train_ids

    def val_indices(self) -> np.ndarray:
        return self.val_ids

    def labels(self) -> np.ndarray:
        return self.label_array

    def num_partitions(self) -> int | None:
        return self.partitions

    def poison_transform(self):
        """The transform applied to this node's training samples (the harness's planted
        backdoor), or ``None``."""
        return self.transform

    def new_model(self):
        return self.model_fn()

    def positions_of(self, ids) -> tuple[np.ndarray, list[int]]:
        """Positions of the data owner's sample ``ids`` in the training split, and the
        ids this node does not hold."""
        ids = np.asarray(list(ids), dtype=np.int64)
        if self.sample_ids is None:
            held = np.isin(ids, self.train_ids)
            return ids[held], [int(i) for i in ids[~held]]
        lookup = {int(s): int(p) for s, p in zip(self.sample_ids, self.train_ids)}
        missing = [int(i) for i in ids if int(i) not in lookup]
        return np.asarray(sorted(lookup[int(i)] for i in ids if int(i) in lookup),
                          dtype=np.int64), missing


def resolve_view(view_for, context: Context) -> NodeView:
    """``view_for(context)``: the node's :class:`NodeView`. Every handler needs one."""
    if view_for is None:
        raise TypeError("a fedunlearn client handler needs view_for(context) -> NodeView: "
                        "fedunlearn.client.attach() passes one over your data; the "
                        "experiment harness passes fedunlearn.harness.node.harness_view")
    return view_for(context)


def own_request(view: NodeView, node_config, run_config_requests: bool = True,
                rejected: list | None = None) -> UnlearningRequest | None:
    """The request this node makes: from its inbox, its node-config or (when
    ``run_config_requests``, i.e. in a simulation) the run-config's ``forget.*``.
    Inbox requests the node itself refuses go to ``rejected`` (see :func:`inbox_request`)."""
    spec, pid = view.forget_spec, view.partition_id
    if INBOX_KEY in node_config:
        request = inbox_request(view, node_inbox(node_config), rejected)
        if request is not None:
            return request
    if "forget-scope" in node_config:
        scope = str(node_config["forget-scope"]).strip().lower()
        classes = parse_int_list(node_config.get("forget-classes", ""), "forget-classes")
        ids = parse_int_list(node_config.get("forget-sample-ids", ""), "forget-sample-ids")
        fraction = float(node_config.get("forget-fraction", view.forget_fraction))
        data_of = int(node_config.get("forget-data-of", -1))
    elif run_config_requests and spec is not None:
        f = spec
        scope, classes, ids, fraction, data_of = f.scope, f.classes, f.sample_ids, f.fraction, f.data_of
    else:
        return None
    if scope == "instance" and ids and view.sample_ids is not None:
        positions, missing = view.positions_of(ids)
        if missing:
            shown = ", ".join(str(i) for i in missing[:10])
            more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
            raise ValueError(f"sample id(s) {shown}{more} are not in this node's training "
                             f"set ({len(view.train_ids)} samples)")
        ids = tuple(int(i) for i in positions)
    if scope == "instance" and not ids:
        ids = tuple(sample_fraction(view.train_indices(), fraction,
                                    seed=view.seed + view.draw_id))
    return UnlearningRequest(scope=scope, partition_id=data_of if data_of >= 0 else pid,
                             classes=tuple(classes) if scope == "class" else (),
                             sample_ids=tuple(ids) if scope == "instance" else ())


class RequestProblem(ValueError):
    """A node's own request that it cannot make, with the inbox requests it came from
    (their receipts carry the reason)."""

    def __init__(self, message: str, inbox_ids: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.inbox_ids = tuple(inbox_ids)


def node_inbox(node_config) -> Inbox:
    """The inbox named by the node-config's ``inbox`` (created when missing)."""
    value = node_config[INBOX_KEY]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"node-config inbox={value!r}: expected the inbox folder's absolute "
                         "path as a string, e.g. inbox=\"/srv/fedunlearn/inbox\"")
    return Inbox(value.strip())


def inbox_request(view: NodeView, inbox: Inbox,
                  rejected: list | None = None) -> UnlearningRequest | None:
    """One request serving the inbox's pending batch (see :meth:`Inbox.pending_batch`),
    carrying their inbox ids; ``None`` when nothing (valid) is pending. When several are
    pending, those that fail the node's own check go to ``rejected`` as
    ``(inbox id, reason)``."""
    scope, batch, problems = inbox.pending_batch()
    for problem in problems:  # shown by `fedunlearn request list` too
        log(WARNING, "inbox %s: unreadable request file %s", inbox.root, problem)
        if rejected is not None and _unanswered(inbox, problem.request_id):
            # The server rejects it by id, so the data owner's receipt says why.
            rejected.append((problem.request_id, f"unreadable request file: {problem.reason}"))
    if not batch:
        return None
    if len(batch) > 1:
        # Several requests to merge: the node checks each on its own data, so a bad one
        # is rejected on its own receipt and does not sink the others. (A single request
        # goes out as it is and gets the server's verdict.)
        good = []
        for request in batch:
            try:
                reason = local_check(view, _merged(view, scope, [request]))
            except RequestProblem as err:
                reason = str(err)
            if reason is None:
                good.append(request)
            elif rejected is not None:
                rejected.append((request.id, reason))
        batch = good
        if not batch:
            return None
    return _merged(view, scope, batch)


def _unanswered(inbox: Inbox, request_id: str | None) -> bool:
    """Whether an unreadable request file still needs a verdict: it has an inbox id and
    no final receipt (a file that stays unreadable is rejected once, not at every
    query)."""
    if request_id is None:
        return False
    try:
        return not any(e.get("status") in FINAL for e in inbox.events(request_id))
    except (OSError, ValueError):
        return True


def local_check(view: NodeView, request: UnlearningRequest) -> str | None:
    """A plugin node's own check of its request against its own data (the server never
    sees the data); ``None`` when valid."""
    return validate_request(request, request.partition_id, {}, lambda _: view.train_ids,
                            view.labels(), view.num_classes)


def _merged(view: NodeView, scope: str, batch: list[InboxRequest]) -> UnlearningRequest:
    """One request serving ``batch`` (inbox requests of one scope)."""
    classes: set[int] = set()
    ids: set[int] = set()
    for request in batch:
        classes.update(request.classes)
        ids.update(inbox_sample_ids(view, request))
    if scope == "instance" and view.sample_ids is not None:
        # The data owner's ids (attach(sample_ids=...)) -> positions in the training set.
        filed = {i for r in batch for i in r.sample_ids}
        positions, missing = view.positions_of(sorted(filed))
        if missing:
            shown = ", ".join(str(i) for i in missing[:10])
            more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
            raise RequestProblem(
                f"sample id(s) {shown}{more} are not in this node's training set "
                f"({len(view.train_ids)} samples)", tuple(r.id for r in batch))
        ids = (ids - filed) | {int(p) for p in positions}
    return UnlearningRequest(
        scope=scope, partition_id=view.partition_id,
        classes=tuple(sorted(classes)) if scope == "class" else (),
        sample_ids=tuple(sorted(ids)) if scope == "instance" else (),
        inbox_ids=tuple(r.id for r in batch))


def inbox_sample_ids(view: NodeView, request: InboxRequest) -> tuple[int, ...]:
    """An instance-wise inbox request's ids: as filed, or its ``fraction`` of this
    node's training split (seeded by the request id, so every job picks the same)."""
    if request.scope != "instance":
        return ()
    if request.sample_ids:
        return request.sample_ids
    seed = view.seed + int(hashlib.sha256(request.id.encode()).hexdigest()[:8], 16)
    return tuple(int(i) for i in sample_fraction(view.train_indices(), request.fraction or 0.0,
                                                 seed=seed))


def sample_fraction(indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A deterministic random ``fraction`` of ``indices`` (sorted; empty if 0)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"forget fraction {fraction} must be in [0, 1]")
    n = int(round(fraction * len(indices)))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(np.asarray(indices), size=n, replace=False))


def split_local(view: NodeView, request: UnlearningRequest | None) -> tuple[np.ndarray, np.ndarray]:
    """(retained, forget) global ids of this node's training split."""
    train = view.train_indices()
    if request is None:
        return train, np.zeros(0, dtype=np.int64)
    forget = forget_indices(request, train, view.labels())
    return np.setdiff1d(train, forget), forget
