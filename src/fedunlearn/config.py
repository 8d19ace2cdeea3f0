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
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backdoor import BackdoorConfig

SCOPES = ("client", "class", "instance")
PARTITIONINGS = ("iid", "dirichlet")
RECOVERY_STOPS = ("validation", "fixed")


def parse_int_list(value: Any, key: str) -> tuple[int, ...]:
    """Parse ``"0,3, 5"`` (or an int) into a tuple of ints; ``""`` gives ``()``."""
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r}: expected comma-separated integers")
    if isinstance(value, int):
        return (value,)
    text = str(value).strip()
    if not text:
        return ()
    out = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise ValueError(
                f"{key}={value!r}: {part!r} is not an integer; expected comma-separated "
                "integers such as '0,3'"
            ) from None
    return tuple(out)


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
    model: str = "cnn"
    num_clients: int = 10
    partitioning: str = "iid"
    alpha: float = 0.5
    val_fraction: float = 0.2
    batch_size: int = 32
    local_epochs: int = 1
    momentum: float = 0.9
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
    # Share of the training pool reserved for the server (in no partition), e.g. FUKD's
    # unlabeled distillation data; part of the pretraining key.
    server_data_fraction: float = 0.0
    # Upper bound on a recorded training history (FedEraser, FUKD, PGD), in MB (1e6 B).
    history_max_mb: float = 2048.0
    # (method, key, value-as-text) triples from run-config ``method-params``, sorted;
    # each method's parameters class types and checks them (strategies/params.py).
    method_params: tuple[tuple[str, str, str], ...] = ()

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ExperimentConfig:
        """Build from a flat Flower run-config (missing keys take the defaults)."""
        rc = dict(run_config)
        d = cls()
        f = d.forget

        def get(key: str, default: Any) -> Any:
            return rc.get(key, default)

        methods = parse_str_list(get("method", ",".join(d.methods)))
        params = parse_method_params(get("method-params", ""))
        forget = ForgetConfig(
            scope=str(get("forget.scope", f.scope)).strip().lower(),
            clients=parse_int_list(get("forget.clients", "0"), "forget.clients"),
            classes=parse_int_list(get("forget.classes", ""), "forget.classes"),
            fraction=float(get("forget.fraction", f.fraction)),
            sample_ids=parse_int_list(get("forget.sample-ids", ""), "forget.sample-ids"),
            data_of=int(get("forget.data-of", f.data_of)),
        )
        b = d.backdoor
        backdoor = BackdoorConfig(
            clients=parse_int_list(get("backdoor.clients", ""), "backdoor.clients"),
            fraction=float(get("backdoor.fraction", b.fraction)),
            target=int(get("backdoor.target", b.target)),
            patch_size=int(get("backdoor.patch-size", b.patch_size)),
            position=str(get("backdoor.position", b.position)).strip().lower(),
            value=str(get("backdoor.value", b.value)).strip().lower(),
        )
        cfg = cls(
            methods=tuple(m.lower() for m in methods),
            seed=int(get("seed", d.seed)),
            output_dir=str(get("output-dir", d.output_dir)),
            checkpoint_dir=str(get("checkpoint-dir", d.checkpoint_dir)),
            device=str(get("device", d.device)),
            dataset=str(get("dataset.name", d.dataset)).lower(),
            data_root=str(get("dataset.root", d.data_root)),
            data_download=bool(get("dataset.download", d.data_download)),
            model=str(get("model.name", d.model)).lower(),
            num_clients=int(get("federation.num-clients", d.num_clients)),
            partitioning=str(get("federation.partitioning", d.partitioning)).lower(),
            alpha=float(get("federation.alpha", d.alpha)),
            val_fraction=float(get("federation.val-fraction", d.val_fraction)),
            batch_size=int(get("federation.batch-size", d.batch_size)),
            local_epochs=int(get("federation.local-epochs", d.local_epochs)),
            momentum=float(get("federation.momentum", d.momentum)),
            pretrain_rounds=int(get("pretrain.rounds", d.pretrain_rounds)),
            pretrain_lr=float(get("pretrain.lr", d.pretrain_lr)),
            unlearn_rounds=int(get("unlearn.rounds", d.unlearn_rounds)),
            unlearn_lr=float(get("unlearn.lr", d.unlearn_lr)),
            unlearn_local_epochs=int(get("unlearn.local-epochs", d.unlearn_local_epochs)),
            unlearn_clip_norm=float(get("unlearn.clip-norm", d.unlearn_clip_norm)),
            unlearn_server_momentum=float(get("unlearn.server-momentum",
                                              d.unlearn_server_momentum)),
            recovery_stop=str(get("unlearn.stop", d.recovery_stop)).strip().lower(),
            recovery_validate_every=int(get("unlearn.validate-every",
                                            d.recovery_validate_every)),
            recovery_target_gap=float(get("unlearn.target-gap", d.recovery_target_gap)),
            recovery_patience=int(get("unlearn.patience", d.recovery_patience)),
            recovery_min_delta=float(get("unlearn.min-delta", d.recovery_min_delta)),
            negate_layers=parse_str_list(get("negation.layers", "")),
            negate_bias=bool(get("negation.bias", d.negate_bias)),
            forget=forget,
            backdoor=backdoor,
            eval_every=int(get("eval.every", d.eval_every)),
            mia_max_members=int(get("eval.mia-max-members", d.mia_max_members)),
            server_data_fraction=float(get("server-data.fraction", d.server_data_fraction)),
            history_max_mb=float(get("history.max-mb", d.history_max_mb)),
            method_params=tuple(sorted((m, k, v) for m, kv in params.items()
                                       for k, v in kv.items())),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad value and what is allowed."""
        from .data import DATASETS
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
        positive = {
            "federation.num-clients": self.num_clients,
            "federation.batch-size": self.batch_size,
            "federation.local-epochs": self.local_epochs,
            "unlearn.local-epochs": self.unlearn_local_epochs,
            "eval.every": self.eval_every,
            "unlearn.validate-every": self.recovery_validate_every,
            "unlearn.patience": self.recovery_patience,
            "eval.mia-max-members": self.mia_max_members,
        }
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"{key}={value} must be >= 1")
        for key, value in {"pretrain.rounds": self.pretrain_rounds,
                           "unlearn.rounds": self.unlearn_rounds}.items():
            if value < 0:
                raise ValueError(f"{key}={value} must be >= 0")
        for key, value in {"pretrain.lr": self.pretrain_lr, "unlearn.lr": self.unlearn_lr,
                           "federation.alpha": self.alpha}.items():
            if not value > 0:
                raise ValueError(f"{key}={value} must be > 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"federation.momentum={self.momentum} must be in [0, 1)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"federation.val-fraction={self.val_fraction} must be in [0, 1)")
        if not 0.0 <= self.unlearn_server_momentum < 1.0:
            raise ValueError(f"unlearn.server-momentum={self.unlearn_server_momentum} must be "
                             "in [0, 1) (0: plain FedAvg)")
        if self.recovery_stop not in RECOVERY_STOPS:
            raise ValueError(f"unlearn.stop={self.recovery_stop!r}; choose from "
                             f"{RECOVERY_STOPS} (validation: stop when recovered, fixed: "
                             "always unlearn.rounds)")
        for key, value in {"unlearn.target-gap": self.recovery_target_gap,
                           "unlearn.min-delta": self.recovery_min_delta}.items():
            if not (value >= 0 and value < 100):
                raise ValueError(f"{key}={value} must be in [0, 100) accuracy points")
        if not 0.0 <= self.server_data_fraction <= 0.5:
            raise ValueError(f"server-data.fraction={self.server_data_fraction} must be in "
                             "[0, 0.5] (0: the server holds no data)")
        if not self.history_max_mb > 0:  # NaN too
            raise ValueError(f"history.max-mb={self.history_max_mb} must be > 0")
        if self.unlearn_clip_norm < 0:
            raise ValueError(f"unlearn.clip-norm={self.unlearn_clip_norm} must be >= 0 (0: off)")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device={self.device!r}; use 'auto', 'cpu' or 'cuda[:N]'")
        self.backdoor.validate()
        bad = [c for c in self.backdoor.clients if not 0 <= c < self.num_clients]
        if bad:
            raise ValueError(
                f"backdoor.clients {bad} outside the partitions 0..{self.num_clients - 1}")
        # The request itself (scope, classes, ids) is validated by the server per
        # request, so that a bad request is rejected without stopping the run.

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
