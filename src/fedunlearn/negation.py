"""Weight negation for NoT (CVPR 2025, section 5): which parameters it negates, and negating them.

NoT unlearns by multiplying the parameters of selected layers of the converged
global model by -1 and then fine-tuning on the retained data. By default only
the *first* layer in the computational graph is negated (section 5.3), which
is ``conv1`` for the CNN and ResNet-18 and ``patch_embed.proj`` for ViTs.
Layers are taken in execution order as :func:`fedunlearn.layers.trace_layers`
reports it; a selection resolves to parameter specs
(:mod:`fedunlearn.param_specs`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
from torch import nn

# Layer tracing moved to fedunlearn.layers and parameter specs to fedunlearn.param_specs;
# negation uses some of these names and re-exports all of them (__all__) for one release,
# so that code importing them from fedunlearn.negation keeps working.
from .layers import (
    LayerInfo,
    example_input_for,
    first_layer,
    is_affine_layer,
    is_norm_layer,
    trace_layers,
)
from .param_specs import head_query_specs, parse_head_query, spec_view, split_spec

__all__ = [  # the names that moved stay here for one release (see above)
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

_SHOWN_NAMES = 12


def _describe(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOWN_NAMES])
    more = len(names) - _SHOWN_NAMES
    return shown + (f", ... ({more} more)" if more > 0 else "")


def _is_bias(param_name: str) -> bool:
    local = param_name.rsplit(".", 1)[-1]
    return local == "bias" or local.endswith("_bias")


def _resolve_entry(
    model: nn.Module,
    by_name: Mapping[str, LayerInfo],
    layer_of_param: Mapping[str, str],
    entry: str,
    include_bias: bool,
) -> tuple[list[str], str]:
    """The parameter specs one selection entry (a layer, a parameter or ``<qkv>:q<h>``)
    names, and the layer they belong to; ``by_name``: the traced layers in execution
    order, ``layer_of_param``: each of their parameters' layer."""
    if entry in by_name:
        return [p for p in by_name[entry].param_names if include_bias or not _is_bias(p)], entry
    if entry in layer_of_param:
        return [entry], layer_of_param[entry]
    head_query = parse_head_query(entry)
    if head_query is not None:
        layer, head = head_query
        return head_query_specs(model, layer, head, set(by_name), include_bias), layer
    raise ValueError(
        f"unknown layer {entry!r} for negation; layers in execution order: "
        f"{_describe(list(by_name))}"
    )


def _resolve_selection(
    model: nn.Module, traced: Sequence[LayerInfo], entries: Sequence[str], include_bias: bool
) -> tuple[list[str], set[str]]:
    """The parameter specs the entries name, in order and without duplicates, and the
    layers they touch."""
    by_name = {info.name: info for info in traced}
    layer_of_param = {p: info.name for info in traced for p in info.param_names}
    chosen: list[str] = []
    touched: set[str] = set()
    for entry in dict.fromkeys(entries):
        params, layer = _resolve_entry(model, by_name, layer_of_param, entry, include_bias)
        touched.add(layer)
        chosen.extend(p for p in params if p not in chosen)
    return chosen, touched


def _refuse_cancelling_pairs(
    model: nn.Module, traced: Sequence[LayerInfo], touched: set[str]
) -> None:
    """Refuse a convolution/linear layer selected together with the normalisation layer
    executed right after it (footnote 4 of the NoT paper: the two negations cancel)."""
    modules = dict(model.named_modules())
    for prev, nxt in itertools.pairwise(traced):
        if (
            prev.name in touched
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
    chosen, touched = _resolve_selection(model, traced, layers or [traced[0].name], include_bias)
    if not chosen:
        raise ValueError(
            f"the selection {list(layers or [])!r} with include_bias={include_bias} "
            "negates no parameter"
        )
    if refuse_cancelling:
        _refuse_cancelling_pairs(model, traced, touched)
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
