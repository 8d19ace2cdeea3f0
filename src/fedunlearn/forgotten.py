"""Which nodes the server has forgotten for good: read from the audit log.

Every time a method honours a request, the server's audit log (:mod:`fedunlearn.audit`,
written by :func:`fedunlearn.serve`, service mode and the harness through
:class:`fedunlearn.ledger.Ledger`) gets a ``request.honoured`` record naming the node
and the request's scope. A node whose **client-wise** request was honoured has had all
its data removed from the model: no later training may use it again. The log is the
server's durable memory of that promise (it survives a ServerApp restart, and it is the
record the node's receipt points to), so :class:`ForgottenNodes` reads it, and re-reads
it when it changes, rather than keeping a list of its own.

Nodes are named by their Flower node id, as the log names them. A node that comes back
under a new node id is not in this list; its own ClientApp still refuses to train
(:mod:`fedunlearn.client.forget_guard`, installed by :func:`fedunlearn.client.attach`).
"""

from __future__ import annotations

import os
from logging import WARNING
from pathlib import Path

from .logs import log

from .audit import audit_path, read_audit

HONOURED_EVENT = "request.honoured"
CLIENT_SCOPE = "client"


def client_wise_forgotten(records) -> dict[int, dict]:
    """Node id -> the first ``request.honoured`` record of a client-wise request of that
    node (its method, run and model), from audit-log ``records``."""
    out: dict[int, dict] = {}
    for record in records:
        if record.get("event") != HONOURED_EVENT or record.get("scope") != CLIENT_SCOPE:
            continue
        node = record.get("node")
        if isinstance(node, bool) or not isinstance(node, int):
            continue
        out.setdefault(int(node), record)
    return out


class ForgottenNodes:
    """The nodes whose client-wise request the audit log records as honoured.

    Parameters
    ----------
    output_dir : path
        The ``output_dir`` given to :func:`fedunlearn.serve` (or service mode's state
        folder): the log is ``<output_dir>/audit.jsonl``, or ``$FEDUNLEARN_AUDIT_LOG``
        when that is set, exactly where :func:`fedunlearn.serve` writes it.
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        if not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir).strip():
            raise TypeError(f"output_dir={output_dir!r}: expected the folder serve() wrote "
                            "to (its audit.jsonl names the forgotten nodes)")
        self.path = audit_path(Path(output_dir).expanduser().resolve())
        self._stamp: tuple[int, int] | None = None
        self._nodes: dict[int, dict] = {}
        self._warned_chain = False

    def nodes(self) -> dict[int, dict]:
        """Node id -> the record that made it forgotten; re-read when the log changed.

        A missing log means nothing was honoured there yet (an empty result). A log that
        exists but cannot be read raises: the caller cannot tell who must stay out."""
        try:
            info = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._nodes = None, {}
            return {}
        stamp = (info.st_size, info.st_mtime_ns)
        if stamp != self._stamp:
            reading = read_audit(self.path)
            if reading.chain_breaks and not self._warned_chain:
                self._warned_chain = True
                log(WARNING, "the audit log %s is not intact (%s); nodes it records as "
                    "forgotten still stay out", self.path, reading.chain_breaks[0])
            self._nodes = client_wise_forgotten(reading.records)
            self._stamp = stamp
        return dict(self._nodes)


__all__ = ["ForgottenNodes", "client_wise_forgotten"]
