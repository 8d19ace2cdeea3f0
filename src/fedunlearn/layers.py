"""The layers of a model in execution order (used by NoT, LWO, CKA and the harness).

Ordering rule
-------------
:func:`trace_layers` runs one forward pass and reports every module that owns
parameters directly (``recurse=False``) and took part in it, in **execution
order of its parameters**: a layer's position is the first moment one of its
own parameters is consumed by a torch operation that produces a tensor
(observed with a :class:`torch.overrides.TorchFunctionMode`; metadata queries
such as ``.shape`` or ``.dtype`` do not count). Parameter registration order is
never used. Consequences:

* a layer called several times appears once, at its first use;
* a container that owns parameters itself *and* encloses other layers (timm's
  ``VisionTransformer`` owns ``cls_token``/``pos_embed``; it is reported under
  the name ``""``) is placed where those parameters are actually used, i.e.
  after ``patch_embed.proj`` -- never first merely because its forward
  starts first.

If a module's forward ran but none of its parameters was seen by a torch
operation (e.g. an op that bypasses ``__torch_function__``), it falls back to
forward hooks: a module without parameter-owning descendants is placed when
its forward starts, a container right after its first parameter-owning
descendant finishes. Modules whose forward never ran and whose parameters were
never used are not reported.

The first layer in this order (``conv1`` for the CNN and ResNet-18,
``patch_embed.proj`` for ViTs) is what NoT negates by default
(:mod:`fedunlearn.negation`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

__all__ = [
    "LayerInfo",
    "example_input_for",
    "first_layer",
    "is_affine_layer",
    "is_norm_layer",
    "trace_layers",
]

_T = TypeVar("_T")

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_NORM_NAME = re.compile(r"Norm(\d+d?|Act\d*d?)?$")
_AFFINE_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear)
_AFFINE_NAME = re.compile(r"(Conv|Linear)")


@dataclass(frozen=True)
class LayerInfo:
    """A module that owns parameters directly, as seen by :func:`trace_layers`.

    Attributes
    ----------
    name : str
        Qualified module name (``""`` for the top-level module).
    module_type : str
        Class name of the module, e.g. ``"Conv2d"``.
    param_names : tuple of str
        Full names of the module's own parameters, e.g.
        ``("conv1.weight", "conv1.bias")``; these are also its ``state_dict`` keys.
    """

    name: str
    module_type: str
    param_names: tuple[str, ...]


def example_input_for(in_channels: int, image_size: int) -> torch.Tensor:
    """Return a dummy image batch suitable for :func:`trace_layers`.

    Parameters
    ----------
    in_channels : int
        Number of channels.
    image_size : int
        Height and width.

    Returns
    -------
    torch.Tensor
        Zeros of shape ``[1, in_channels, image_size, image_size]``.
    """
    return torch.zeros(1, in_channels, image_size, image_size)


def is_norm_layer(module: nn.Module) -> bool:
    """Tell whether ``module`` is a normalisation layer.

    Parameters
    ----------
    module : torch.nn.Module
        Module to classify.

    Returns
    -------
    bool
        True for torch's BatchNorm/InstanceNorm/LayerNorm/GroupNorm/RMSNorm
        (and subclasses) and for any class whose name ends in ``Norm``,
        ``Norm2d``, ``NormAct2d`` and the like (timm's variants).
    """
    return isinstance(module, _NORM_TYPES) or bool(_NORM_NAME.search(type(module).__name__))


def is_affine_layer(module: nn.Module) -> bool:
    """Tell whether ``module`` is a convolution or linear layer.

    Parameters
    ----------
    module : torch.nn.Module
        Module to classify.

    Returns
    -------
    bool
        True for convolutions, ``Linear``/``Bilinear`` (and subclasses) and
        classes whose name contains ``Conv`` or ``Linear``.
    """
    return isinstance(module, _AFFINE_TYPES) or bool(_AFFINE_NAME.search(type(module).__name__))


class _ParamUseRecorder(TorchFunctionMode):
    """Record when each watched parameter is first consumed by a tensor-producing torch op."""

    def __init__(self, watched: Mapping[int, str], clock: Iterator[int]) -> None:
        super().__init__()
        self._watched = watched
        self._clock = clock
        self.first_use: dict[str, int] = {}

    def __torch_function__(
        self,
        func: Callable[..., _T],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> _T:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        # Metadata queries (shape, dtype, is_floating_point(), ...) return no tensor
        # and do not count as a use of the parameter.
        if any(isinstance(leaf, torch.Tensor) for leaf in tree_leaves(result)):
            for leaf in tree_leaves((args, kwargs)):
                if isinstance(leaf, torch.Tensor):
                    owner = self._watched.get(id(leaf))
                    if owner is not None and owner not in self.first_use:
                        self.first_use[owner] = next(self._clock)
        return result


@dataclass
class _ForwardTrace:
    """What one traced forward pass saw, on one shared clock: when each layer's own
    parameters were first used, and when its forward started and finished."""

    first_use: dict[str, int]
    started: dict[str, int]
    finished: dict[str, int]


def _move_like_model(model: nn.Module, example_input: torch.Tensor) -> torch.Tensor:
    """Put ``example_input`` on the device (and float dtype) of the model's parameters."""
    param = next(model.parameters(), None)
    if param is None:
        return example_input
    if example_input.is_floating_point() and param.is_floating_point():
        return example_input.to(device=param.device, dtype=param.dtype)
    return example_input.to(device=param.device)


def _parameter_owners(model: nn.Module) -> tuple[dict[str, nn.Module], dict[int, str]]:
    """The modules that own parameters directly, by name (in ``named_modules`` order), and
    the name of each parameter's (first) owner, by the parameter's ``id``."""
    owners: dict[str, nn.Module] = {}
    param_owner: dict[int, str] = {}
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if own:
            owners[name] = module
            for _, param in own:
                param_owner.setdefault(id(param), name)
    return owners, param_owner


def _run_forward(
    model: nn.Module,
    example_input: torch.Tensor,
    owners: Mapping[str, nn.Module],
    param_owner: Mapping[int, str],
) -> _ForwardTrace:
    """Run one forward pass in eval mode under :func:`torch.no_grad`, watching the owners'
    forward hooks and parameter uses; hooks are removed and every module's training flag
    is restored afterwards."""
    clock = itertools.count()
    started: dict[str, int] = {}
    finished: dict[str, int] = {}

    def make_hooks(name: str) -> tuple[Callable[..., None], Callable[..., None]]:
        def pre_hook(_module: nn.Module, _args: Any) -> None:
            started.setdefault(name, next(clock))

        def post_hook(_module: nn.Module, _args: Any, _output: Any) -> None:
            finished.setdefault(name, next(clock))

        return pre_hook, post_hook

    handles = []
    flags = {module: module.training for module in model.modules()}
    recorder = _ParamUseRecorder(param_owner, clock)
    inputs = _move_like_model(model, example_input)
    try:
        for name, module in owners.items():
            pre_hook, post_hook = make_hooks(name)
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(post_hook))
        model.eval()
        with torch.no_grad(), recorder:
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags.items():
            module.training = flag
    return _ForwardTrace(recorder.first_use, started, finished)


def _positions(owners: Mapping[str, nn.Module], trace: _ForwardTrace) -> dict[str, float]:
    """Each owner's place in execution order (the ordering rule of the module docstring);
    owners that took no part in the forward pass have none."""
    descendants = {
        name: [o for o in owners if o != name and (name == "" or o.startswith(name + "."))]
        for name in owners
    }
    positions: dict[str, float] = {}
    for name in owners:
        if name in trace.first_use:
            positions[name] = trace.first_use[name]
        elif name in trace.started:
            ran_children = [trace.finished[d] for d in descendants[name] if d in trace.finished]
            positions[name] = min(ran_children) + 0.5 if ran_children else trace.started[name]
    return positions


def _layer_info(name: str, module: nn.Module) -> LayerInfo:
    return LayerInfo(
        name=name,
        module_type=type(module).__name__,
        param_names=tuple(
            f"{name}.{local}" if name else local
            for local, _ in module.named_parameters(recurse=False)
        ),
    )


def trace_layers(model: nn.Module, example_input: torch.Tensor) -> list[LayerInfo]:
    """List the parameter-owning layers of ``model`` in execution order.

    Runs a single forward pass under :func:`torch.no_grad` with the model in
    eval mode; every module's training flag is restored afterwards. See the
    module docstring for the exact ordering rule.

    Parameters
    ----------
    model : torch.nn.Module
        Model to inspect; it is not modified.
    example_input : torch.Tensor
        A valid input batch, e.g. from :func:`example_input_for`; it is moved to
        the model's device.

    Returns
    -------
    list of LayerInfo
        One entry per module that owns parameters directly and took part in
        the forward pass, first executed first.
    """
    owners, param_owner = _parameter_owners(model)
    positions = _positions(owners, _run_forward(model, example_input, owners, param_owner))
    order = sorted(positions, key=positions.__getitem__)
    return [_layer_info(name, owners[name]) for name in order]


def first_layer(model: nn.Module, example_input: torch.Tensor) -> str:
    """Return the name of the first parameter-owning layer in execution order.

    Parameters
    ----------
    model : torch.nn.Module
        Model to inspect.
    example_input : torch.Tensor
        A valid input batch.

    Returns
    -------
    str
        E.g. ``"conv1"`` for the CNN and ResNet-18, ``"patch_embed.proj"`` for ViTs.

    Raises
    ------
    ValueError
        If no module with parameters takes part in the forward pass.
    """
    layers = trace_layers(model, example_input)
    if not layers:
        raise ValueError("the model has no parameter-owning layer that runs in its forward pass")
    return layers[0].name
