"""The wire protocol: every name that crosses between the server and the nodes.

Both sides import this module and nothing of each other: the server side
(:mod:`fedunlearn.strategies`, :mod:`fedunlearn.serving`, the harness) never imports
:mod:`fedunlearn.client`, and the node side never imports a strategy. A user who serves a
message with their own handler needs only the names below (the README's protocol table
lists them).

Message types
    ``query.unlearn`` (:data:`QUERY_UNLEARN`): the server asks a node what it wants
    forgotten (and, with a :data:`RECEIPT_RECORD`, hands it the verdict on its inbox
    requests). ``train`` and ``train.<action>`` (:func:`message_type`): run a client action
    (the plain ``train`` is :data:`DEFAULT_ACTION`, local training on the retained data).
    ``evaluate`` (:data:`EVALUATE`): measure a model on the node's own data.

Records
    Every train/evaluate message carries the model as ArrayRecord :data:`MODEL_KEY` and a
    ConfigRecord :data:`CONFIG_KEY`; replies carry a MetricRecord :data:`METRICS_KEY`.
"""

from __future__ import annotations

# -- message types ---------------------------------------------------------------------
QUERY_UNLEARN = "query.unlearn"
"""Message type the server sends to collect unlearning requests (and deliver receipts)."""
TRAIN = "train"
EVALUATE = "evaluate"
DEFAULT_ACTION = "default"
"""The client action Flower routes the plain ``train`` message type to."""
RETAINED_ACTION = "retained"
"""``train.retained``: local training on the retained data, sent to a node with an
accepted class- or instance-wise request (a plugin node's own ``@app.train()`` keeps
the plain ``train`` messages, sent to nodes with nothing to forget)."""
EVALUATE_UNLEARN = "evaluate.unlearn"
"""fedunlearn's measurement (retain/forget counts, membership features, validation):
its own message type, so a node's own ``@app.evaluate()`` is left alone."""


def message_type(action: str) -> str:
    """The Flower message type that reaches client action ``action``."""
    return TRAIN if action == DEFAULT_ACTION else f"{TRAIN}.{action}"


# -- records of train / evaluate messages -------------------------------------------------
MODEL_KEY = "arrays"
"""ArrayRecord of the model an action starts from (and replies with)."""
CONFIG_KEY = "config"
"""ConfigRecord of every train / evaluate / query message."""
METRICS_KEY = "metrics"
"""MetricRecord of every train / evaluate reply."""

NUM_EXAMPLES = "num-examples"
"""The one metric a train reply must carry: FedAvg's aggregation weight (as in Flower)."""
TRAIN_LOSS = "train-loss"
SAMPLES_PROCESSED = "samples-processed"
"""Optional train metric: samples through forward + backward (FLOPs accounting)."""
FORWARD_SAMPLES = "forward-samples"
"""Optional train metric: forward-only samples (e.g. a frozen teacher's predictions)."""
METRIC_KEYS = (NUM_EXAMPLES, TRAIN_LOSS, SAMPLES_PROCESSED, FORWARD_SAMPLES)
"""The metrics fedunlearn's own client actions reply with. Only ``num-examples`` is
required of a train reply; the cost metrics are optional extras and other keys (a user's
own ``train_loss``) are accepted as long as they are finite numbers."""
COST_METRICS = (SAMPLES_PROCESSED, FORWARD_SAMPLES)
MAX_METRICS = 64
"""Most metric keys one train reply may carry."""

# Train config keys the server sends (the recovery phase's settings).
LR = "lr"
LOCAL_EPOCHS = "local-epochs"
CLIP_NORM = "clip-norm"
WEIGHT_DECAY = "weight-decay"
PHASE = "phase"
SERVER_ROUND = "server-round"
SEED = "seed"
PARAM_PREFIX = "param."
"""Config keys of a method's own parameters: ``param.<field>``."""
RANDOM_MODEL_SEED_KEY = "random-model-seed"
"""Config key of the seed of the freshly initialised model some actions need."""



def params_to_config(values) -> dict:
    """A method's parameters as config entries ``param.<name>`` (scalars only)."""
    out = {}
    for name, value in values.items():
        if not isinstance(value, (bool, int, float, str)):
            raise TypeError(f"parameter {name}={value!r}: a config value must be bool, int, "
                            "float or str")
        out[PARAM_PREFIX + name] = value
    return out


# Extra ArrayRecords some methods send with a train message.
DEGRADATION_KEY = "degradation"
"""MoDE: the degradation model's ArrayRecord."""
LAST_LOCAL_KEY = "last_local"
"""PGD: the target's last local model from the training history."""
PRESERVE = ("original_low", "unlearned_low")
"""FCU: which model's low-frequency band the fusion keeps."""

# Evaluate config / reply keys.
SPLIT = "split"
VALIDATION_SPLIT = "val"
"""``split`` value of the recovery stopping rule's validation."""
MAX_MEMBERS = "max-members"
VAL_CORRECT, VAL_TOTAL = "val-correct", "val-total"
EVALUATE_COUNT_KEYS = ("retain-correct", "retain-total", "forget-correct", "forget-total")
RETAIN_FEATURES, FORGET_FEATURES = "retain-features", "forget-features"
MIA_FEATURES = 3
"""Membership features per sample (loss, true-label probability, entropy)."""

# -- query.unlearn ------------------------------------------------------------------------
NODE_RECORD = "node"
"""ConfigRecord of a query reply: what the node reports about itself (:data:`NODE_FIELDS`)."""
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
NUM_TRAIN = "num-train"
"""Node report: the size of its training split."""
NUM_FORGET, NUM_RETAINED = "num-forget", "num-retained"
"""Node report: how many of its training samples its request forgets / retains."""
CLASSES_HELD = "classes-held"
"""Node report: the labels present in its training split."""
NUM_CLASSES = "num-classes"
"""Node report: the size of its label set (what class ids may be)."""
IDS_NOT_HELD, NUM_IDS_NOT_HELD = "ids-not-held", "num-ids-not-held"
"""Node report: an instance-wise request's ids the node does not hold (the first 10) and
how many there are."""
NODE_FIELDS = (PARTITION_ID, NUM_PARTITIONS, NUM_TRAIN, NUM_FORGET, NUM_RETAINED,
               CLASSES_HELD, NUM_CLASSES, IDS_NOT_HELD, NUM_IDS_NOT_HELD)
REQUEST_RECORD = "request"
QUERY_CONFIG = "config"
"""ConfigRecord of a ``query.unlearn`` message: what the server allows (below)."""
RUN_CONFIG_REQUESTS = "run-config-requests"
"""Query flag: whether a node may ask through the run-config's ``forget.*`` (simulation
only; on a deployment a request comes from the node's inbox or node-config)."""
WANT_REQUEST = "want-request"
"""Query flag: ``False`` when the server only asks who a node is (the partition check
before pretraining), so the node does not consult its inbox yet."""
RECEIPT_RECORD = "receipt"
"""A ``query.unlearn`` message carrying the server's verdict on inbox requests."""
RECEIPT_ACK = "receipt-ack"
REPLY_TIMEOUT_S = 600.0
"""The default reply timeout (seconds) of every exchange the server makes: a node that
has not answered by then failed that message. A job sets its own
(run-config ``federation.reply-timeout``, ``serve(reply_timeout=)``) on its grid."""


def reply_timeout(grid) -> float:
    """The reply timeout of ``grid``: the one the job set on its verified grid
    (:class:`fedunlearn.federation.GuardedGrid`), else :data:`REPLY_TIMEOUT_S`."""
    value = getattr(grid, "reply_timeout", None)
    return float(value) if isinstance(value, (int, float)) and value > 0 else REPLY_TIMEOUT_S
REJECTED_RECORD = "rejected"
"""ConfigRecord of a ``query.unlearn`` reply: inbox requests the node's own check refused
(``inbox-ids`` and ``reasons``, parallel lists); the others still go in ``request``."""
WITHDRAWN_RECORD = "withdrawn"
"""ConfigRecord of a ``query.unlearn`` reply: inbox requests the node sent earlier and its
data owner withdrew since (``inbox-ids``): a server still holding one pending drops it."""
INVALID_SCOPE = "invalid"
"""Scope of the request record a node sends when its own check refused the request
(with ``error``: the reason)."""

# Echo of a node's accepted request in every train / evaluate config.
FORGET_PREFIX = "forget."
FORGET_SCOPE = FORGET_PREFIX + "scope"
FORGET_CLASSES = FORGET_PREFIX + "classes"
FORGET_SAMPLE_IDS = FORGET_PREFIX + "sample-ids"

__all__ = [name for name in dir() if name.isupper()] + ["message_type", "params_to_config"]
