"""Experiment configuration: the Flower run-config, parsed and validated once.

Flower run-config values are bool/int/float/str only and nested tables become dotted
keys (``forget.scope``). :class:`ExperimentConfig` turns that flat mapping into typed
fields, fills defaults, and rejects bad values with a message that names the key, the
value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..wire import parse_int_list  # noqa: F401  (re-export)
from .backdoor import BackdoorConfig

SCOPES = ("client", "class", "instance")
PARTITIONINGS = ("iid", "dirichlet")
RECOVERY_STOPS = ("validation", "fixed")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]{1,3})?")
MAX_SEED = 2**32 - 1  # numpy's seed range
MAX_ROUNDS = 100_000
MAX_COUNT = 10_000_000
MAX_SYNTHETIC_SIZE = 1_000_000  # dataset.size: 1M 8x8 samples are ~256 MB
MAX_LR = 100.0
MAX_REPLY_TIMEOUT_S = 86_400.0


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric run-config key (both ends included unless open)."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""

    def describe(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"

        text = (f"{'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}"
                f"{')' if self.hi_open else ']'}")
        return f"{text} ({self.note})" if self.note else text

    def check(self, key: str, value: float) -> None:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value)
              and (value > self.lo if self.lo_open else value >= self.lo)
              and (value < self.hi if self.hi_open else value <= self.hi))
        if not ok:
            raise ValueError(f"{key}={value!r} must be in {self.describe()}")


def _first(values, limit: int = 5) -> str:
    """``[a, b, c]`` or ``[a, b, c, d, e, ... (N in all)]``: a bounded list for a message."""
    values = list(values)
    shown = ", ".join(map(str, values[:limit]))
    return f"[{shown}]" if len(values) <= limit else f"[{shown}, ... ({len(values)} in all)]"


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


def _brief(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


@dataclass(frozen=True)
class ForgetConfig:
    """What the simulated clients ask to forget (run-config ``forget.*``)."""

    scope: str = "client"
    clients: tuple[int, ...] = (0,)
    classes: tuple[int, ...] = ()
    fraction: float = 0.1
    sample_ids: tuple[int, ...] = ()
    data_of: int = -1  # partition whose data the request names; -1: the client's own


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one fedunlearn job needs, typed and validated."""

    methods: tuple[str, ...] = ("retrain", "ft", "not")
    seed: int = 0
    output_dir: str = ""
    checkpoint_dir: str = ""
    device: str = "auto"
    dataset: str = "digits"
    data_root: str = ""
    data_download: bool = False
    data_size: int = 0  # synthetic's training samples (0: its default)
    model: str = "cnn"
    num_clients: int = 10
    partitioning: str = "iid"
    alpha: float = 0.5
    val_fraction: float = 0.2
    batch_size: int = 32
    local_epochs: int = 1
    momentum: float = 0.9
    reply_timeout: float = 600.0  # seconds the server waits for the nodes' replies
    pretrain_rounds: int = 30
    pretrain_lr: float = 0.01
    unlearn_rounds: int = 11  # the recovery budget (the maximum when stop="validation")
    unlearn_lr: float = 0.01
    unlearn_local_epochs: int = 1
    unlearn_clip_norm: float = 0.0
    unlearn_server_momentum: float = 0.5
    recovery_stop: str = "fixed"
    recovery_validate_every: int = 1
    recovery_target_gap: float = 1.0
    recovery_patience: int = 3
    recovery_min_delta: float = 0.1
    negate_layers: tuple[str, ...] = ()
    negate_bias: bool = True
    forget: ForgetConfig = field(default_factory=ForgetConfig)
    backdoor: BackdoorConfig = field(default_factory=BackdoorConfig)
    eval_every: int = 5
    mia_max_members: int = 2000
    eval_trajectory: bool = False  # measure every round of every method (results: trajectory)
    # Share of the training pool reserved for the server (in no partition), e.g. FUKD's
    # unlabeled distillation data; part of the pretraining key.
    server_data_fraction: float = 0.0
    # Upper bound on a recorded training history (FedEraser, FUKD, PGD), in MB (1e6 B).
    history_max_mb: float = 2048.0
    # (method, key, value-as-text) triples from run-config ``method-params``, sorted;
    # each method's parameters class types and checks them (strategies/params.py).
    method_params: tuple[tuple[str, str, str], ...] = ()
    # Service mode (service.rounds > 0): train continuously and serve requests as they
    # arrive (fedunlearn.service); the output dir holds the checkpoint and the versions.
    service_rounds: int = 0
    service_query_every: int = 1
    service_min_replies: float = 1.0
    service_round_retries: int = 2
    service_validate_every: int = 0
    service_deadline_rounds: int = 0
    service_deadline_days: float = 30.0
    service_method_retries: int = 2
    service_retry_after: int = 1
    service_wall_s: float = 0.0

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ExperimentConfig:
        """Build from a flat Flower run-config (missing keys take the defaults).

        Every value is type-checked (an integer key takes an integer, or a string of
        one; a number key takes an int or a finite float; a flag takes a bool) and
        range-checked (:meth:`validate`); a bad one raises ``ValueError`` naming the
        key, the value and what is allowed."""
        rc = dict(run_config)
        d = cls()
        f = d.forget
        b = d.backdoor

        def get(key: str, default: Any) -> Any:
            return rc.get(key, default)

        def i(key: str, default: int) -> int:
            return read_int(key, get(key, default))

        def x(key: str, default: float) -> float:
            return read_float(key, get(key, default))

        def t(key: str, default: str) -> str:
            return read_str(key, get(key, default))

        def flag(key: str, default: bool) -> bool:
            return read_bool(key, get(key, default))

        methods = parse_str_list(t("method", ",".join(d.methods)))
        params = parse_method_params(t("method-params", ""))
        forget = ForgetConfig(
            scope=t("forget.scope", f.scope).strip().lower(),
            clients=parse_int_list(get("forget.clients", "0"), "forget.clients"),
            classes=parse_int_list(get("forget.classes", ""), "forget.classes"),
            fraction=x("forget.fraction", f.fraction),
            sample_ids=parse_int_list(get("forget.sample-ids", ""), "forget.sample-ids"),
            data_of=i("forget.data-of", f.data_of),
        )
        backdoor = BackdoorConfig(
            clients=parse_int_list(get("backdoor.clients", ""), "backdoor.clients"),
            fraction=x("backdoor.fraction", b.fraction),
            target=i("backdoor.target", b.target),
            patch_size=i("backdoor.patch-size", b.patch_size),
            position=t("backdoor.position", b.position).strip().lower(),
            value=t("backdoor.value", b.value).strip().lower(),
        )
        cfg = cls(
            methods=tuple(m.lower() for m in methods),
            seed=i("seed", d.seed),
            output_dir=t("output-dir", d.output_dir),
            checkpoint_dir=t("checkpoint-dir", d.checkpoint_dir),
            device=t("device", d.device).strip().lower(),
            dataset=t("dataset.name", d.dataset).lower(),
            data_root=t("dataset.root", d.data_root),
            data_download=flag("dataset.download", d.data_download),
            data_size=i("dataset.size", d.data_size),
            model=t("model.name", d.model).lower(),
            num_clients=i("federation.num-clients", d.num_clients),
            partitioning=t("federation.partitioning", d.partitioning).lower(),
            alpha=x("federation.alpha", d.alpha),
            val_fraction=x("federation.val-fraction", d.val_fraction),
            batch_size=i("federation.batch-size", d.batch_size),
            local_epochs=i("federation.local-epochs", d.local_epochs),
            momentum=x("federation.momentum", d.momentum),
            reply_timeout=x("federation.reply-timeout", d.reply_timeout),
            pretrain_rounds=i("pretrain.rounds", d.pretrain_rounds),
            pretrain_lr=x("pretrain.lr", d.pretrain_lr),
            unlearn_rounds=i("unlearn.rounds", d.unlearn_rounds),
            unlearn_lr=x("unlearn.lr", d.unlearn_lr),
            unlearn_local_epochs=i("unlearn.local-epochs", d.unlearn_local_epochs),
            unlearn_clip_norm=x("unlearn.clip-norm", d.unlearn_clip_norm),
            unlearn_server_momentum=x("unlearn.server-momentum", d.unlearn_server_momentum),
            recovery_stop=t("unlearn.stop", d.recovery_stop).strip().lower(),
            recovery_validate_every=i("unlearn.validate-every", d.recovery_validate_every),
            recovery_target_gap=x("unlearn.target-gap", d.recovery_target_gap),
            recovery_patience=i("unlearn.patience", d.recovery_patience),
            recovery_min_delta=x("unlearn.min-delta", d.recovery_min_delta),
            negate_layers=parse_str_list(t("negation.layers", "")),
            negate_bias=flag("negation.bias", d.negate_bias),
            forget=forget,
            backdoor=backdoor,
            eval_every=i("eval.every", d.eval_every),
            mia_max_members=i("eval.mia-max-members", d.mia_max_members),
            eval_trajectory=flag("eval.trajectory", d.eval_trajectory),
            server_data_fraction=x("server-data.fraction", d.server_data_fraction),
            history_max_mb=x("history.max-mb", d.history_max_mb),
            method_params=tuple(sorted((m, k, v) for m, kv in params.items()
                                       for k, v in kv.items())),
            service_rounds=i("service.rounds", d.service_rounds),
            service_query_every=i("service.query-every", d.service_query_every),
            service_min_replies=x("service.min-replies", d.service_min_replies),
            service_round_retries=i("service.round-retries", d.service_round_retries),
            service_validate_every=i("service.validate-every", d.service_validate_every),
            service_deadline_rounds=i("service.deadline-rounds", d.service_deadline_rounds),
            service_deadline_days=x("service.deadline-days", d.service_deadline_days),
            service_method_retries=i("service.method-retries", d.service_method_retries),
            service_retry_after=i("service.retry-after", d.service_retry_after),
            service_wall_s=x("service.wall-s", d.service_wall_s),
        )
        cfg.validate()
        return cfg

    def ranges(self) -> dict[str, tuple[Any, Range]]:
        """Each numeric run-config key: its value here and its allowed range."""
        return {
            "seed": (self.seed, Range(0, MAX_SEED)),
            "federation.num-clients": (self.num_clients, Range(1, MAX_COUNT)),
            "dataset.size": (self.data_size, Range(0, MAX_SYNTHETIC_SIZE,
                                                   note="0: the data set's own size")),
            "federation.batch-size": (self.batch_size, Range(1, MAX_COUNT)),
            "federation.local-epochs": (self.local_epochs, Range(1, MAX_ROUNDS)),
            "federation.alpha": (self.alpha, Range(0, 1e6, lo_open=True)),
            "federation.val-fraction": (self.val_fraction, Range(0, 1, hi_open=True)),
            "federation.momentum": (self.momentum, Range(0, 1, hi_open=True)),
            "federation.reply-timeout": (self.reply_timeout, Range(0, MAX_REPLY_TIMEOUT_S,
                                                                   lo_open=True)),
            "pretrain.rounds": (self.pretrain_rounds, Range(0, MAX_ROUNDS)),
            "pretrain.lr": (self.pretrain_lr, Range(0, MAX_LR, lo_open=True)),
            "unlearn.rounds": (self.unlearn_rounds, Range(0, MAX_ROUNDS)),
            "unlearn.lr": (self.unlearn_lr, Range(0, MAX_LR, lo_open=True)),
            "unlearn.local-epochs": (self.unlearn_local_epochs, Range(1, MAX_ROUNDS)),
            "unlearn.clip-norm": (self.unlearn_clip_norm, Range(0, 1e6, note="0: off")),
            "unlearn.server-momentum": (self.unlearn_server_momentum,
                                        Range(0, 1, hi_open=True, note="0: plain FedAvg")),
            "unlearn.validate-every": (self.recovery_validate_every, Range(1, MAX_ROUNDS)),
            "unlearn.target-gap": (self.recovery_target_gap,
                                   Range(0, 100, hi_open=True, note="accuracy points")),
            "unlearn.patience": (self.recovery_patience, Range(1, MAX_ROUNDS)),
            "unlearn.min-delta": (self.recovery_min_delta,
                                  Range(0, 100, hi_open=True, note="accuracy points")),
            "eval.every": (self.eval_every, Range(1, MAX_ROUNDS)),
            "eval.mia-max-members": (self.mia_max_members, Range(1, MAX_COUNT)),
            "server-data.fraction": (self.server_data_fraction,
                                     Range(0, 0.5, note="0: the server holds no data")),
            "history.max-mb": (self.history_max_mb, Range(0, 1e7, lo_open=True)),
            "forget.fraction": (self.forget.fraction, Range(0, 1, lo_open=True)),
            "forget.data-of": (self.forget.data_of,
                               Range(-1, self.num_clients - 1, note="-1: the client's own")),
        }

    def service_config(self):
        """The :class:`fedunlearn.service.ServiceConfig` of the run-config's ``service.*``
        (training as in pretraining: ``pretrain.lr``, ``federation.local-epochs``)."""
        from ..service import ServiceConfig

        return ServiceConfig(
            rounds=self.service_rounds, wall_s=self.service_wall_s,
            query_every=self.service_query_every, lr=self.pretrain_lr,
            local_epochs=self.local_epochs, min_replies=self.service_min_replies,
            round_retries=self.service_round_retries,
            validate_every=self.service_validate_every,
            deadline_rounds=self.service_deadline_rounds,
            deadline_days=self.service_deadline_days,
            method_retries=self.service_method_retries,
            retry_after=self.service_retry_after, seed=self.seed)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad value and what is allowed."""
        from .data import DATASET_TRAIN_SIZES, DATASETS
        from .models import list_models

        # Method names and method parameters are checked by the method registry
        # (fedunlearn.strategies.check_methods), which knows every method.
        if not self.methods:
            raise ValueError("method is empty; name at least one method")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset.name={self.dataset!r} is unknown; choose from {DATASETS}")
        if self.model not in list_models():
            raise ValueError(f"model.name={self.model!r} is unknown; choose from {list_models()}")
        if self.partitioning not in PARTITIONINGS:
            raise ValueError(
                f"federation.partitioning={self.partitioning!r}; choose from {PARTITIONINGS}"
            )
        for key, (value, allowed) in self.ranges().items():
            allowed.check(key, value)
        if self.data_size and self.dataset != "synthetic":
            raise ValueError(f"dataset.size={self.data_size} applies to synthetic only; "
                             f"{self.dataset} has its own size (use dataset.size=0)")
        size = self.data_size or DATASET_TRAIN_SIZES[self.dataset]
        pool = int(size * (1.0 - self.server_data_fraction))
        if self.num_clients > pool:
            raise ValueError(
                f"federation.num-clients={self.num_clients}: {self.dataset} has {pool} "
                "training samples for the clients; use at most that many clients (each "
                "partition needs data)")
        if self.recovery_stop not in RECOVERY_STOPS:
            raise ValueError(f"unlearn.stop={self.recovery_stop!r}; choose from "
                             f"{RECOVERY_STOPS} (validation: stop when recovered, fixed: "
                             "always unlearn.rounds)")
        if self.recovery_stop == "validation" and self.val_fraction == 0:
            raise ValueError("unlearn.stop='validation' needs validation data: "
                             "federation.val-fraction=0.0 leaves the clients none; set "
                             "federation.val-fraction > 0 or unlearn.stop='fixed'")
        if self.forget.scope not in SCOPES:
            raise ValueError(f"forget.scope={self.forget.scope!r}; choose from {SCOPES}")
        for key, ids in (("forget.clients", self.forget.clients),
                         ("backdoor.clients", self.backdoor.clients)):
            bad = [c for c in ids if not 0 <= c < self.num_clients]
            if bad:
                raise ValueError(f"{key}: {_first(bad)} outside the partitions "
                                 f"0..{self.num_clients - 1}")
        for key, ids in (("forget.classes", self.forget.classes),
                         ("forget.sample-ids", self.forget.sample_ids)):
            bad = [c for c in ids if c < 0]
            if bad:
                raise ValueError(f"{key}: {_first(bad)} negative; expected labels/ids >= 0")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"device={self.device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        self.backdoor.validate()
        if self.service_rounds:
            self.service_config()  # raises naming the bad service.* key
            if len(self.methods) != 1:
                raise ValueError(f"method={','.join(self.methods)}: service mode "
                                 "(service.rounds > 0) serves with one method; name one, "
                                 "e.g. method=\"not\"")
        # Whether a request names classes or samples the data holds is checked by the
        # server per request, so that a bad request is rejected without stopping the run.

    # -- derived values -----------------------------------------------------------
    def pretrain_key(self, resolved: Mapping[str, Any] | None = None) -> str:
        """Hash of everything that determines the pretrained model.

        ``resolved`` adds values only known once the data is loaded (e.g. the backdoor's
        actual patch size and trigger value when they are "auto")."""
        fields = {
            "dataset": self.dataset,
            "data_root": os.path.abspath(self.data_root) if self.data_root else "",
            "model": self.model,
            "num_clients": self.num_clients,
            "partitioning": self.partitioning,
            "alpha": self.alpha if self.partitioning == "dirichlet" else None,
            "val_fraction": self.val_fraction,
            "batch_size": self.batch_size,
            "local_epochs": self.local_epochs,
            "momentum": self.momentum,
            "rounds": self.pretrain_rounds,
            "lr": self.pretrain_lr,
            "seed": self.seed,
            "format": 1,
            **({"data_size": self.data_size} if self.data_size else {}),
        }
        if self.server_data_fraction > 0:  # fewer samples in the partitions
            fields["server_data_fraction"] = self.server_data_fraction
        if self.backdoor.enabled:  # a planted backdoor changes the pretrained model
            fields["backdoor"] = self.backdoor.describe()
        fields.update(resolved or {})
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def params_by_method(self) -> dict[str, dict[str, str]]:
        """``method-params`` as ``{method: {key: value}}``."""
        out: dict[str, dict[str, str]] = {}
        for method, key, value in self.method_params:
            out.setdefault(method, {})[key] = value
        return out

    def method_params_for(self, method: str) -> dict[str, str]:
        return self.params_by_method().get(method, {})

    def resolved_checkpoint_dir(self) -> Path:
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir).expanduser().resolve()
        base = os.environ.get("FEDUNLEARN_CACHE") or os.path.join(
            os.path.expanduser("~"), ".cache", "fedunlearn"
        )
        return Path(base) / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
