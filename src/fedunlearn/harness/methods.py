"""The harness's methods: each strategy built from the run-config, and the run-config's
method settings checked before Flower starts.

The library's strategies take explicit constructor arguments only
(``NoT(Recovery(...), params, model_fn=..., layers=...)``); this module is where the
harness's :class:`~fedunlearn.harness.config.ExperimentConfig` becomes those arguments::

    strategy = create_method("not", context)   # context: a HarnessContext

and where settings a method cannot run with are refused up front (a NoT layer name that
the run's model does not have, FUKD without server data), naming the key to change.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..history import HistorySpec, check_bound, model_float_bytes
from ..layers import example_input_for
from ..negation import select_negation_params
from ..perturbations import CANCELLING
from ..strategies import get_method, list_methods
from ..strategies.base import Recovery, Training, UnlearningContext, UnlearningStrategy
from ..strategies.fukd import FUKD
from ..strategies.lwo import LayerwiseOptimalityCheck as LWO
from ..strategies.negation_not import NoT
from ..strategies.params import MethodParams
from .config import ExperimentConfig


@dataclass
class HarnessContext(UnlearningContext):
    """An :class:`~fedunlearn.strategies.UnlearningContext` built by the harness: it
    carries the run's config, records the training history while it pretrains and
    reserves the server's data (``managed``)."""

    cfg: ExperimentConfig | None = None
    managed: bool = True


def recovery_from(cfg: ExperimentConfig) -> Recovery:
    """``unlearn.*`` as a :class:`~fedunlearn.Recovery`."""
    return Recovery(rounds=cfg.unlearn_rounds, lr=cfg.unlearn_lr,
                    local_epochs=cfg.unlearn_local_epochs, clip_norm=cfg.unlearn_clip_norm,
                    server_momentum=cfg.unlearn_server_momentum, stop=cfg.recovery_stop,
                    validate_every=cfg.recovery_validate_every,
                    target_gap=cfg.recovery_target_gap, patience=cfg.recovery_patience,
                    min_delta=cfg.recovery_min_delta)


def training_from(cfg: ExperimentConfig) -> Training:
    """``pretrain.*`` as a :class:`~fedunlearn.Training` (how the original model was
    trained: Retrain repeats it)."""
    return Training(rounds=cfg.pretrain_rounds, lr=cfg.pretrain_lr,
                    local_epochs=cfg.local_epochs)


def params_from(cls: type[UnlearningStrategy], cfg: ExperimentConfig) -> MethodParams:
    """The method's parameters from the run-config's ``method-params``."""
    return cls.Params.from_values(cls.name, cfg.method_params_for(cls.name))


def method_kwargs(cls: type[UnlearningStrategy], cfg: ExperimentConfig) -> dict:
    """Constructor arguments a method takes from the run-config besides the shared ones
    (NoT and its variants: ``negation.layers`` and ``negation.bias``)."""
    if issubclass(cls, NoT):
        return {"layers": list(cfg.negate_layers) or None, "include_bias": cfg.negate_bias}
    return {}


def build(cls: type[UnlearningStrategy], cfg: ExperimentConfig,
          context: UnlearningContext | None = None, **kwargs) -> UnlearningStrategy:
    """``cls`` with the run-config's settings (``kwargs`` override them)."""
    args = dict(recovery=recovery_from(cfg), params=params_from(cls, cfg),
                training=training_from(cfg), seed=cfg.seed, eval_every=cfg.eval_every,
                device=cfg.device, context=context)
    args.update(method_kwargs(cls, cfg))
    args.update(kwargs)
    return cls(**args)


def create_method(name: str, context: HarnessContext, **kwargs) -> UnlearningStrategy:
    """The harness's strategy for method ``name``, built from ``context.cfg`` and bound
    to ``context``."""
    return build(get_method(name), context.cfg, context, **kwargs)


def preflight(name: str, context: HarnessContext) -> None:
    """Fail before pretraining on settings that would only fail later (NoT: resolve the
    layers to negate on a fresh model)."""
    if issubclass(get_method(name), NoT):
        create_method(name, context).check_ready()


def check_method_config(cls: type[UnlearningStrategy], cfg: ExperimentConfig,
                        params: MethodParams) -> None:
    """Refuse run-config settings ``cls`` cannot run with (``ValueError`` saying what to
    change)."""
    if issubclass(cls, NoT) and cfg.negate_layers:
        _check_negation_layers(cfg, params)
    if issubclass(cls, LWO):
        sliced = [n for n in cfg.negate_layers if ":q" in n or "[" in n]
        if sliced:
            raise ValueError(f"negation.layers={','.join(cfg.negate_layers)!r}: lwo freezes "
                             f"whole parameters; rows of one ({sliced}) cannot be frozen")
    if issubclass(cls, FUKD) and cfg.server_data_fraction <= 0:
        raise ValueError(
            "fukd distils on unlabeled data held by the server, and this job reserves "
            "none (server-data.fraction=0.0): set server-data.fraction, e.g. "
            "server-data.fraction=0.1 reserves 10% of the training pool for the server, "
            "in no client's partition (it changes the partitions, so pretraining runs "
            "once more for it)")


def _check_negation_layers(cfg: ExperimentConfig, params: MethodParams) -> None:
    """``negation.layers`` names layers of the run's model (resolved on a fresh one,
    built from the data set's shape): a typo fails before Flower starts."""
    from .data import DATASET_SHAPES
    from .models import create_model

    classes, channels, size = DATASET_SHAPES[cfg.dataset]
    model = create_model(cfg.model, num_classes=classes, in_channels=channels,
                         image_size=size)
    try:
        select_negation_params(model, example_input_for(channels, size),
                               layers=list(cfg.negate_layers), include_bias=cfg.negate_bias,
                               refuse_cancelling=params.perturbation in CANCELLING)
    except ValueError as err:
        raise ValueError(f"negation.layers={','.join(cfg.negate_layers)!r}: {err}") from None


def check_methods(cfg: ExperimentConfig) -> dict[str, MethodParams]:
    """Check the job's method list and method parameters; return each method's params.

    Raises ``ValueError`` naming the bad method, key or value and what is allowed."""
    known = list_methods()
    if not cfg.methods:
        raise ValueError(f"method is empty; choose from {known}")
    for m in cfg.methods:
        if m not in known:
            raise ValueError(f"method={m!r} is unknown; choose from {known}")
    if len(set(cfg.methods)) != len(cfg.methods):
        raise ValueError(f"method lists a method twice: {','.join(cfg.methods)}")
    for m in cfg.params_by_method():
        if m not in known:
            raise ValueError(f"method-params names method {m!r}, which is unknown; "
                             f"choose from {known}")
        if m not in cfg.methods:
            raise ValueError(f"method-params sets parameters of {m!r}, which this job does "
                             f"not run (method={','.join(cfg.methods)})")
    params = {m: params_from(get_method(m), cfg) for m in cfg.methods}
    for m, p in params.items():
        check_method_config(get_method(m), cfg, p)
        if cfg.service_rounds and get_method(m).history_needs(p):
            raise ValueError(
                f"method={m}: service mode (service.rounds > 0) cannot serve with a method "
                "that replays the training history (federaser, fukd, pgd): the service "
                "trains on after every step; choose a method that needs none (not, ft, puf, "
                "...)")
    check_history_bound(cfg, params)
    return params


def history_spec(cfg: ExperimentConfig, params: dict[str, MethodParams] | None = None
                 ) -> tuple[HistorySpec, list[str]]:
    """What the job's methods need recorded during pretraining, and which need it."""
    params = params if params is not None else {
        m: params_from(get_method(m), cfg) for m in cfg.methods}
    spec, who = HistorySpec(), []
    for m in cfg.methods:
        need = get_method(m).history_needs(params[m])
        if need:
            spec, who = spec.union(need), who + [m]
    return spec, who


def check_history_bound(cfg: ExperimentConfig, params: dict[str, MethodParams] | None = None
                        ) -> dict[str, int] | None:
    """Refuse, before any data is loaded, a training history larger than
    ``history.max-mb`` (estimated from the model, the clients and the pretraining rounds);
    return the estimate (``None``: no method of the job needs a history)."""
    spec, who = history_spec(cfg, params)
    if not spec:
        return None
    import torch

    from .data import DATASET_SHAPES
    from .models import create_model

    classes, channels, size = DATASET_SHAPES[cfg.dataset]
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = create_model(cfg.model, num_classes=classes, in_channels=channels,
                             image_size=size)
    return check_bound(spec, model_float_bytes(model), cfg.num_clients, cfg.pretrain_rounds,
                       cfg.history_max_mb, who, model=f"{cfg.model} on {cfg.dataset}")
