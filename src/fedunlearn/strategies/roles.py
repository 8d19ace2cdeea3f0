"""Who takes part in a round: the roles of :class:`~fedunlearn.strategies.UnlearningStrategy`
(``retained``, ``targets``, ``all``) and the request that shapes what a node trains on."""

from __future__ import annotations

from logging import WARNING

from ..logs import log
from flwr.serverapp import Grid

from ..requests import UnlearningRequest, merge_requests
from .settings import ROLES


class Roles:
    """The role part of :class:`~fedunlearn.strategies.UnlearningStrategy`."""

    def participants(self, role: str, grid: Grid) -> list[int]:
        """The nodes that take part in a round in ``role`` (sorted by node id).

        Only nodes of the verified federation take part (when one is known): a node
        that joined later or under a new id is left out, and a verified node that left
        is still asked (the grid answers for it with an error: it is a failed node of
        the round, never silently a smaller federation)."""
        nodes = set(grid.get_node_ids())
        known = self.context.node_partitions
        if known:
            strangers = nodes - set(known)
            if strangers:
                log(WARNING, "nodes %s are not in the verified federation; they take no "
                    "part", sorted(strangers))
            nodes = set(known)
        if role == "all":
            return sorted(nodes)
        if role == "targets":
            return sorted(nodes & set(self.context.requests)) if self.uses_requests else []
        if role == "retained":
            return sorted(nodes - self.excluded_nodes())
        raise ValueError(f"role {role!r}; allowed: {ROLES}")

    def excluded_nodes(self) -> set[int]:
        """Nodes with nothing retained: client-wise targets, and any node whose request
        covers all of its training data."""
        served = self.context.served
        gone = {n for n, r in served.items() if r.scope == "client"} | set(
            self.context.served_fully)
        if not self.uses_requests:
            return gone
        client_wise = {n for n, r in self.context.requests.items() if r.scope == "client"}
        return client_wise | set(self.context.fully_forgotten) | gone

    def shaping_request(self, node_id: int) -> UnlearningRequest | None:
        """The request that decides what ``node_id`` trains on: this step's (when the
        method uses requests) merged with what it had honoured before (service mode)."""
        current = self.context.requests.get(node_id) if self.uses_requests else None
        earlier = self.context.served.get(node_id)
        if earlier is None or current is None:
            return current if current is not None else earlier
        return merge_requests(earlier, current)

