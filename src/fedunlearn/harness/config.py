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
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..ranges import MAX_LR, MAX_ROUNDS, MAX_SEED, Range  # noqa: F401  (re-export)
from ..service.config import ServiceConfig
from ..parsing import parse_int_list  # noqa: F401  (re-export)
from .backdoor import BackdoorConfig
from .keys import (BY_NAME, DEFAULTS, KEYS, MAX_COUNT, MAX_REPLY_TIMEOUT_S,  # noqa: F401
                   MAX_SYNTHETIC_SIZE, PARTITIONINGS, format_method_params,
                   parse_method_params, parse_str_list, ratio_targets, read_bool, read_float,
                   read_int, read_str)

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]{1,3})?")


def _first(values, limit: int = 5) -> str:
    """``[a, b, c]`` or ``[a, b, c, d, e, ... (N in all)]``: a bounded list for a message."""
    values = list(values)
    shown = ", ".join(map(str, values[:limit]))
    return f"[{shown}]" if len(values) <= limit else f"[{shown}, ... ({len(values)} in all)]"


@dataclass(frozen=True)
class ForgetConfig:
    """What the simulated clients ask to forget (run-config ``forget.*``)."""

    scope: str = DEFAULTS["forget.scope"]
    clients: tuple[int, ...] = DEFAULTS["forget.clients"]
    ratio: float = DEFAULTS["forget.ratio"]  # > 0: clients are 0..k-1 (ratio_targets)
    classes: tuple[int, ...] = DEFAULTS["forget.classes"]
    fraction: float = DEFAULTS["forget.fraction"]
    sample_ids: tuple[int, ...] = DEFAULTS["forget.sample_ids"]
    data_of: int = DEFAULTS["forget.data_of"]  # partition the request names; -1: its own


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one fedunlearn job needs, typed and validated.

    Each field is set by one run-config key (:data:`fedunlearn.harness.keys.KEYS`, which
    also holds its default, allowed values and doc)."""

    methods: tuple[str, ...] = DEFAULTS["methods"]
    seed: int = DEFAULTS["seed"]
    # Seeds the data split alone (-1: ``seed``); :attr:`split_seed` is the value in use.
    partition_seed: int = DEFAULTS["partition_seed"]
    output_dir: str = DEFAULTS["output_dir"]
    checkpoint_dir: str = DEFAULTS["checkpoint_dir"]
    device: str = DEFAULTS["device"]
    dataset: str = DEFAULTS["dataset"]
    data_root: str = DEFAULTS["data_root"]
    data_download: bool = DEFAULTS["data_download"]
    data_size: int = DEFAULTS["data_size"]  # synthetic's training samples (0: its default)
    model: str = DEFAULTS["model"]
    num_clients: int = DEFAULTS["num_clients"]
    partitioning: str = DEFAULTS["partitioning"]
    alpha: float = DEFAULTS["alpha"]
    val_fraction: float = DEFAULTS["val_fraction"]
    batch_size: int = DEFAULTS["batch_size"]
    local_epochs: int = DEFAULTS["local_epochs"]
    momentum: float = DEFAULTS["momentum"]
    reply_timeout: float = DEFAULTS["reply_timeout"]  # seconds the server waits for replies
    pretrain_rounds: int = DEFAULTS["pretrain_rounds"]
    pretrain_lr: float = DEFAULTS["pretrain_lr"]
    unlearn_rounds: int = DEFAULTS["unlearn_rounds"]  # the maximum when stop="validation"
    unlearn_lr: float = DEFAULTS["unlearn_lr"]
    unlearn_local_epochs: int = DEFAULTS["unlearn_local_epochs"]
    unlearn_clip_norm: float = DEFAULTS["unlearn_clip_norm"]
    unlearn_server_momentum: float = DEFAULTS["unlearn_server_momentum"]
    recovery_stop: str = DEFAULTS["recovery_stop"]
    recovery_validate_every: int = DEFAULTS["recovery_validate_every"]
    recovery_target_gap: float = DEFAULTS["recovery_target_gap"]
    recovery_patience: int = DEFAULTS["recovery_patience"]
    recovery_min_delta: float = DEFAULTS["recovery_min_delta"]
    negate_layers: tuple[str, ...] = DEFAULTS["negate_layers"]
    negate_bias: bool = DEFAULTS["negate_bias"]
    forget: ForgetConfig = field(default_factory=ForgetConfig)
    backdoor: BackdoorConfig = field(default_factory=BackdoorConfig)
    eval_every: int = DEFAULTS["eval_every"]
    mia_max_members: int = DEFAULTS["mia_max_members"]
    eval_trajectory: bool = DEFAULTS["eval_trajectory"]  # results: trajectory
    audit_outputs: bool = DEFAULTS["audit_outputs"]  # outputs.npz beside results.json
    # > 0: each method's relearn time (harness/relearn.py), results.json's ``relearn``.
    audit_relearn_rounds: int = DEFAULTS["audit_relearn_rounds"]
    # Share of the training pool reserved for the server (in no partition), e.g. FUKD's
    # unlabeled distillation data; part of the pretraining key.
    server_data_fraction: float = DEFAULTS["server_data_fraction"]
    # Upper bound on a recorded training history (FedEraser, FUKD, PGD), in MB (1e6 B).
    history_max_mb: float = DEFAULTS["history_max_mb"]
    # (method, key, value-as-text) triples from run-config ``method-params``, sorted;
    # each method's parameters class types and checks them (strategies/params.py).
    method_params: tuple[tuple[str, str, str], ...] = DEFAULTS["method_params"]
    # Service mode (service.rounds > 0): train continuously and serve requests as they
    # arrive (fedunlearn.service); the output dir holds the checkpoint and the versions.
    service_rounds: int = DEFAULTS["service_rounds"]
    service_query_every: int = DEFAULTS["service_query_every"]
    service_min_replies: float = DEFAULTS["service_min_replies"]
    service_round_retries: int = DEFAULTS["service_round_retries"]
    service_validate_every: int = DEFAULTS["service_validate_every"]
    service_deadline_rounds: int = DEFAULTS["service_deadline_rounds"]
    service_deadline_days: float = DEFAULTS["service_deadline_days"]
    service_method_retries: int = DEFAULTS["service_method_retries"]
    service_retry_after: int = DEFAULTS["service_retry_after"]
    service_wall_s: float = DEFAULTS["service_wall_s"]
    service_rebuild: bool = DEFAULTS["service_rebuild"]

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ExperimentConfig:
        """Build from a flat Flower run-config (missing keys take the defaults).

        Every value is type-checked (an integer key takes an integer, or a string of
        one; a number key takes an int or a finite float; a flag takes a bool) and
        range-checked (:meth:`validate`), as :data:`~fedunlearn.harness.keys.KEYS`
        declares; a bad one raises ``ValueError`` naming the key, the value and what is
        allowed."""
        top: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {"forget": {}, "backdoor": {}}
        for key in KEYS:
            value = key.parse(run_config.get(key.name, key.default))
            group, dot, name = key.field.partition(".")
            if dot:
                nested[group][name] = value
            else:
                top[key.field] = value
        ratio = nested["forget"]["ratio"]
        if 0 < ratio <= 1:  # outside: validate() names the range
            nested["forget"]["clients"] = ratio_targets(ratio, top["num_clients"])
        cfg = cls(**top, forget=ForgetConfig(**nested["forget"]),
                  backdoor=BackdoorConfig(**nested["backdoor"]))
        cfg.validate()
        return cfg

    def value(self, field_path: str) -> Any:
        """The value of a field (``forget.fraction``: ``self.forget.fraction``)."""
        obj: Any = self
        for part in field_path.split("."):
            obj = getattr(obj, part)
        return obj

    def ranges(self) -> dict[str, tuple[Any, Range]]:
        """Each numeric run-config key that applies: its value here and its allowed
        range (a ``service.*`` key in service mode only, a ``backdoor.*`` key with a
        backdoor only)."""
        out = {key.name: (self.value(key.field), key.range) for key in KEYS
               if key.range is not None and (not key.when or self.value(key.when))}
        data_of = BY_NAME["forget.data-of"].range
        out["forget.data-of"] = (self.forget.data_of,
                                 dataclasses.replace(data_of, hi=self.num_clients - 1))
        return out

    def service_config(self) -> ServiceConfig:
        """The :class:`fedunlearn.service.ServiceConfig` of the run-config's ``service.*``
        (training as in pretraining: ``pretrain.lr``, ``federation.local-epochs``): each
        field from the key that shares it (:data:`~fedunlearn.harness.keys.KEYS`)."""
        return ServiceConfig(**{name: self.value(key.field) for key in KEYS
                                for cls, name in key.shared if cls is ServiceConfig})

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad value and what is allowed."""
        from .data import DATASET_TRAIN_SIZES

        # Method names and method parameters are checked by the method registry
        # (fedunlearn.strategies.check_methods), which knows every method.
        if not self.methods:
            raise ValueError("method is empty; name at least one method")
        for key in KEYS:
            if key.choices is not None and (not key.when or self.value(key.when)):
                key.check(self.value(key.field))
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
        if self.recovery_stop == "validation" and self.val_fraction == 0:
            raise ValueError("unlearn.stop='validation' needs validation data: "
                             "federation.val-fraction=0.0 leaves the clients none; set "
                             "federation.val-fraction > 0 or unlearn.stop='fixed'")
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
            if self.audit_outputs:
                raise ValueError("audit.outputs=true: service mode (service.rounds > 0) "
                                 "publishes versions, not results.json with outputs.npz; "
                                 "set audit.outputs=false or service.rounds=0")
            if self.audit_relearn_rounds:
                raise ValueError(f"audit.relearn-rounds={self.audit_relearn_rounds}: service "
                                 "mode (service.rounds > 0) publishes versions, not "
                                 "results.json with a relearn time; set "
                                 "audit.relearn-rounds=0 or service.rounds=0")
            if len(self.methods) != 1:
                raise ValueError(f"method={','.join(self.methods)}: service mode "
                                 "(service.rounds > 0) serves with one method; name one, "
                                 "e.g. method=\"not\"")
        # Whether a request names classes or samples the data holds is checked by the
        # server per request, so that a bad request is rejected without stopping the run.

    # -- derived values -----------------------------------------------------------
    @property
    def split_seed(self) -> int:
        """The seed of the data split (``partition-seed``, or ``seed`` when it is -1):
        partitions, the server's share, each client's train/val split, an instance-wise
        request's drawn ids and a backdoor client's poisoned ids."""
        return self.seed if self.partition_seed < 0 else self.partition_seed

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
            # Only when it differs from seed, so the keys of existing caches stay valid.
            **({"partition_seed": self.split_seed} if self.split_seed != self.seed else {}),
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
