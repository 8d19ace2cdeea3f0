"""Hydra config -> Flower run-config: the one place where the two are mapped.

The Hydra config groups in ``conf/`` mirror the library (``method/``, ``dataset/``,
``model/``, ``forget/``, ``federation/``, ``backdoor/``); Flower takes a flat run-config
whose keys and defaults are declared once, in the key table
:data:`fedunlearn.harness.keys.KEYS` (``[tool.flwr.app.config]`` of ``pyproject.toml``
repeats the defaults for Flower; a test checks that it holds the same).
:data:`RUN_CONFIG_MAP` says which config path feeds which run-config key and with which
type: the keys and types come from the key table, the paths from :func:`hydra_path`;
:func:`to_run_config` applies it. ``tests/test_experiment_config.py`` composes
``conf/config.yaml`` with its defaults and checks that the result equals the key table's
defaults key by key, so the sources cannot drift apart silently.

``forget.ratio`` is a run-config key as well (the app derives the clients from it); the
job's run-config also names the clients it gives (``forget.clients``). Some config
values are for the runner only and never reach Flower: ``federation.num_supernodes`` and
``federation.client_resources`` (the simulation's ``--federation-config``), ``verbose``
and ``report``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..harness.keys import KEYS, format_method_params, ratio_targets
from ..launch import project_root

#: Hydra paths of the run-config keys not at their own dotted path (with ``-`` as ``_``):
#: the method group holds the method's own recovery settings and NoT's layers, the
#: federation group the recovery protocol and pretraining.
HYDRA_PATHS = {
    "method": "method.name",
    "method-params": "method.params",  # flattened by _method_params_text
    "unlearn.lr": "method.unlearn.lr",
    "unlearn.local-epochs": "method.unlearn.local_epochs",
    "unlearn.clip-norm": "method.unlearn.clip_norm",
}
HYDRA_PREFIXES = {"pretrain.": "federation.pretrain.", "unlearn.": "federation.unlearn.",
                  "negation.": "method.negation."}


def hydra_path(key: str) -> str:
    """The dotted path in the composed Hydra config that feeds run-config ``key``."""
    if key in HYDRA_PATHS:
        return HYDRA_PATHS[key]
    for prefix, path in HYDRA_PREFIXES.items():
        if key.startswith(prefix):
            key = path + key[len(prefix):]
    return key.replace("-", "_")


#: run-config key -> (dotted path in the composed Hydra config, type), for every key of
#: the run-config key table (:data:`fedunlearn.harness.keys.KEYS`), with its type.
RUN_CONFIG_MAP: dict[str, tuple[str, type]] = {key.name: (hydra_path(key.name), key.type)
                                               for key in KEYS}

_MISSING = object()


def conf_dir() -> Path:
    """The ``conf/`` directory next to the Flower App's ``pyproject.toml``."""
    return project_root() / "conf"


def _select(cfg: Mapping, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        if isinstance(node, (Mapping, DictConfig)) and part in node:
            node = node[part]
        else:
            return _MISSING
    return node


def _cast(value: Any, kind: type, key: str, path: str) -> bool | int | float | str:
    """A run-config value of ``kind`` (lists become comma-separated strings)."""
    if kind is str:
        if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
            return ",".join(str(v) for v in value)
        if value is None:
            return ""
        return str(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ValueError(f"{path}={value!r} (run-config {key}): expected true or false")
    try:
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{path}={value!r} (run-config {key}): expected {kind.__name__}") from None


def _method_params_text(name: Any, params: Any) -> str:
    """``method.params`` as the run-config string ``"<method>.<key>=<value> ..."``.

    A method's yaml holds a flat mapping (``params: {alpha: 2.0}``) for its own
    ``name``; a multi-method choice may hold one mapping per method
    (``params: {puf: {alpha: 2.0}}``). A string is passed on as it is."""
    if params is None or params is _MISSING or (isinstance(params, Mapping) and not params):
        return ""
    if isinstance(params, str):
        return params
    if not isinstance(params, Mapping):
        raise ValueError(f"method.params={params!r}: expected a mapping of parameter values")
    if params and all(isinstance(v, Mapping) for v in params.values()):
        return format_method_params(params)
    names = [n.strip() for n in str(name).split(",") if n.strip()]
    if len(names) != 1:
        raise ValueError(f"method.params for method.name={name!r}: with several methods, "
                         "key the parameters by method ({puf: {alpha: 2.0}})")
    return format_method_params({names[0]: params})


def ratio_clients(ratio: float, num_clients: int) -> str:
    """Target clients for a forget ratio, as run-config ``forget.clients`` text:
    :func:`fedunlearn.harness.keys.ratio_targets` (``0..k-1``, ``k = round(ratio * n)``).

    ``ratio_clients(0.5, 10) == "0,1,2,3,4"``. At least one client, at most all.
    """
    return ",".join(str(i) for i in ratio_targets(ratio, num_clients))


def to_run_config(cfg: Mapping | DictConfig) -> dict[str, bool | int | float | str]:
    """Flatten a composed experiment config into a Flower run-config.

    Only keys whose config path is present are passed on (a method without
    hyperparameters, e.g. Retrain, passes no ``unlearn.*``: the app's defaults apply,
    and that method ignores them). ``forget.ratio``, when above 0, determines
    ``forget.clients``.
    """
    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    foreign = foreign_method_settings(cfg)
    if foreign:
        cfg = dict(cfg, method=_without(cfg["method"], foreign))
    out: dict[str, bool | int | float | str] = {}
    for key, (path, kind) in RUN_CONFIG_MAP.items():
        value = _select(cfg, path)
        if value is _MISSING:
            continue
        if key == "method-params":
            out[key] = _method_params_text(_select(cfg, "method.name"), value)
            continue
        out[key] = _cast(value, kind, key, path)
    if out.get("forget.ratio"):  # the clients it names, for run_config.json and the log
        out["forget.clients"] = ratio_clients(out["forget.ratio"],
                                              int(out.get("federation.num-clients", 10)))
    return out


def _leaves(node: Any, prefix: str = "") -> set[str]:
    """Dotted paths of the leaves of a mapping (a list is a leaf)."""
    if not isinstance(node, Mapping):
        return {prefix} if prefix else set()
    return set().union(*(_leaves(v, f"{prefix}{k}.") for k, v in node.items())) if node else set()


def method_setting_paths() -> dict[str, set[str]]:
    """Per option of ``conf/method/``: the paths under ``method.`` its yaml declares
    (``params.perturbation``, ``unlearn.lr``, ...), ``name`` left out."""
    out = {}
    for path in sorted((conf_dir() / "method").glob("*.yaml")):
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
        out[path.stem] = {p.rstrip(".") for p in _leaves(data)} - {"name"}
    return out


def foreign_method_settings(cfg: Mapping | DictConfig) -> list[str]:
    """``method.*`` settings of a job that its method does not have but another method
    of ``conf/method/`` has, e.g. NoT's ``method.params.perturbation`` in a Retrain job
    of ``-m method=retrain,not method.params.perturbation=negate,reinit``. The job runs
    without them (:func:`to_run_config` drops them; the runner notes it)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    method = cfg.get("method") or {}
    declared = method_setting_paths()
    own = declared.get(str(method.get("name", "")))
    if own is None:  # several methods (compare) or a plugin's: no yaml of its own
        return []
    others = set().union(*declared.values())
    return sorted(f"method.{p}" for p in {q.rstrip(".") for q in _leaves(method)} - {"name"}
                  if p not in own and p in others)


def _without(method: Mapping, paths: list[str]) -> dict:
    """A copy of the ``method`` node without the dotted ``method.*`` ``paths``."""
    drop = {p.removeprefix("method.") for p in paths}

    def prune(node: Mapping, prefix: str) -> dict:
        return {k: prune(v, f"{prefix}{k}.") if isinstance(v, Mapping) else v
                for k, v in node.items() if f"{prefix}{k}" not in drop}
    return prune(method, "")


def federation_settings(cfg: Mapping | DictConfig) -> dict[str, int | float]:
    """Simulation settings for :func:`fedunlearn.launch.flwr_run`.

    ``num_supernodes`` (default: ``federation.num_clients``), ``num_cpus`` (integer, as
    Flower requires) and ``num_gpus`` per ClientApp actor.
    """
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    fed = cfg.get("federation", {}) or {}
    res = fed.get("client_resources", {}) or {}
    num_clients = int(fed.get("num_clients", 10))
    num_supernodes = fed.get("num_supernodes")
    num_cpus = res.get("num_cpus", 1)
    if isinstance(num_cpus, bool) or float(num_cpus) != int(float(num_cpus)) or int(num_cpus) < 1:
        raise ValueError(f"federation.client_resources.num_cpus={num_cpus!r} must be an "
                         "integer >= 1 (Flower rejects fractions)")
    num_gpus = float(res.get("num_gpus", 0.0))
    if num_gpus < 0:
        raise ValueError(f"federation.client_resources.num_gpus={num_gpus} must be >= 0")
    return {"num_supernodes": int(num_supernodes if num_supernodes is not None else num_clients),
            "num_cpus": int(num_cpus), "num_gpus": num_gpus}


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config",
            config_dir: str | Path | None = None) -> DictConfig:
    """Compose ``conf/config.yaml`` with ``overrides`` outside a Hydra app (tests, scripts).

    ``hydra:`` interpolations are not available here; the returned config has no
    ``hydra`` node.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(config_dir or conf_dir()).resolve()),
                               version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))
