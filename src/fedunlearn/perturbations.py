"""Perturbations of NoT's chosen layers, by name (the NoT paper's Figure 5).

NoT negates its layers; the paper compares negation with other ways of perturbing the
same layers before recovery. Each is one function registered here under a name that
``method-params="not.perturbation=<name>"`` (Hydra: ``method.params.perturbation=<name>``)
selects:

``negate`` (the default)
    ``-theta`` (Eq. 3 of the paper).
``none``
    ``theta`` unchanged: NoT becomes FT.
``reinit``
    the values a freshly initialised model of the same architecture has there (the
    model's own initialisation, seeded by the strategy's seed).
``noise``
    ``theta + noise_scale * std(theta) * N(0, 1)``: Gaussian noise scaled to each
    tensor's own (population) standard deviation; a one-element tensor uses its
    absolute value, and a constant tensor (e.g. a fresh norm's scale of ones) gets none.
``flip``
    each kernel mirrored left to right (the last axis of a weight with two or more
    axes); vectors (biases, norms' scales) are left as they are.
``rotate``
    each kernel rotated by ``rotation`` degrees (90, 180 or 270) in its last two axes;
    a non-square kernel can only turn by 180. Vectors are left as they are.

A new perturbation is one function ``fn(name, value, context) -> new value`` registered
with :func:`register_perturbation` (from any package; it is then a valid
``not.perturbation`` value in this process, e.g. for a sweep on the in-process engine).
``context`` (:class:`PerturbationContext`) gives a seeded generator, a freshly
initialised model's state and the method's parameters. Only ``negate`` has the pairs that
cancel out (a layer negated with the normalisation right after it), so only it refuses
them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .registry import Registry

Perturbation = Callable[[str, torch.Tensor, "PerturbationContext"], torch.Tensor]
_PERTURBATIONS: Registry[Perturbation] = Registry("perturbation")

#: The perturbations whose effect cancels when a layer and the normalisation right after
#: it are both perturbed (``(-N)(-C)(x) = NC(x)``); NoT refuses such selections for them.
CANCELLING = {"negate"}


@dataclass
class PerturbationContext:
    """What a perturbation may use besides the tensor itself.

    ``generator``: a seeded ``torch.Generator`` (CPU); ``fresh_state()``: the state dict
    of a freshly initialised model of the same architecture (built once, seeded);
    ``params``: the method's parameters (``noise_scale``, ``rotation``, ...).
    """

    generator: torch.Generator
    fresh_state: Callable[[], Mapping[str, torch.Tensor]]
    params: Mapping[str, Any] = field(default_factory=dict)

    def fresh_value(self, spec: str) -> torch.Tensor:
        """A freshly initialised model's value for a selection entry (a parameter name
        or rows of one, ``"blocks.0.attn.qkv.weight[0:16]"``)."""
        from .param_specs import spec_view, split_spec

        fresh = self.fresh_state()
        if split_spec(spec)[0] not in fresh:
            raise ValueError(f"reinit: a fresh model has no parameter {spec!r}")
        return spec_view(fresh, spec).detach().clone()


def register_perturbation(name: str) -> Callable[[Perturbation], Perturbation]:
    """Decorator: make ``fn(name, value, context) -> tensor`` the perturbation ``name`` (a
    lower-case letter, then lower-case letters, digits and '_'; see
    :mod:`fedunlearn.registry`)."""
    return _PERTURBATIONS.register(name)


def list_perturbations() -> list[str]:
    return _PERTURBATIONS.names()


def get_perturbation(name: str) -> Perturbation:
    return _PERTURBATIONS.get(name)


def perturb(model: torch.nn.Module, names: list[str], perturbation: str,
            context: PerturbationContext) -> list[str]:
    """Apply ``perturbation`` to the selection ``names`` of ``model`` in place (parameter
    names, or rows of one: :func:`fedunlearn.param_specs.split_spec`; tied parameters
    once); returns ``names``. A result of another shape is refused."""
    from .param_specs import spec_view, split_spec

    fn = get_perturbation(perturbation)
    params = dict(model.named_parameters(remove_duplicate=False))
    done: set[tuple] = set()
    with torch.no_grad():
        for name in names:
            param_name, rows = split_spec(name)
            key = (id(params[param_name]), None if rows is None else (rows.start, rows.stop))
            if key in done:
                continue
            target = spec_view(params, name)
            new = fn(name, target.detach().clone(), context)
            if not isinstance(new, torch.Tensor) or new.shape != target.shape:
                raise ValueError(f"perturbation {perturbation!r} returned "
                                 f"{getattr(new, 'shape', type(new).__name__)} for {name} "
                                 f"of shape {tuple(target.shape)}")
            target.copy_(new.to(dtype=target.dtype, device=target.device))
            done.add(key)
    return names


@register_perturbation("negate")
def negate(name: str, value: torch.Tensor, context: PerturbationContext) -> torch.Tensor:
    return -value


@register_perturbation("none")
def unchanged(name: str, value: torch.Tensor, context: PerturbationContext) -> torch.Tensor:
    return value


@register_perturbation("reinit")
def reinit(name: str, value: torch.Tensor, context: PerturbationContext) -> torch.Tensor:
    return context.fresh_value(name)


@register_perturbation("noise")
def noise(name: str, value: torch.Tensor, context: PerturbationContext) -> torch.Tensor:
    scale = float(context.params.get("noise_scale", 1.0))
    flat = value.detach().double().flatten()
    spread = float(flat.abs()[0]) if flat.numel() == 1 else float(flat.std(unbiased=False))
    draw = torch.randn(value.shape, generator=context.generator, dtype=torch.float64)
    return (value.double() + scale * spread * draw).to(value.dtype)


@register_perturbation("flip")
def flip(name: str, value: torch.Tensor, context: PerturbationContext) -> torch.Tensor:
    return value.flip(-1) if value.dim() >= 2 else value


@register_perturbation("rotate")
def rotate(name: str, value: torch.Tensor, context: PerturbationContext) -> torch.Tensor:
    degrees = int(context.params.get("rotation", 90))
    if degrees not in (90, 180, 270):
        raise ValueError(f"rotation={degrees}: expected 90, 180 or 270")
    if value.dim() < 2:
        return value
    if degrees != 180 and value.shape[-1] != value.shape[-2]:
        raise ValueError(f"rotate: {name} has non-square kernels {tuple(value.shape[-2:])}; "
                         "only rotation=180 keeps their shape")
    return torch.rot90(value, k=degrees // 90, dims=(-2, -1))


__all__ = ["CANCELLING", "PerturbationContext", "get_perturbation", "list_perturbations",
           "perturb", "register_perturbation"]
