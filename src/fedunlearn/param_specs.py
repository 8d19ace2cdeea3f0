"""Parameter specs: the names a layer selection resolves to.

A spec names a whole parameter by its ``state_dict`` key (``"conv1.weight"``,
``"pos_embed"``) or rows of one, ``"<parameter>[start:stop]"``
(``"blocks.0.attn.qkv.weight[0:16]"``). :func:`split_spec` takes a spec apart,
:func:`spec_view` returns the tensor it names. The query rows of one attention head
of a fused q/k/v projection are asked for as ``"<qkv layer>:q<h>"``
(``"blocks.0.attn.qkv:q0"``, :func:`parse_head_query`) and resolve to row specs
(:func:`head_query_specs`).
"""

from __future__ import annotations

import re
from collections.abc import Container, Mapping

import torch
from torch import nn

__all__ = ["head_query_specs", "parse_head_query", "spec_view", "split_spec"]

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


def parse_head_query(entry: str) -> tuple[str, int] | None:
    """``"blocks.0.attn.qkv:q3"`` -> ``("blocks.0.attn.qkv", 3)``; None for an entry
    of another form."""
    match = _HEAD_QUERY.match(entry)
    if match is None:
        return None
    return match["layer"], int(match["head"])


def head_query_specs(model: nn.Module, layer: str, head: int, traced_names: Container[str],
                     include_bias: bool) -> list[str]:
    """The query rows of attention head ``head`` in the fused ``q, k, v`` projection
    ``layer`` (timm's ``blocks.<i>.attn.qkv``: rows ``[q heads..., k heads..., v heads...]``,
    the attention module above it has ``num_heads``), as row specs of its weight (and
    of its bias, with ``include_bias``). ``traced_names``: the model's layers, as
    :func:`fedunlearn.layers.trace_layers` names them; ``layer`` must be one."""
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
