"""Unlearning requests: what a client asks to forget, how it travels, how it is checked.

A request has a scope:

* ``client``: all of the client's training data;
* ``class``: the client's training samples whose label is in ``classes``;
* ``instance``: the client's training samples with the given global ``sample_ids``.

The server collects requests with a ``query.unlearn`` message (:data:`QUERY_UNLEARN`).
Every ClientApp answers with the partition it holds and, if it wants something forgotten,
its request. The server binds each request to the node that sent it
(``Message.metadata.src_node_id``) and validates it with :func:`validate_request`; a bad
request is rejected with a logged reason and the run goes on without it.

Sample ids are indices into the dataset's training set (the same ids every client and
the server derive from the deterministic partitioning).

Parsing is strict (:mod:`.parsing`): a request record has exactly the fields of its scope,
with their exact types (``partition-id`` an int, ``classes`` and ``sample-ids`` lists of
distinct ints, at most :data:`MAX_CLASSES` / :data:`MAX_SAMPLE_IDS` of them), or it is
rejected with a reason naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord

from .parsing import WireError, exact_int, int_list, only_fields, require, str_list, text

from .protocol import (FORGET_PREFIX as CONFIG_PREFIX, INVALID_SCOPE, NODE_RECORD,  # noqa: F401
                       QUERY_CONFIG, QUERY_UNLEARN, RECEIPT_ACK, RECEIPT_RECORD,
                       REQUEST_RECORD, RUN_CONFIG_REQUESTS, WANT_REQUEST)

SCOPES = ("client", "class", "instance")

MAX_PARTITION_ID = 1_000_000
MAX_CLASSES = 10_000
"""Most labels one class-wise request may name."""
MAX_ID = 2**40
"""Largest magnitude of a class or sample id on the wire (safe for int64 arithmetic;
whether an id exists is checked against the data by :func:`validate_request`)."""
MAX_SAMPLE_IDS = 100_000
"""Most sample ids one instance-wise request may name (a larger forget set is better
served by a client-wise request)."""
MAX_INBOX_IDS = 1000
"""Most inbox request ids one reply may carry (requests merged into one); a node with
more pending sends the oldest this many and the rest at the next query."""
INBOX_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
MAX_ERROR_CHARS = 500
"""A node's own error report is cut to this many characters."""
REQUEST_FIELDS = ("scope", "partition-id", "classes", "sample-ids", "inbox-ids")


@dataclass(frozen=True)
class UnlearningRequest:
    """A request to forget data of one partition.

    Parameters
    ----------
    scope : str
        ``"client"``, ``"class"`` or ``"instance"``.
    partition_id : int or None
        The partition whose data is to be forgotten. A node may only name its own.
        ``None``: the node has no partition id (a deployment's node with private data);
        the request names the sending node's own data, bound by ``node_id``.
    classes : tuple of int
        Labels to forget (class-wise).
    sample_ids : tuple of int
        Global training-set indices to forget (instance-wise).
    node_id : int
        The node that sent the request; set by the server from the message metadata,
        never taken from the request's content.
    inbox_ids : tuple of str
        The ids of the node's inbox requests this request serves (empty when it came
        from the node-config or the run-config); the server's verdict is sent back to
        the node under these ids.
    """

    scope: str
    partition_id: int | None
    classes: tuple[int, ...] = ()
    sample_ids: tuple[int, ...] = ()
    node_id: int = field(default=0, compare=False)
    inbox_ids: tuple[str, ...] = field(default=(), compare=False)

    def to_config_record(self) -> ConfigRecord:
        """The wire form: only the fields the scope uses."""
        record = ConfigRecord({"scope": self.scope})
        if self.partition_id is not None:  # a node without a partition id sends none
            record["partition-id"] = int(self.partition_id)
        if self.scope == "class":
            record["classes"] = [int(c) for c in self.classes]
        if self.scope == "instance":
            record["sample-ids"] = [int(i) for i in self.sample_ids]
        if self.inbox_ids:
            record["inbox-ids"] = list(self.inbox_ids)
        return record

    @classmethod
    def from_config_record(cls, record: Mapping, node_id: int = 0) -> UnlearningRequest:
        """Parse a request record strictly; raises :class:`~fedunlearn.parsing.WireError`
        (a ``ValueError``) naming the field, the value and what is allowed."""
        try:
            return cls._parse(record, node_id)
        except WireError as err:
            raise err.with_prefix("malformed request record: ") from None

    @classmethod
    def _parse(cls, record: Mapping, node_id: int) -> UnlearningRequest:
        if not isinstance(record, Mapping):
            raise WireError("request", record, "expected a record")
        only_fields(record, REQUEST_FIELDS, "request")
        scope = text("scope", require(record, "scope", "expected one of " + ", ".join(SCOPES)),
                     max_len=16, choices=SCOPES)
        partition_id = None  # absent: a node without a partition id (its own data)
        if "partition-id" in record:
            partition_id = exact_int("partition-id", record["partition-id"], lo=0,
                                     hi=MAX_PARTITION_ID)
        classes: tuple[int, ...] = ()
        sample_ids: tuple[int, ...] = ()
        if "classes" in record:
            if scope != "class":
                raise WireError("classes", record["classes"],
                                f"only a class-wise request names classes (scope is {scope!r})")
            classes = int_list("classes", record["classes"], MAX_CLASSES, lo=-MAX_ID,
                               hi=MAX_ID, show_range=False)
        if "sample-ids" in record:
            if scope != "instance":
                raise WireError("sample-ids", record["sample-ids"],
                                f"only an instance-wise request names sample ids (scope is "
                                f"{scope!r})")
            sample_ids = int_list("sample-ids", record["sample-ids"], MAX_SAMPLE_IDS,
                                  lo=-MAX_ID, hi=MAX_ID, show_range=False)
        inbox_ids: tuple[str, ...] = ()
        if "inbox-ids" in record:
            inbox_ids = str_list("inbox-ids", record["inbox-ids"], MAX_INBOX_IDS, 64,
                                 INBOX_ID_PATTERN)
        return cls(scope=scope, partition_id=partition_id, classes=classes,
                   sample_ids=sample_ids, node_id=node_id, inbox_ids=inbox_ids)

    def describe(self) -> dict:
        """A JSON-friendly summary (used in results files)."""
        out: dict = {"scope": self.scope}
        if self.partition_id is not None:
            out["partition_id"] = self.partition_id
        if self.scope == "class":
            out["classes"] = list(self.classes)
        if self.scope == "instance":
            out["num_samples"] = len(self.sample_ids)
        return out

    def digest(self) -> str:
        """SHA-256 of what the request names (scope, partition (``null`` for a node
        without one), classes, sorted ids): proves which forget set was served without
        recording the ids themselves."""
        partition = None if self.partition_id is None else int(self.partition_id)
        blob = json.dumps([self.scope, partition, sorted(self.classes),
                           sorted(self.sample_ids)], separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


def merge_conflict(earlier: UnlearningRequest, later: UnlearningRequest) -> str | None:
    """Why ``later`` cannot be served on top of ``earlier`` for the same node (``None``:
    it can). A client-wise request covers everything; class- and instance-wise requests
    merge with their own scope only (one forget set per node is echoed in training)."""
    if earlier.scope == "client":
        return "the node's data was already forgotten client-wise in this federation"
    if later.scope in ("client", earlier.scope):
        return None
    what = (f"classes {list(earlier.classes)}" if earlier.scope == "class"
            else f"{len(earlier.sample_ids)} sample id(s)")
    article = "an" if later.scope[0] in "aeiou" else "a"
    return (f"the node already forgets {what} ({earlier.scope}-wise) in this federation; "
            f"{article} {later.scope}-wise request on top of it is not supported: file a "
            f"{earlier.scope}-wise or a client-wise request")


def merge_requests(earlier: UnlearningRequest, later: UnlearningRequest) -> UnlearningRequest:
    """One node's forget set after ``later`` is served on top of ``earlier``: the union
    (client-wise covers everything). Raises ``ValueError`` for scopes that do not merge
    (:func:`merge_conflict`)."""
    if earlier.scope == "client" or later.scope == "client":
        base = later if later.scope == "client" else earlier
        return dataclasses.replace(base, inbox_ids=tuple(dict.fromkeys(
            earlier.inbox_ids + later.inbox_ids)))
    reason = merge_conflict(earlier, later)
    if reason is not None:
        raise ValueError(reason)
    return dataclasses.replace(
        later, classes=tuple(sorted(set(earlier.classes) | set(later.classes))),
        sample_ids=tuple(sorted(set(earlier.sample_ids) | set(later.sample_ids))),
        inbox_ids=tuple(dict.fromkeys(earlier.inbox_ids + later.inbox_ids)))


def forget_indices(request: UnlearningRequest, train_indices: np.ndarray,
                   labels: np.ndarray) -> np.ndarray:
    """The forget set of ``request`` inside a client's training split (global ids).

    ``labels`` are the labels of the whole training set, indexed by global id.
    """
    train_indices = np.asarray(train_indices, dtype=np.int64)
    if request.scope == "client":
        return train_indices.copy()
    if request.scope == "class":
        mask = np.isin(labels[train_indices], np.asarray(request.classes, dtype=np.int64))
        return train_indices[mask]
    if request.scope == "instance":
        return np.intersect1d(train_indices, np.asarray(request.sample_ids, dtype=np.int64))
    raise ValueError(f"unknown scope {request.scope!r}; allowed: {', '.join(SCOPES)}")


def retained_indices(request: UnlearningRequest | None, train_indices: np.ndarray,
                     labels: np.ndarray) -> np.ndarray:
    """The client's training split minus the forget set of ``request`` (if any)."""
    train_indices = np.asarray(train_indices, dtype=np.int64)
    if request is None:
        return train_indices
    return np.setdiff1d(train_indices, forget_indices(request, train_indices, labels))


def validate_request(request: UnlearningRequest, sender_partition: int,
                     node_partitions: Mapping[int, int], train_indices_of,
                     labels: np.ndarray, num_classes: int) -> str | None:
    """Check one request; return the reason it is rejected, or ``None`` if valid.

    Parameters
    ----------
    request : UnlearningRequest
        The request, with ``node_id`` set to the sending node.
    sender_partition : int
        The partition the sending node holds.
    node_partitions : Mapping[int, int]
        node id -> partition id, for every node that answered the query.
    train_indices_of : callable
        ``partition_id -> np.ndarray`` of that partition's training ids.
    labels : np.ndarray
        Labels of the whole training set.
    num_classes : int
        Size of the label set.
    """
    reason = check_request_shape(request, sender_partition, node_partitions, num_classes)
    if reason is not None:
        return reason
    train_ids = np.asarray(train_indices_of(sender_partition), dtype=np.int64)
    if request.scope == "instance":
        outside = np.setdiff1d(np.asarray(request.sample_ids, dtype=np.int64), train_ids)
        if outside.size:
            return ids_not_held_reason(outside[:10].tolist(), int(outside.size),
                                       sender_partition, int(train_ids.size))
    if forget_indices(request, train_ids, labels).size == 0:
        return empty_forget_reason(request)
    return None


def check_request_shape(request: UnlearningRequest, sender_partition: int,
                        node_partitions: Mapping[int, int], num_classes: int | None
                        ) -> str | None:
    """The checks that need no data: the scope, whose data the request names, the
    classes against the label set, an instance-wise request's ids not empty."""
    node = request.node_id
    if request.scope not in SCOPES:
        return f"unknown scope {request.scope!r}; allowed: {', '.join(SCOPES)}"
    if request.partition_id is not None and request.partition_id != sender_partition:
        owners = [n for n, p in node_partitions.items() if p == request.partition_id]
        owner = f"node {owners[0]}" if owners else "no node of this federation"
        return (
            f"node {node} (partition {sender_partition}) asked to forget partition "
            f"{request.partition_id}, which belongs to {owner}: a node can only have "
            "its own data forgotten"
        )
    if request.scope == "class":
        if not request.classes:
            return "class-wise request names no classes; set the classes to forget"
        bad = [c for c in request.classes if c < 0 or (num_classes and c >= num_classes)]
        if bad:
            more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
            return (f"class(es) {bad[:10]}{more} outside the label set "
                    f"0..{(num_classes or 1) - 1}")
    if request.scope == "instance" and not request.sample_ids:
        return "instance-wise request names no sample ids: the forget set is empty"
    return None


def ids_not_held_reason(shown_ids, count: int, partition: int | None, num_train: int) -> str:
    """Why an instance-wise request naming ids its node does not hold is rejected
    (``partition=None``: a node without a partition id)."""
    shown = ", ".join(str(i) for i in shown_ids[:10])
    more = f" (and {count - 10} more)" if count > 10 else ""
    holder = "the node" if partition is None else f"partition {partition}"
    return (f"sample id(s) {shown}{more} are not in {holder}'s training split "
            f"({num_train} samples)")


def empty_forget_reason(request: UnlearningRequest) -> str:
    what = {"client": "it has no training data",
            "class": f"it has no training samples of class(es) {list(request.classes)}",
            "instance": "no sample id matched"}[request.scope]
    return f"empty forget set: {what}"


def request_to_config(request: UnlearningRequest) -> dict:
    """Config entries that tell a node what to leave out when it trains or evaluates.

    The server echoes a node's *accepted* request in every train/evaluate config; the
    node filters locally, so its forget data never leaves it."""
    out = {CONFIG_PREFIX + "scope": request.scope}
    if request.scope == "class":
        out[CONFIG_PREFIX + "classes"] = [int(c) for c in request.classes]
    if request.scope == "instance":
        out[CONFIG_PREFIX + "sample-ids"] = [int(i) for i in request.sample_ids]
    return out


def request_from_config(config: Mapping, partition_id: int | None) -> UnlearningRequest | None:
    """The node's accepted request as echoed in a train/evaluate config (inverse of
    :func:`request_to_config`); ``None`` when the config carries none. Parsed as
    strictly as a request: a malformed echo raises ``ValueError``."""
    scope = config.get(CONFIG_PREFIX + "scope")
    if not scope:
        return None
    record: dict = {"scope": scope}
    if partition_id is not None:
        record["partition-id"] = partition_id
    for key in ("classes", "sample-ids"):
        if CONFIG_PREFIX + key in config:
            record[key] = config[CONFIG_PREFIX + key]
    return UnlearningRequest.from_config_record(record)
