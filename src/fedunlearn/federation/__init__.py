"""Federation checks: which nodes are there, which partition each holds, what they ask.

Everything the server learns about the federation before it trains, and the one view
of it that it keeps for the whole job:

* :func:`wait_for_nodes`: the nodes that connected;
* :func:`check_partitions`: which partition each holds, checked once, before any
  training; every partition must be held by exactly one node;
* :class:`GuardedGrid`: the server's only door to the nodes, built around Flower's
  grid. Once the partitions are verified, a node outside that view (one that joined
  late, restarted under a new node id, or claims a partition someone else holds) is
  never sent a message, is left out of every round and is logged (and audited) once;
  and every train or evaluate reply is checked (:mod:`.replies`) before a strategy sees
  it, a malformed one becoming a failed node for that round;
* :func:`collect_valid_requests`: the unlearning requests, parsed strictly, each bound
  to the node that sent it and validated against the verified view only (a plugin
  server's view labels a node by the partition id it reports, else by its node id:
  :func:`node_label`);
* :func:`send_receipts`: the verdict on inbox requests, sent back to their nodes.
"""


from .guarded_grid import GuardedGrid, is_deployment
from .intake import (ERROR_RECORD_FIELDS, collect_valid_requests, node_label, node_reports,
                     validate_reported, withdrawn_ids)
from .nodes import (MALFORMED_REPLY, NODE_STALL_S, check_partitions, query, run_id_of,
                    wait_for_nodes)
from .receipts import receipt_record, send_receipts

__all__ = ["ERROR_RECORD_FIELDS", "MALFORMED_REPLY", "NODE_STALL_S", "GuardedGrid",
           "check_partitions", "collect_valid_requests", "is_deployment", "node_label",
           "node_reports",
           "query", "receipt_record", "run_id_of", "send_receipts", "validate_reported",
           "wait_for_nodes", "withdrawn_ids"]
