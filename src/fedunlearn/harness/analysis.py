"""Analyses of saved models: per-layer linear CKA against a reference (NoT, Figure 3).

:func:`run_cka` backs ``fedunlearn cka``: it loads torch state dicts (e.g. the
``<output_dir>/<method>/model.pt`` that :func:`fedunlearn.serve` writes), builds the
model, takes the first ``samples`` test images of the data set, compares every
named model with the reference layer by layer (:func:`fedunlearn.metrics.cka.cka_by_layer`)
and writes ``cka.json``, ``cka.md`` (a Markdown table: layers as rows, models as
columns) and ``cka.png`` (one line per model, layers in execution order on the x
axis, as the paper's Figure 3).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "cka_markdown",
    "layer_label",
    "load_state_dict_file",
    "plot_cka",
    "run_cka",
    "first_images",
    "write_cka_report",
]

TOP_LEVEL = "(top level)"


def layer_label(name: str) -> str:
    """Display name of a traced layer (``""``, the top-level module, gets a label)."""
    return name if name else TOP_LEVEL


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A torch state dict saved with ``torch.save`` (loaded on CPU, weights only).

    Raises
    ------
    ValueError
        If the file is missing, unreadable or not a mapping of names to tensors.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"no model file at {str(p)!r}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors come in many types
        raise ValueError(f"{str(p)!r} is not a torch state dict: {err}") from None
    if isinstance(state, Mapping) and isinstance(state.get("state"), Mapping):
        state = state["state"]  # a pretraining checkpoint: {"state": ..., "meta": ...}
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{str(p)!r} holds a {type(state).__name__}, not a state dict "
                         "(a mapping of parameter names to tensors)")
    return dict(state)


def first_images(dataset: Any, samples: int) -> torch.Tensor:
    """The first ``samples`` images of ``dataset`` (fewer if it is smaller), stacked."""
    if samples < 2:
        raise ValueError(f"samples={samples}: CKA needs at least 2 samples")
    count = min(samples, len(dataset))
    if count < 2:
        raise ValueError(f"the test split has {len(dataset)} sample(s); CKA needs at least 2")
    return torch.stack([torch.as_tensor(dataset[i][0]) for i in range(count)])


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def cka_markdown(layers: Sequence[str], columns: Mapping[str, Sequence[float]],
                 reference: str) -> str:
    """A Markdown table: one row per layer (execution order), one column per model.

    Parameters
    ----------
    layers : sequence of str
        Traced layer names in execution order.
    columns : mapping of str to sequence of float
        Model name -> CKA against ``reference`` for each layer (NaN: undefined).
    reference : str
        Name of the reference model (shown in the header).
    """
    header = [f"layer (CKA vs {reference})", *columns]
    rows = [[layer_label(layer), *(_fmt(columns[m][i]) for m in columns)]
            for i, layer in enumerate(layers)]
    cells = [header] + rows
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(header, widths)) + " |",
             "|" + "|".join(("-" * (w + 1)) + (":" if i else "-") for i, w in enumerate(widths))
             + "|"]
    lines += ["| " + " | ".join(c.rjust(w) if i else c.ljust(w)
                                for i, (c, w) in enumerate(zip(r, widths))) + " |"
              for r in rows]
    return "\n".join(lines) + "\n"


def plot_cka(path: str | os.PathLike, layers: Sequence[str],
             columns: Mapping[str, Sequence[float]], reference: str, title: str = "") -> Path:
    """Line plot of CKA per layer (x: layers in execution order), one line per model."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    xs = list(range(len(layers)))
    width = max(6.0, 0.38 * len(layers) + 2.0)
    fig, ax = plt.subplots(figsize=(width, 4.2))
    try:
        for name, values in columns.items():
            ax.plot(xs, [float("nan") if v is None else v for v in values], marker="o",
                    label=name)
        ax.set_xticks(xs)
        ax.set_xticklabels([layer_label(layer) for layer in layers], rotation=45, ha="right")
        ax.set_ylim(-0.02, 1.05)
        ax.set_ylabel(f"linear CKA vs {reference}")
        ax.set_xlabel("layer (execution order)")
        ax.grid(True, alpha=0.3)
        if title:
            ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, dpi=120)
    finally:
        plt.close(fig)
    return out


def write_cka_report(out_dir: str | os.PathLike, reference: str, layers: Sequence[str],
                     columns: Mapping[str, Sequence[float]], meta: Mapping[str, Any],
                     layer_types: Sequence[str] | None = None) -> dict[str, Path]:
    """Write ``cka.json``, ``cka.md`` and ``cka.png`` into ``out_dir``; return their paths.

    ``cka.json`` holds ``meta`` plus ``reference``, ``layers`` (name and type, in
    execution order) and ``cka`` (model -> one value per layer; ``null`` where CKA is
    undefined because a representation is constant).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    types = list(layer_types) if layer_types is not None else [""] * len(layers)
    doc = {**meta, "reference": reference,
           "layers": [{"name": n, "type": t} for n, t in zip(layers, types)],
           "cka": {m: [None if math.isnan(v) else v for v in vals]
                   for m, vals in columns.items()}}
    paths = {"json": out / "cka.json", "md": out / "cka.md", "png": out / "cka.png"}
    paths["json"].write_text(json.dumps(doc, indent=1) + "\n")
    paths["md"].write_text(cka_markdown(layers, columns, reference))
    title = f"{meta.get('model', '')} on {meta.get('dataset', '')}, n={meta.get('samples', '')}"
    plot_cka(paths["png"], layers, columns, reference, title=title)
    return paths


def run_cka(dataset: str, model: str, reference: tuple[str, str],
            others: Sequence[tuple[str, str]], out_dir: str | os.PathLike,
            samples: int = 500, batch_size: int = 256, layers: Sequence[str] | None = None,
            root: str = "", image_size: int | None = None) -> dict[str, Any]:
    """Compare saved models with a reference, layer by layer, and write the report.

    Parameters
    ----------
    dataset, model : str
        Data set (:func:`fedunlearn.harness.data.load_dataset`) and registered model name
        (:func:`fedunlearn.harness.models.create_model`) the state dicts belong to.
    reference : (str, str)
        ``(name, path)`` of the reference model.
    others : sequence of (str, str)
        ``(name, path)`` of each model compared with the reference.
    out_dir : path
        Where ``cka.json``, ``cka.md`` and ``cka.png`` go.
    samples : int
        The first ``samples`` test images are the inputs.
    batch_size : int
        Samples per forward pass.
    layers : sequence of str, optional
        Only these traced layers (default: all).
    root, image_size
        Passed to :func:`fedunlearn.harness.data.load_dataset`.

    Returns
    -------
    dict
        ``layers``, ``columns`` (model -> values), ``samples`` (the inputs used: fewer
        than asked when the test split is smaller), ``table`` (Markdown) and ``paths``.
    """
    from fedunlearn.harness.data import load_dataset
    from fedunlearn.layers import trace_layers

    _check_model_names(reference, others)
    _, test, info = load_dataset(dataset, root=root, image_size=image_size)
    inputs = first_images(test, samples)
    ref = _load_model(model, dataset, info, *reference)
    traced = {i.name: i.module_type for i in trace_layers(ref, inputs[:1])}
    chosen, columns = _cka_columns(ref, others, inputs, model, dataset, info, layers,
                                   batch_size)
    meta = {"dataset": dataset, "model": model, "samples": int(inputs.shape[0]),
            "paths": {name: str(path) for name, path in [reference, *others]}}
    paths = write_cka_report(out_dir, reference[0], chosen, columns, meta,
                             [traced.get(layer, "") for layer in chosen])
    return {"layers": chosen, "columns": columns, "paths": paths,
            "samples": int(inputs.shape[0]),
            "table": cka_markdown(chosen, columns, reference[0])}


def _check_model_names(reference: tuple[str, str],
                       others: Sequence[tuple[str, str]]) -> None:
    """``ValueError`` unless there is a model to compare and every name is distinct."""
    if not others:
        raise ValueError("name at least one model to compare with the reference")
    names = [reference[0]] + [name for name, _ in others]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ValueError(f"model name {duplicate!r} is used twice; give each model its own "
                         "NAME=PATH")


def _load_model(model: str, dataset: str, info, name: str, path: str) -> torch.nn.Module:
    """Model ``model`` for ``dataset`` (``info``) with the state dict saved at ``path``
    (strictly: ``ValueError`` naming ``name=path`` when it does not fit)."""
    from fedunlearn.harness.models import create_model

    net = create_model(model, num_classes=info.num_classes, in_channels=info.in_channels,
                       image_size=info.image_size)
    state = load_state_dict_file(path)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{name}={path}: does not fit model {model!r} for {dataset} "
                         f"({info.in_channels}x{info.image_size}x{info.image_size}, "
                         f"{info.num_classes} classes): {err}") from None
    return net


def _cka_columns(ref: torch.nn.Module, others: Sequence[tuple[str, str]], inputs,
                 model: str, dataset: str, info, layers: Sequence[str] | None,
                 batch_size: int) -> tuple[list[str], dict[str, list[float]]]:
    """``(layers, columns)``: the layers compared and, per model of ``others``, its CKA
    with ``ref`` at each of them."""
    from fedunlearn.metrics.cka import cka_by_layer

    columns: dict[str, list[float]] = {}
    chosen: list[str] = []
    for name, path in others:
        result = cka_by_layer(ref, _load_model(model, dataset, info, name, path), inputs,
                              layers=layers, batch_size=batch_size)
        chosen = [layer for layer, _ in result]
        columns[name] = [value for _, value in result]
    return chosen, columns
