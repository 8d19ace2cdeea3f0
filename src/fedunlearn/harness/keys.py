"""The run-config keys, declared once: name, type, default, allowed values and doc.

:data:`KEYS` drives everything that knows the keys:

* ``ExperimentConfig.from_run_config`` (:mod:`fedunlearn.harness.config`) reads each key
  with its type and ``ExperimentConfig.validate`` checks its range or choices (so do the
  checks before Flower starts, ``fedunlearn-run --check``);
* ``[tool.flwr.app.config]`` of ``pyproject.toml`` (Flower's defaults) must hold the
  same keys, types and defaults, and ``docs/running.md``'s key table the same keys and
  defaults (``tests/test_experiment_config.py``, ``tests/test_keys.py``);
* the Hydra runner's mapping (``fedunlearn.experiment.config.RUN_CONFIG_MAP``) takes the
  keys and types from here.

A key whose setting is also a field of a library class (``unlearn.*`` and
:class:`~fedunlearn.Recovery`, ``pretrain.*`` and :class:`~fedunlearn.Training`,
``service.*`` and :class:`~fedunlearn.ServiceConfig`) names it in ``shared`` and takes
that field's :class:`~fedunlearn.ranges.Range` object, so both accept the same values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import ranges as R
from ..ranges import Range
from ..requests import SCOPES
from ..service.config import ServiceConfig
from ..strategies.settings import STOP_RULES, Recovery, Training
from ..parsing import parse_int_list
from .backdoor import POSITIONS
from .backdoor import RANGES as BACKDOOR

PARTITIONINGS = ("iid", "dirichlet")
MAX_COUNT = 10_000_000
MAX_SYNTHETIC_SIZE = 1_000_000  # dataset.size: 1M 8x8 samples are ~256 MB
MAX_REPLY_TIMEOUT_S = 86_400.0


# -- reading one value -------------------------------------------------------------------
def _brief(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_int(key: str, value: Any) -> int:
    """A run-config integer: an int, or a string of one (never a bool or a float)."""
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError(f"{key}={value!r}: expected an integer")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if re.fullmatch(r"[+-]?[0-9]{1,30}", text):
        return int(text)
    raise ValueError(f"{key}={_brief(value)}: expected an integer")


def read_float(key: str, value: Any) -> float:
    """A run-config number: an int or a float (or a string of one), finite."""
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r}: expected a number")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{key}={_brief(value)}: expected a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{key}={_brief(value)}: expected a finite number")
    return number


def read_str(key: str, value: Any) -> str:
    """A run-config string (numbers are taken as their text; bools are refused)."""
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r}: expected text")
    text = str(value)
    if len(text) > 100_000 or "\x00" in text:
        raise ValueError(f"{key}={_brief(value)}: expected text without NUL, at most "
                         "100000 characters")
    return text


def read_bool(key: str, value: Any) -> bool:
    """A run-config flag: a bool, or the text true/false."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "false"):
        return text == "true"
    raise ValueError(f"{key}={_brief(value)}: expected true or false")


def parse_str_list(value: Any) -> tuple[str, ...]:
    """Parse ``"a, b"`` into ``("a", "b")``; ``""`` gives ``()``."""
    return tuple(p.strip() for p in str(value).split(",") if p.strip())


def parse_method_params(text: str) -> dict[str, dict[str, str]]:
    """``"puf.alpha=3 mode.momentum=0.9"`` -> ``{"puf": {"alpha": "3"}, "mode": {...}}``.

    Pairs are separated by spaces or commas. Only the syntax is checked here; the values
    are checked by each method's parameters class."""
    out: dict[str, dict[str, str]] = {}
    for item in str(text).replace(",", " ").split():
        name, sep, value = item.partition("=")
        method, dot, key = name.partition(".")
        if not sep or not dot or not method or not key or not value:
            raise ValueError(
                f"method-params: {item!r} is not <method>.<key>=<value> (e.g. "
                "'puf.alpha=2.0'; several pairs separated by spaces)")
        method = method.strip().lower()
        if key in out.setdefault(method, {}):
            raise ValueError(f"method-params: {method}.{key} is given twice")
        out[method][key] = value
    return out


def format_method_params(values: Mapping[str, Mapping[str, Any]]) -> str:
    """Inverse of :func:`parse_method_params` (sorted, for stable keys and logs)."""
    items = []
    for method in sorted(values):
        for key in sorted(values[method]):
            value = values[method][key]
            if isinstance(value, bool):
                value = "true" if value else "false"
            items.append(f"{method}.{key}={value}")
    return " ".join(items)


def ratio_targets(ratio: float, num_clients: int) -> tuple[int, ...]:
    """The target clients of forget ratio ``ratio``: ``0..k-1``, ``k = round(ratio * n)``
    (the NoT paper's forget ratio: 0.1/0.5/0.9 of 10 clients = 1/5/9 targets), at least
    one client, at most all. Run-config ``forget.ratio`` (Hydra: the same path)."""
    ratio = float(ratio)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"forget.ratio={ratio} must be in (0, 1] (0: forget.clients "
                         "names the targets)")
    return tuple(range(min(num_clients, max(1, math.floor(ratio * num_clients + 0.5 + 1e-9)))))


def _lower(key: str, value: Any) -> str:
    return read_str(key, value).lower()


def _word(key: str, value: Any) -> str:
    return read_str(key, value).strip().lower()


def _names(key: str, value: Any) -> tuple[str, ...]:
    return parse_str_list(read_str(key, value))


def _methods(key: str, value: Any) -> tuple[str, ...]:
    return tuple(m.lower() for m in _names(key, value))


def _params(key: str, value: Any) -> tuple[tuple[str, str, str], ...]:
    params = parse_method_params(read_str(key, value))
    return tuple(sorted((m, k, v) for m, kv in params.items() for k, v in kv.items()))


def _ids(key: str, value: Any) -> tuple[int, ...]:
    return parse_int_list(value, key)


_READERS: dict[type, Callable[[str, Any], Any]] = {
    int: read_int, float: read_float, str: read_str, bool: read_bool}


def _datasets() -> tuple[str, ...]:
    from .data import DATASETS

    return tuple(DATASETS)


def _models() -> tuple[str, ...]:
    from .models import list_models

    return tuple(list_models())


# -- the key -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Key:
    """One run-config key.

    ``type`` is its run-config (TOML) type and ``default`` its value there; ``field``
    the :class:`~fedunlearn.harness.config.ExperimentConfig` attribute it sets
    (``forget.fraction``: ``cfg.forget.fraction``); ``read`` turns a run-config value into
    the field's value (default: by ``type``). ``range`` (numbers) or ``choices`` (text; a
    callable when only known lazily) say what is allowed, ``note`` explains choices;
    ``when`` names a field that turns the setting on (its range is checked only then);
    ``shared`` names the library fields, ``(class, field)``, that take the same range."""

    name: str
    type: type
    default: bool | int | float | str
    doc: str
    field: str
    range: Range | None = None
    choices: tuple[str, ...] | Callable[[], Sequence[str]] | None = None
    note: str = ""
    read: Callable[[str, Any], Any] | None = None
    when: str = ""
    shared: tuple[tuple[type, str], ...] = ()

    def parse(self, value: Any) -> Any:
        """The field's value of run-config ``value`` (a type check; ``ValueError``)."""
        return (self.read or _READERS[self.type])(self.name, value)

    def allowed_choices(self) -> tuple[str, ...] | None:
        return tuple(self.choices()) if callable(self.choices) else self.choices

    def check(self, value: Any) -> None:
        """Refuse a (parsed) value outside the range or the choices, naming the key."""
        if self.range is not None:
            self.range.check(self.name, value)
        choices = self.allowed_choices()
        if choices is not None and value not in choices:
            raise ValueError(f"{self.name}={value!r}; choose from {choices}"
                             + (f" ({self.note})" if self.note else ""))


def _shared(*fields: tuple[type, str]) -> dict[str, Any]:
    """The ``range`` and ``shared`` of a key that sets these library fields (one range)."""
    (cls, name), *others = fields
    if any(c.RANGES[n] is not cls.RANGES[name] for c, n in others):
        raise TypeError(f"{fields}: the shared fields have different ranges")
    return {"range": cls.RANGES[name], "shared": fields}


def _service(name: str, default: int | float, doc: str) -> Key:
    """``service.<name>``: ServiceConfig's field ``name``, checked in service mode."""
    kind = int if ServiceConfig.RANGES[name].integer else float
    when = "" if name == "rounds" else "service_rounds"
    return Key(f"service.{name.replace('_', '-')}", kind, default, doc, f"service_{name}",
               when=when, **_shared((ServiceConfig, name)))


_COUNT = Range(1, MAX_COUNT, integer=True)
_POINTS = "accuracy points"

#: Every run-config key, in ``[tool.flwr.app.config]``'s order.
KEYS: tuple[Key, ...] = (
    Key("method", str, "retrain,ft,not", "methods run one after another (comma-separated)",
        "methods", read=_methods),
    Key("method-params", str, "", "the methods' own parameters, <method>.<key>=<value> ...",
        "method_params", read=_params),
    Key("seed", int, 0, "seeds partitions, initialisation, shuffles and MIA subsampling",
        "seed", **_shared((ServiceConfig, "seed"))),
    Key("partition-seed", int, -1, "seeds partitions, train/val splits and drawn forget "
        "and backdoor ids (-1: seed)", "partition_seed",
        Range(-1, R.MAX_SEED, integer=True, note="-1: the value of seed")),
    Key("output-dir", str, "", "where results go (empty: ~/fedunlearn-results/<time>)",
        "output_dir"),
    Key("checkpoint-dir", str, "", "the pretrained-model cache (empty: FEDUNLEARN_CACHE)",
        "checkpoint_dir"),
    Key("device", str, "auto", "auto, cpu, cuda or cuda:N", "device", read=_word),
    Key("dataset.name", str, "digits", "the data set", "dataset", choices=_datasets,
        read=_lower),
    Key("dataset.root", str, "", "folder of torchvision data sets", "data_root"),
    Key("dataset.download", bool, False, "download the data set if missing", "data_download"),
    Key("dataset.size", int, 0, "synthetic's training samples", "data_size",
        Range(0, MAX_SYNTHETIC_SIZE, integer=True, note="0: the data set's own size")),
    Key("model.name", str, "cnn", "the model", "model", choices=_models, read=_lower),
    Key("federation.num-clients", int, 10, "partitions = SuperNodes", "num_clients", _COUNT),
    Key("federation.partitioning", str, "iid", "iid or dirichlet (label skew)",
        "partitioning", choices=PARTITIONINGS, read=_lower),
    Key("federation.alpha", float, 0.5, "Dirichlet concentration", "alpha",
        Range(0, 1e6, lo_open=True)),
    Key("federation.val-fraction", float, 0.2, "each client's validation share",
        "val_fraction", Range(0, 1, hi_open=True)),
    Key("federation.batch-size", int, 32, "local batch size", "batch_size", _COUNT),
    Key("federation.local-epochs", int, 1, "local epochs per round (pretraining, service)",
        "local_epochs", **_shared((Training, "local_epochs"), (ServiceConfig, "local_epochs"))),
    Key("federation.momentum", float, 0.9, "local SGD momentum", "momentum",
        Range(0, 1, hi_open=True)),
    Key("federation.reply-timeout", float, 600.0, "seconds the server waits for replies",
        "reply_timeout", Range(0, MAX_REPLY_TIMEOUT_S, lo_open=True)),
    Key("pretrain.rounds", int, 30, "FedAvg rounds from scratch (Retrain too)",
        "pretrain_rounds", **_shared((Training, "rounds"))),
    Key("pretrain.lr", float, 0.01, "pretraining (and service) learning rate", "pretrain_lr",
        **_shared((Training, "lr"), (ServiceConfig, "lr"))),
    Key("unlearn.rounds", int, 11, "recovery rounds (the maximum with stop=validation)",
        "unlearn_rounds", **_shared((Recovery, "rounds"))),
    Key("unlearn.lr", float, 0.01, "recovery learning rate", "unlearn_lr",
        **_shared((Recovery, "lr"))),
    Key("unlearn.local-epochs", int, 1, "recovery local epochs per round",
        "unlearn_local_epochs", **_shared((Recovery, "local_epochs"))),
    Key("unlearn.clip-norm", float, 0.0, "recovery gradient-norm clipping",
        "unlearn_clip_norm", **_shared((Recovery, "clip_norm"))),
    Key("unlearn.server-momentum", float, 0.5, "recovery server momentum (FedAvgM)",
        "unlearn_server_momentum", **_shared((Recovery, "server_momentum"))),
    Key("unlearn.stop", str, "fixed", "when recovery stops", "recovery_stop",
        choices=STOP_RULES, read=_word, note="validation: stop when recovered, fixed: "
        "always unlearn.rounds"),
    Key("unlearn.validate-every", int, 1, "validate every k recovery rounds",
        "recovery_validate_every", **_shared((Recovery, "validate_every"))),
    Key("unlearn.target-gap", float, 1.0, "recovered within this many points of the original",
        "recovery_target_gap", **_shared((Recovery, "target_gap"))),
    Key("unlearn.patience", int, 3, "validations without improvement before stopping",
        "recovery_patience", **_shared((Recovery, "patience"))),
    Key("unlearn.min-delta", float, 0.1, "smallest improvement that counts (points)",
        "recovery_min_delta", **_shared((Recovery, "min_delta"))),
    Key("negation.layers", str, "", "NoT: layers to negate (empty: the first)",
        "negate_layers", read=_names),
    Key("negation.bias", bool, True, "NoT: negate biases too", "negate_bias"),
    Key("forget.scope", str, "client", "what the simulated clients ask to forget",
        "forget.scope", choices=SCOPES, read=_word),
    Key("forget.clients", str, "0", "partition ids that ask to be forgotten",
        "forget.clients", read=_ids),
    Key("forget.ratio", float, 0.0, "share of the clients that ask: clients 0..k-1, "
        "k = round(ratio * num-clients); replaces forget.clients", "forget.ratio",
        Range(0, 1, note="0: forget.clients names the targets")),
    Key("forget.classes", str, "", "class-wise: labels to forget", "forget.classes",
        read=_ids),
    Key("forget.fraction", float, 0.1, "instance-wise: share of the training split",
        "forget.fraction", Range(0, 1, lo_open=True)),
    Key("forget.sample-ids", str, "", "instance-wise: global training-set ids",
        "forget.sample_ids", read=_ids),
    Key("forget.data-of", int, -1, "the partition a request names", "forget.data_of",
        Range(-1, integer=True, note="-1: the client's own")),
    Key("backdoor.clients", str, "", "partition ids that plant a backdoor",
        "backdoor.clients", read=_ids),
    Key("backdoor.fraction", float, 0.5, "share of their non-target samples poisoned",
        "backdoor.fraction", BACKDOOR["fraction"], when="backdoor.clients"),
    Key("backdoor.target", int, 0, "the label poisoned samples get", "backdoor.target",
        BACKDOOR["target"], when="backdoor.clients"),
    Key("backdoor.patch-size", int, 0, "trigger size in pixels", "backdoor.patch_size",
        BACKDOOR["patch_size"], when="backdoor.clients"),
    Key("backdoor.position", str, "bottom-right", "trigger corner", "backdoor.position",
        choices=POSITIONS, read=_word, when="backdoor.clients"),
    Key("backdoor.value", str, "auto", "trigger value (auto: the brightest)",
        "backdoor.value", read=_word),
    Key("eval.every", int, 5, "progress log every N rounds", "eval_every", R.EVERY),
    Key("eval.mia-max-members", int, 2000, "retained samples fitting the MIA",
        "mia_max_members", _COUNT),
    Key("eval.trajectory", bool, False, "measure every round of every method",
        "eval_trajectory"),
    Key("audit.outputs", bool, False, "write each method's per-example logits (outputs.npz)",
        "audit_outputs"),
    Key("audit.relearn-rounds", int, 0, "after each method, at most this many rounds of "
        "federated training with the targets' forget data until forget accuracy (ASR with "
        "a backdoor) is back at the original's (0: off)", "audit_relearn_rounds",
        Range(0, R.MAX_ROUNDS, integer=True, note="0: off")),
    Key("server-data.fraction", float, 0.0, "share of the training pool for the server",
        "server_data_fraction", Range(0, 0.5, note="0: the server holds no data")),
    Key("history.max-mb", float, 2048.0, "bound on a recorded training history (MB)",
        "history_max_mb", Range(0, 1e7, lo_open=True)),
    _service("rounds", 0, "service mode when > 0: rounds in all"),
    _service("query_every", 1, "ask the nodes for requests every N rounds"),
    _service("min_replies", 1.0, "usable replies a round needs (count or share)"),
    _service("round_retries", 2, "retries of a round without enough replies"),
    _service("validate_every", 0, "federated validation every N rounds"),
    _service("deadline_rounds", 0, "rounds within which a request is honoured"),
    _service("deadline_days", 30.0, "days within which a request is honoured"),
    _service("method_retries", 2, "retries of a failed unlearning step"),
    _service("retry_after", 1, "rounds between two tries of a failed step"),
    _service("wall_s", 0.0, "wall-clock budget of one ServerApp process (s)"),
    Key("service.rebuild", bool, False, "rebuild from the last good version when the "
        "checkpoint is missing or unreadable", "service_rebuild"),
)

BY_NAME: dict[str, Key] = {key.name: key for key in KEYS}
#: The parsed default of each ExperimentConfig field (``forget.fraction``: nested).
DEFAULTS: dict[str, Any] = {key.field: key.parse(key.default) for key in KEYS}
