"""NoT: federated unlearning via weight negation (Khalil et al., CVPR 2025).

https://arxiv.org/abs/2503.05657
"""

from __future__ import annotations

import dataclasses
import math
from logging import INFO

import torch
from flwr.app import ArrayRecord
from ..logs import log
from flwr.serverapp import Grid

from ..negation import select_negation_params
from ..param_specs import spec_view, split_spec
from ..perturbations import CANCELLING, PerturbationContext, list_perturbations, perturb
from ..training import load_arrays, to_arrays
from . import register_method
from .finetune import FineTune
from .params import MethodParams


@dataclasses.dataclass(frozen=True)
class NoTParams(MethodParams):
    """NoT's parameters.

    perturbation : what is done to the chosen layers (:mod:`fedunlearn.perturbations`):
        ``negate`` (the method), ``none`` (= FT), ``reinit``, ``noise``, ``flip``,
        ``rotate``, or any registered one.
    noise_scale : ``noise``'s standard deviation, in units of each tensor's own.
    rotation : ``rotate``'s angle in degrees (90, 180 or 270).
    """

    perturbation: str = "negate"
    noise_scale: float = 1.0
    rotation: int = 90

    def validate(self) -> None:
        if self.perturbation not in list_perturbations():
            raise ValueError(f"perturbation={self.perturbation!r} is unknown; choose from "
                             f"{list_perturbations()}")
        if not (math.isfinite(self.noise_scale) and self.noise_scale > 0):
            raise ValueError(f"noise_scale={self.noise_scale} must be a finite number > 0")
        if self.rotation not in (90, 180, 270):
            raise ValueError(f"rotation={self.rotation} must be 90, 180 or 270")


@register_method("not")
class NoT(FineTune):
    """Negate the chosen layers of the converged global model, then fine-tune.

    Parameters (besides :class:`~fedunlearn.strategies.base.UnlearningStrategy`'s)
    ----------
    layers : list of str, optional
        Module names to negate (default: the first layer in execution order, found by
        tracing ``model_fn()`` on ``example_input``).
    include_bias : bool
        Negate the biases too (default ``True``).
    params : NoTParams
        ``perturbation`` (default ``negate``; ``none``, ``reinit``, ``noise``, ``flip``,
        ``rotate`` for the paper's Figure 5), ``noise_scale``, ``rotation``.

    Eq. (3) of the paper: ``theta' = (-theta_l)_{l in L_neg} (+) (theta_l)_{l not in L_neg}``.
    ``L_neg`` defaults to the first layer in execution order (``negation.layers``
    overrides it with a comma-separated list of module names); weight and bias are
    negated unless ``negation.bias=false``. Negating a convolution/linear layer together
    with the normalisation right after it is refused (the negations cancel out, the
    paper's footnote 4). The unlearning step is server-side only (no message, one sign
    flip per negated weight, counted as server FLOPs); recovery is :class:`FineTune`'s:
    client-wise targets are excluded, class-/instance-wise targets fine-tune on their
    retained data. Stores nothing.
    """

    Params = NoTParams
    model_fn_use = "to find the layers it negates"
    example_input_use = "to trace the layers it negates"

    def __init__(self, recovery=None, params=None, *, layers=None,
                 include_bias: bool = True, **kwargs) -> None:
        super().__init__(recovery, params, **kwargs)
        if isinstance(layers, str):
            layers = [s.strip() for s in layers.split(",") if s.strip()]
        if layers is not None and not all(isinstance(n, str) and n for n in layers):
            raise ValueError(f"layers={layers!r}: expected module names (strings), e.g. "
                             "['conv1'], or None for the first layer in execution order")
        self.layers = list(layers) if layers else None
        self.include_bias = bool(include_bias)

    def check_ready(self) -> None:
        """Resolve the layers to negate on a fresh model (a bad layer name fails here,
        before any round)."""
        self._selected(self.model_factory())

    def _selected(self, model) -> list[str]:
        return select_negation_params(
            model, self.example_input, layers=self.layers, include_bias=self.include_bias,
            refuse_cancelling=self.params.perturbation in CANCELLING)

    def _fresh_state(self) -> dict:
        if getattr(self, "_fresh", None) is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed + 7919)
                self._fresh = self.model_factory().state_dict()
        return self._fresh

    def negated(self, arrays: ArrayRecord) -> ArrayRecord:
        """The model with the chosen layers perturbed (negated, unless the
        ``perturbation`` parameter says otherwise)."""
        model = load_arrays(self.model_factory(), arrays)
        chosen = self._selected(model)
        how = self.params.perturbation
        context = PerturbationContext(
            generator=torch.Generator().manual_seed(self.seed + 104_723),
            fresh_state=self._fresh_state, params=self.params.as_dict())
        perturb(model, chosen, how, context)
        params = dict(model.named_parameters())
        self.meter.extra_flops += sum(spec_view(params, n).numel() for n in chosen
                                      if split_spec(n)[0] in params)
        self.notes["perturbation"] = how
        self.notes["perturbed"] = chosen
        if how == "negate":
            self.notes["negated"] = chosen
            log(INFO, "[not] negated %s", ", ".join(chosen))
        else:
            log(INFO, "[not] perturbed (%s) %s", how, ", ".join(chosen))
        return to_arrays(model)

    def unlearning_step(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        return self.negated(arrays)
