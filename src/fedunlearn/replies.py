"""Strict checks of what nodes reply: which partition they hold, trained models, evaluation
counts.

A reply is untrusted input. The server reads one only through these functions, which
either return plain, checked values or raise :class:`~fedunlearn.parsing.WireError` naming
the field, the value and what is allowed. The caller then treats the node as failed for
that round (:class:`fedunlearn.federation.GuardedGrid` turns such a reply into an error
reply before any strategy sees it), so a malformed or hostile reply never crashes the
ServerApp and never reaches an aggregate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from .arrays import records, to_numpy
from .protocol import (
    COST_METRICS,
    EVALUATE_COUNT_KEYS,
    MAX_METRICS,
    METRICS_KEY,
    MIA_FEATURES,
    MODEL_KEY,
    NODE_FIELDS,
    NODE_RECORD,
    NUM_EXAMPLES,
)
from .protocol import METRIC_KEYS as TRAIN_METRIC_KEYS  # noqa: F401  (re-export)
from .requests import MAX_PARTITION_ID
from .parsing import (
    MissingField,
    WireError,
    exact_int,
    finite_number,
    int_list,
    number_list,
    only_fields,
    require,
    shorten,
)

MAX_COUNT = 10**12
"""Upper bound of any sample count a node reports (far above any data set here)."""


def parse_node_record(content: RecordDict) -> int:
    """The partition a ``query.unlearn`` reply says its node holds (the harness)."""
    report = parse_node_report(content)
    if "partition-id" not in report:
        raise MissingField("partition-id", "expected an integer")
    return report["partition-id"]


def parse_node_report(content: RecordDict) -> dict:
    """What a ``query.unlearn`` reply's node record says, checked: ``partition-id`` and
    ``num-partitions`` (the harness), ``num-train``, ``num-forget``, ``num-retained``
    (counts), ``num-classes`` and ``classes-held`` (a plugin node's label set)."""
    require(content, NODE_RECORD, "expected a record describing the node")
    record = content.config_records.get(NODE_RECORD)
    if record is None:
        raise WireError(NODE_RECORD, type(content[NODE_RECORD]).__name__,
                        "expected a ConfigRecord")
    only_fields(record, NODE_FIELDS, NODE_RECORD)
    out: dict = {}
    if "partition-id" in record:
        out["partition-id"] = exact_int("partition-id", record["partition-id"], lo=0,
                                        hi=MAX_PARTITION_ID)
    if "num-partitions" in record:
        out["num-partitions"] = exact_int("num-partitions", record["num-partitions"], lo=1,
                                          hi=MAX_PARTITION_ID + 1)
    for key in ("num-train", "num-forget", "num-retained"):
        if key in record:
            out[key] = exact_int(key, record[key], lo=0, hi=MAX_COUNT)
    if "num-classes" in record:
        out["num-classes"] = exact_int("num-classes", record["num-classes"], lo=1, hi=MAX_COUNT)
    if "classes-held" in record:
        out["classes-held"] = int_list("classes-held", record["classes-held"], 100_000, lo=0,
                                       hi=MAX_COUNT)
    if "num-ids-not-held" in record:
        out["num-ids-not-held"] = exact_int("num-ids-not-held", record["num-ids-not-held"],
                                            lo=0, hi=MAX_COUNT)
    if "ids-not-held" in record:
        out["ids-not-held"] = int_list("ids-not-held", record["ids-not-held"], 10,
                                       lo=-MAX_COUNT, hi=MAX_COUNT)
    if "num-forget" in out and "num-train" in out and (
            out["num-forget"] + out.get("num-retained", 0) != out["num-train"]):
        raise WireError("num-retained", out.get("num-retained"),
                        f"expected num-train - num-forget = {out['num-train'] - out['num-forget']}")
    return out


# -- train replies -----------------------------------------------------------------------
def check_train_reply(reply: Message, sent: Message, max_examples: int | None = None) -> None:
    """Check a train reply against the message it answers.

    It must carry exactly one ArrayRecord, :data:`MODEL_KEY`, with the same arrays (names,
    shapes, dtypes) as the model that was sent, every value finite, and exactly one
    MetricRecord, ``metrics``, with exactly :data:`TRAIN_METRIC_KEYS`: ``num-examples``
    an int in ``0..max_examples`` (the node's training split: FedAvg weights by it),
    ``train-loss`` a finite number, the sample counts non-negative ints.
    """
    content = reply.content
    arrays = records(content, ArrayRecord)
    if list(arrays) != [MODEL_KEY]:
        raise WireError("array records", sorted(arrays), f"expected exactly [{MODEL_KEY!r}]")
    expected = records(sent.content, ArrayRecord).get(MODEL_KEY)
    check_arrays(arrays[MODEL_KEY], expected)
    metrics = records(content, MetricRecord)
    if len(metrics) != 1:
        raise WireError("metric records", sorted(metrics), "expected exactly one MetricRecord")
    name, record = next(iter(metrics.items()))
    if NUM_EXAMPLES not in record:
        raise MissingField(f"{name}.{NUM_EXAMPLES}",
                           "a train reply's metrics carry the aggregation weight")
    if len(record) > MAX_METRICS:
        raise WireError(name, f"<{len(record)} metrics>", f"expected at most {MAX_METRICS}")
    exact_int(f"{name}.{NUM_EXAMPLES}", record[NUM_EXAMPLES], lo=0,
              hi=max_examples if max_examples is not None else MAX_COUNT)
    for key, value in record.items():
        if key == NUM_EXAMPLES:
            continue
        if key in COST_METRICS:
            exact_int(f"{name}.{key}", value, lo=0, hi=MAX_COUNT)
        elif isinstance(value, list):
            number_list(f"{name}.{key}", value, max_len=len(value))
        else:
            finite_number(f"{name}.{key}", value)


def check_arrays(record: ArrayRecord, expected: ArrayRecord | None) -> None:
    """``record`` holds the arrays of ``expected`` (names, shapes, dtypes), all finite."""
    names = list(record.keys())
    if expected is not None and names != list(expected.keys()):
        raise WireError(f"{MODEL_KEY} names", names,
                        f"expected the {len(expected)} arrays of the model that was sent, "
                        "in its order")
    for name in names:
        array = record[name]
        try:
            values = to_numpy(array, writable=False)
        except Exception as err:  # a corrupt buffer: np.load raises many kinds
            raise WireError(f"{MODEL_KEY}.{name}", f"<{len(array.data)} bytes>",
                            f"expected a NumPy array ({type(err).__name__}: "
                            f"{str(err)[:80]})") from None
        if expected is not None:
            want = expected[name]
            if tuple(values.shape) != tuple(want.shape) or str(values.dtype) != want.dtype:
                raise WireError(f"{MODEL_KEY}.{name}", f"{values.dtype}{list(values.shape)}",
                                f"expected {want.dtype}{list(want.shape)} as sent")
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            raise WireError(f"{MODEL_KEY}.{name}", "array with NaN or infinity",
                            "expected finite values")
        if values.dtype.kind not in "biufc":
            raise WireError(f"{MODEL_KEY}.{name}", str(values.dtype),
                            "expected a numeric array")


# -- evaluate replies --------------------------------------------------------------------
@dataclass
class EvaluateReply:
    """The checked content of one node's evaluate reply."""

    counts: dict[str, int]
    retain_features: np.ndarray = field(default_factory=lambda: np.zeros((0, MIA_FEATURES)))
    forget_features: np.ndarray = field(default_factory=lambda: np.zeros((0, MIA_FEATURES)))


def parse_evaluate_reply(reply: Message, max_members: int | None = None,
                         expected_totals: Mapping[str, int] | None = None) -> EvaluateReply:
    """Check an evaluate reply and return its counts and membership features.

    The MetricRecord ``metrics`` must hold :data:`EVALUATE_COUNT_KEYS` as non-negative
    ints with ``correct <= total``; when ``expected_totals`` is given (what the server
    computes from the partition and the accepted request), ``retain-total`` and
    ``forget-total`` must equal it. ``retain-features`` / ``forget-features``, when
    present, are lists of finite numbers, :data:`MIA_FEATURES` per sample, at most one
    row per counted sample (and at most ``max_members`` retained rows). Other keys are
    ignored.
    """
    metrics = reply.content.metric_records.get(METRICS_KEY)
    if metrics is None:
        raise MissingField(METRICS_KEY, "an evaluate reply carries a MetricRecord 'metrics'")
    counts = {}
    for key in EVALUATE_COUNT_KEYS:
        name = f"{METRICS_KEY}.{key}"
        counts[key] = exact_int(name, require(metrics, key, "expected a sample count"),
                                lo=0, hi=MAX_COUNT)
    for part in ("retain", "forget"):
        correct, total = counts[f"{part}-correct"], counts[f"{part}-total"]
        if correct > total:
            raise WireError(f"{METRICS_KEY}.{part}-correct", correct,
                            f"expected at most {part}-total={total}")
        if expected_totals is not None and f"{part}-total" in expected_totals:
            want = int(expected_totals[f"{part}-total"])
            if total != want:
                raise WireError(f"{METRICS_KEY}.{part}-total", total,
                                f"expected {want}, the size of the node's {part} set")
    out = EvaluateReply(counts)
    for part in ("retain", "forget"):
        key = f"{part}-features"
        if key not in metrics:
            continue
        rows = counts[f"{part}-total"]
        if part == "retain" and max_members is not None:
            rows = min(rows, max_members)
        values = number_list(f"{METRICS_KEY}.{key}", metrics[key], rows * MIA_FEATURES)
        if len(values) % MIA_FEATURES:
            raise WireError(f"{METRICS_KEY}.{key}", metrics[key],
                            f"expected {MIA_FEATURES} features per sample (a length that "
                            f"is a multiple of {MIA_FEATURES})")
        features = np.asarray(values, dtype=np.float64).reshape(-1, MIA_FEATURES)
        setattr(out, f"{part}_features", features)
    return out


def check_evaluate_metrics(reply: Message) -> None:
    """Any evaluate reply (e.g. a validation split): one MetricRecord ``metrics`` whose
    counts (``*-correct``, ``*-total``, ``num-examples``) are non-negative ints with
    ``correct <= total`` and whose other values are finite numbers or lists of them."""
    metrics = reply.content.metric_records.get(METRICS_KEY)
    if metrics is None:
        raise MissingField(METRICS_KEY, "an evaluate reply carries a MetricRecord 'metrics'")
    for key, value in metrics.items():
        name = f"{METRICS_KEY}.{key}"
        if key == "num-examples" or key.endswith(("-correct", "-total")):
            exact_int(name, value, lo=0, hi=MAX_COUNT)
        elif isinstance(value, list):
            number_list(name, value, max_len=len(value))
        else:
            finite_number(name, value)
    for key in metrics:
        total_key = key[: -len("-correct")] + "-total"
        if key.endswith("-correct") and total_key in metrics:
            if metrics[key] > metrics[total_key]:
                raise WireError(f"{METRICS_KEY}.{key}", metrics[key],
                                f"expected at most {total_key}={metrics[total_key]}")


#: A node's check of a published model, as its receipt acknowledgement carries it
#: (``check-<key>``): the key and what its value may be.
CHECK_HASH_OK = "model-arrays-sha256-ok"
"""The node's check: the model it was sent has the array digest its receipt names."""
CHECK_FIELDS = {CHECK_HASH_OK: "bool", "forget-total": "count", "retain-total": "count",
                "forget-accuracy": "percent", "retain-accuracy": "percent",
                "forget-loss": "loss", "retain-loss": "loss", "error": "text"}
MAX_CHECK_TEXT = 300


def parse_node_check(ack) -> tuple[dict, list[str]]:
    """The node's check from a receipt acknowledgement, strictly: known keys only, a bool,
    a count, a percentage in [0, 100], a finite non-negative loss (``None``: the set was
    empty) or a short text. Returns ``(check, problems)``; a bad or unknown entry is left
    out and named in ``problems`` (bounded), so no node's reply can stop the service or
    grow its files."""
    check: dict = {}
    problems: list[str] = []
    for key, value in ack.items():
        if not key.startswith("check-"):
            continue
        name, kind = key[len("check-"):], CHECK_FIELDS.get(key[len("check-"):])
        try:
            if kind is None:
                raise ValueError("not a check field")
            check[name] = _check_value(kind, value)
        except ValueError as err:
            if len(problems) < 10:
                problems.append(f"{shorten(key, 40)}={shorten(value, 40)}: {err}")
    return check, problems


def _check_value(kind: str, value):
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if kind == "text":
        if not isinstance(value, str):
            raise ValueError("expected a string")
        return value[:MAX_CHECK_TEXT]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("expected a number")
    if kind == "count":
        if not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
            raise ValueError(f"expected an integer in 0..{MAX_COUNT}")
        return value
    if value != value:  # nan: nothing to measure on (an empty set)
        return None
    if kind == "percent" and not 0.0 <= value <= 100.0:
        raise ValueError("expected a percentage in [0, 100]")
    if kind == "loss" and not (0.0 <= value < float("inf")):
        raise ValueError("expected a finite loss >= 0")
    return float(value)
