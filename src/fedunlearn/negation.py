"""Layer discovery and weight negation for NoT (CVPR 2025, section 5).

NoT unlearns by multiplying the parameters of selected layers of the converged
global model by -1 and then fine-tuning on the retained data. By default only
the *first* layer in the computational graph is negated (section 5.3), which
is ``conv1`` for the CNN and ResNet-18 and ``patch_embed.proj`` for ViTs.

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
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
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
    "negate_layers",
    "negate_state",
    "select_negation_params",
    "spec_view",
    "split_spec",
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
_SHOWN_NAMES = 12


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


def _move_like_model(model: nn.Module, example_input: torch.Tensor) -> torch.Tensor:
    """Put ``example_input`` on the device (and float dtype) of the model's parameters."""
    param = next(model.parameters(), None)
    if param is None:
        return example_input
    if example_input.is_floating_point() and param.is_floating_point():
        return example_input.to(device=param.device, dtype=param.dtype)
    return example_input.to(device=param.device)


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
    owners: dict[str, nn.Module] = {}
    param_owner: dict[int, str] = {}
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if own:
            owners[name] = module
            for _, param in own:
                param_owner.setdefault(id(param), name)
    descendants = {
        name: [o for o in owners if o != name and (name == "" or o.startswith(name + "."))]
        for name in owners
    }

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

    positions: dict[str, float] = {}
    for name in owners:
        if name in recorder.first_use:
            positions[name] = recorder.first_use[name]
        elif name in started:
            ran_children = [finished[d] for d in descendants[name] if d in finished]
            positions[name] = min(ran_children) + 0.5 if ran_children else started[name]

    return [
        LayerInfo(
            name=name,
            module_type=type(owners[name]).__name__,
            param_names=tuple(
                f"{name}.{local}" if name else local
                for local, _ in owners[name].named_parameters(recurse=False)
            ),
        )
        for name in sorted(positions, key=positions.__getitem__)
    ]


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


def _describe(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOWN_NAMES])
    more = len(names) - _SHOWN_NAMES
    return shown + (f", ... ({more} more)" if more > 0 else "")


_HEAD_QUERY = re.compile(r"^(?P<layer>.+):q(?P<head>\d+)$")
_SLICE = re.compile(r"^(?P<param>.+)\[(?P<start>\d+):(?P<stop>\d+)\]$")


def split_spec(spec: str) -> tuple[str, slice | None]:
    """``"blocks.0.attn.qkv.weight[16:32]"`` -> ``("blocks.0.attn.qkv.weight",
    slice(16, 32))`` (rows of a parameter); a plain parameter name -> ``(name, None)``."""
    match = _SLICE.match(spec)
    if match is None:
        return spec, None
    return match["param"], slice(int(match["start"]), int(match["stop"]))


def spec_view(params: Mapping[str, torch.Tensor], spec: str) -> torch.Tensor:
    """The tensor a selection entry names (a view of its rows for a slice)."""
    name, rows = split_spec(spec)
    return params[name] if rows is None else params[name][rows]


def _head_query_specs(model: nn.Module, layer: str, head: int, traced_names: set[str],
                      include_bias: bool) -> list[str]:
    """The query rows of attention head ``head`` in the fused ``q, k, v`` projection
    ``layer`` (timm's ``blocks.<i>.attn.qkv``: rows ``[q heads..., k heads..., v heads...]``,
    the attention module above it has ``num_heads``)."""
    if layer not in traced_names:
        raise ValueError(f"{layer}:q{head}: {layer!r} is not a layer of the model")
    modules = dict(model.named_modules())
    attention = modules.get(layer.rpartition(".")[0])
    linear = modules[layer]
    heads = getattr(attention, "num_heads", None)
    if not isinstance(linear, nn.Linear) or not isinstance(heads, int) or \
            linear.out_features % (3 * heads):
        raise ValueError(f"{layer}:q{head}: {layer!r} is not a fused q/k/v projection under "
                         "an attention module with num_heads (e.g. timm's "
                         "blocks.0.attn.qkv)")
    if not 0 <= head < heads:
        raise ValueError(f"{layer}:q{head}: the attention has heads 0..{heads - 1}")
    width = linear.out_features // (3 * heads)
    rows = f"[{head * width}:{(head + 1) * width}]"
    specs = [f"{layer}.weight{rows}"]
    if include_bias and linear.bias is not None:
        specs.append(f"{layer}.bias{rows}")
    return specs


def _is_bias(param_name: str) -> bool:
    local = param_name.rsplit(".", 1)[-1]
    return local == "bias" or local.endswith("_bias")


def select_negation_params(
    model: nn.Module,
    example_input: torch.Tensor,
    layers: Sequence[str] | None = None,
    include_bias: bool = True,
    refuse_cancelling: bool = True,
) -> list[str]:
    """Resolve a NoT layer selection into full parameter names, without modifying anything.

    Parameters
    ----------
    model : torch.nn.Module
        Model whose layers are traced.
    example_input : torch.Tensor
        A valid input batch.
    layers : sequence of str, optional
        Layer names as reported by :func:`trace_layers`; an entry may also be a
        full parameter name (e.g. ``"pos_embed"``) to select that parameter
        alone, or ``<qkv layer>:q<h>`` (e.g. ``"blocks.0.attn.qkv:q0"``) for the
        query rows of attention head ``h`` (0-based) of a fused q/k/v projection,
        returned as row slices ``"blocks.0.attn.qkv.weight[0:16]"`` (see
        :func:`split_spec`). ``None`` or an empty sequence selects the first layer in
        execution order (the paper's default).
    include_bias : bool, optional
        If False, parameters of selected layers named ``bias`` (or ending in
        ``_bias``) are skipped, so only weights (scales, embeddings, ...) are
        negated. Explicitly named parameters are always kept.
    refuse_cancelling : bool, optional
        Refuse a convolution/linear layer selected together with the normalisation
        right after it (True, for negation, whose two sign flips cancel); another
        perturbation (noise, re-initialisation) does not cancel and passes False.

    Returns
    -------
    list of str
        Full parameter names (``state_dict`` keys) to negate, without duplicates.

    Raises
    ------
    ValueError
        If a name is neither a traced layer nor a parameter, if nothing would
        be negated, or if a convolution/linear layer would be negated together
        with the normalisation layer executed right after it (footnote 4 of
        the NoT paper: the two negations cancel out).
    """
    traced = trace_layers(model, example_input)
    if not traced:
        raise ValueError("the model has no parameter-owning layer that runs in its forward pass")
    by_name = {info.name: info for info in traced}
    layer_of_param = {p: info.name for info in traced for p in info.param_names}

    chosen: list[str] = []
    touched: set[str] = set()
    for entry in dict.fromkeys(layers or [traced[0].name]):
        if entry in by_name:
            params = [p for p in by_name[entry].param_names if include_bias or not _is_bias(p)]
            touched.add(entry)
        elif entry in layer_of_param:
            params = [entry]
            touched.add(layer_of_param[entry])
        elif _HEAD_QUERY.match(entry):
            match = _HEAD_QUERY.match(entry)
            params = _head_query_specs(model, match["layer"], int(match["head"]),
                                       set(by_name), include_bias)
            touched.add(match["layer"])
        else:
            raise ValueError(
                f"unknown layer {entry!r} for negation; layers in execution order: "
                f"{_describe([info.name for info in traced])}"
            )
        chosen.extend(p for p in params if p not in chosen)
    if not chosen:
        raise ValueError(
            f"the selection {list(layers or [])!r} with include_bias={include_bias} "
            "negates no parameter"
        )

    modules = dict(model.named_modules())
    for prev, nxt in itertools.pairwise(traced):
        if (
            refuse_cancelling
            and prev.name in touched
            and nxt.name in touched
            and is_affine_layer(modules[prev.name])
            and is_norm_layer(modules[nxt.name])
        ):
            raise ValueError(
                f"refusing to negate {prev.name!r} ({prev.module_type}) together with the "
                f"normalization layer {nxt.name!r} ({nxt.module_type}) that executes right after "
                "it: as noted in footnote 4 of the NoT paper, the two negations cancel out "
                "((-N)(-C)(x) = NC(x)), so the model would not be perturbed"
            )
    return chosen


def negate_layers(
    model: nn.Module,
    example_input: torch.Tensor,
    layers: Sequence[str] | None = None,
    include_bias: bool = True,
) -> list[str]:
    """Negate (multiply by -1) the parameters of the selected layers, in place.

    Parameters
    ----------
    model : torch.nn.Module
        Model to perturb; its parameters are modified in place (buffers never are).
    example_input : torch.Tensor
        A valid input batch used to trace the execution order.
    layers : sequence of str, optional
        Layer (or parameter) names; default: the first layer in execution
        order. See :func:`select_negation_params`.
    include_bias : bool, optional
        If False, only weights are negated and biases are left unchanged.

    Returns
    -------
    list of str
        Full names of the negated parameters.

    Raises
    ------
    ValueError
        See :func:`select_negation_params`.
    """
    names = select_negation_params(model, example_input, layers, include_bias)
    params = dict(model.named_parameters(remove_duplicate=False))
    done: set[tuple] = set()
    with torch.no_grad():
        for spec in names:
            name, rows = split_spec(spec)
            key = (id(params[name]), None if rows is None else (rows.start, rows.stop))
            if key not in done:  # tied parameters are negated once
                spec_view(params, spec).neg_()
                done.add(key)
    return names


def negate_state(
    state: Mapping[str, torch.Tensor], param_names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Return a copy of a state dict with the named tensors negated.

    Parameters
    ----------
    state : mapping of str to torch.Tensor
        A ``state_dict``-like mapping; it is not modified.
    param_names : sequence of str
        Keys whose tensors are negated, e.g. the output of
        :func:`select_negation_params`.

    Returns
    -------
    dict of str to torch.Tensor
        New dict: negated keys map to new tensors, every other key maps to the
        very same tensor object as in ``state``.

    Raises
    ------
    ValueError
        If a name is not a key of ``state``.
    """
    targets = set(param_names)
    missing = sorted(targets - set(state))
    if missing:
        raise ValueError(
            f"cannot negate {_describe(missing)}: not in the state dict "
            f"(keys: {_describe(list(state))})"
        )
    return {key: -value if key in targets else value for key, value in state.items()}
