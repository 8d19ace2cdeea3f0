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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord

QUERY_UNLEARN = "query.unlearn"
"""Message type the server sends to collect unlearning requests."""

SCOPES = ("client", "class", "instance")

NODE_RECORD = "node"
REQUEST_RECORD = "request"

CONFIG_PREFIX = "forget."
"""Prefix of the config entries that echo a node's accepted request back to it."""


@dataclass(frozen=True)
class UnlearningRequest:
    """A request to forget data of one partition.

    Parameters
    ----------
    scope : str
        ``"client"``, ``"class"`` or ``"instance"``.
    partition_id : int
        The partition whose data is to be forgotten. A node may only name its own.
    classes : tuple of int
        Labels to forget (class-wise).
    sample_ids : tuple of int
        Global training-set indices to forget (instance-wise).
    node_id : int
        The node that sent the request; set by the server from the message metadata,
        never taken from the request's content.
    """

    scope: str
    partition_id: int
    classes: tuple[int, ...] = ()
    sample_ids: tuple[int, ...] = ()
    node_id: int = field(default=0, compare=False)

    def to_config_record(self) -> ConfigRecord:
        record = ConfigRecord({"scope": self.scope, "partition-id": int(self.partition_id)})
        if self.classes:
            record["classes"] = [int(c) for c in self.classes]
        if self.sample_ids:
            record["sample-ids"] = [int(i) for i in self.sample_ids]
        return record

    @classmethod
    def from_config_record(cls, record: Mapping, node_id: int = 0) -> UnlearningRequest:
        """Parse a request record; raises ``ValueError`` on a malformed one."""
        try:
            scope = str(record["scope"])
            partition_id = int(record["partition-id"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed request record {dict(record)!r}: {err}") from None
        classes = record.get("classes", [])
        sample_ids = record.get("sample-ids", [])
        classes = [classes] if isinstance(classes, int) else list(classes)
        sample_ids = [sample_ids] if isinstance(sample_ids, int) else list(sample_ids)
        return cls(
            scope=scope,
            partition_id=partition_id,
            classes=tuple(int(c) for c in classes),
            sample_ids=tuple(int(i) for i in sample_ids),
            node_id=node_id,
        )

    def describe(self) -> dict:
        """A JSON-friendly summary (used in results files)."""
        out: dict = {"scope": self.scope, "partition_id": self.partition_id}
        if self.scope == "class":
            out["classes"] = list(self.classes)
        if self.scope == "instance":
            out["num_samples"] = len(self.sample_ids)
        return out


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
    node = request.node_id
    if request.scope not in SCOPES:
        return f"unknown scope {request.scope!r}; allowed: {', '.join(SCOPES)}"
    if request.partition_id != sender_partition:
        owners = [n for n, p in node_partitions.items() if p == request.partition_id]
        owner = f"node {owners[0]}" if owners else "no node of this federation"
        return (
            f"node {node} (partition {sender_partition}) asked to forget partition "
            f"{request.partition_id}, which belongs to {owner}: a node can only have "
            "its own data forgotten"
        )
    train_ids = np.asarray(train_indices_of(sender_partition), dtype=np.int64)
    if request.scope == "class":
        if not request.classes:
            return "class-wise request names no classes; set the classes to forget"
        bad = [c for c in request.classes if not 0 <= c < num_classes]
        if bad:
            return (
                f"class(es) {bad} outside the label set 0..{num_classes - 1}"
            )
    if request.scope == "instance":
        if not request.sample_ids:
            return "instance-wise request names no sample ids: the forget set is empty"
        outside = np.setdiff1d(np.asarray(request.sample_ids, dtype=np.int64), train_ids)
        if outside.size:
            shown = ", ".join(str(i) for i in outside[:10])
            more = f" (and {outside.size - 10} more)" if outside.size > 10 else ""
            return (
                f"sample id(s) {shown}{more} are not in partition {sender_partition}'s "
                f"training split ({train_ids.size} samples)"
            )
    if forget_indices(request, train_ids, labels).size == 0:
        what = {"client": "it has no training data",
                "class": f"it has no training samples of class(es) {list(request.classes)}",
                "instance": "no sample id matched"}[request.scope]
        return f"empty forget set: {what}"
    return None


def request_to_config(request: UnlearningRequest) -> dict:
    """Config entries that tell a node what to leave out when it trains or evaluates.

    The server echoes a node's *accepted* request in every train/evaluate config; the
    node filters locally, so its forget data never leaves it."""
    out = {CONFIG_PREFIX + "scope": request.scope}
    if request.classes:
        out[CONFIG_PREFIX + "classes"] = [int(c) for c in request.classes]
    if request.sample_ids:
        out[CONFIG_PREFIX + "sample-ids"] = [int(i) for i in request.sample_ids]
    return out


def request_from_config(config: Mapping, partition_id: int) -> UnlearningRequest | None:
    """The node's accepted request as echoed in a train/evaluate config (inverse of
    :func:`request_to_config`); ``None`` when the config carries none."""
    scope = config.get(CONFIG_PREFIX + "scope")
    if not scope:
        return None
    classes = config.get(CONFIG_PREFIX + "classes", [])
    ids = config.get(CONFIG_PREFIX + "sample-ids", [])
    return UnlearningRequest(scope=str(scope), partition_id=partition_id,
                             classes=tuple(int(c) for c in classes),
                             sample_ids=tuple(int(i) for i in ids))
