"""A saved model back as a torch module: :func:`load_module`.

A job of the harness records what builds its model in each ``results.json``
(``model.architecture``: the model's name in the model zoo and the data's shape), so its
``model.pt`` loads without code of one's own; a model :func:`fedunlearn.serve` wrote
(your own ``Net``) loads with ``model_fn=Net``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

RESULTS_FILE = "results.json"
MODEL_FILE = "model.pt"


def load_module(path: str | os.PathLike, model_fn=None, device: str = "cpu"
                ) -> torch.nn.Module:
    """The model saved at ``path`` as a ``torch.nn.Module`` in eval mode on ``device``.

    ``path`` is a ``model.pt`` (or any file :func:`fedunlearn.save_model` wrote), a
    method's folder (``<out>/<method>``, holding ``results.json`` and ``model.pt``), a
    job's folder with one method, or a pretrained model of the cache
    (``pretrained-<key>.pt``). Without ``model_fn`` the architecture comes from the
    ``results.json`` beside the model (``model.architecture``, built by the harness's
    model zoo) or from the cached model's record; with it, ``model_fn()`` builds the
    module the weights are loaded into (strictly: every name and shape must match)."""
    model_path, results = _locate(Path(path))
    blob = torch.load(model_path, map_location="cpu", weights_only=True)
    state = blob["state"] if _is_checkpoint(blob) else blob
    if model_fn is not None:
        module = model_fn()
    else:
        module = _build(_architecture(model_path, results, blob))
    module.load_state_dict(state, strict=True)
    return module.to(device).eval()


def _locate(path: Path) -> tuple[Path, Path | None]:
    """``(model file, results.json or None)`` for a file or a folder."""
    if path.is_file():
        results = path.with_name(RESULTS_FILE)
        return path, results if results.is_file() else None
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder; pass a model.pt, a "
                                "method's results folder or a job's folder")
    if (path / MODEL_FILE).is_file():
        results = path / RESULTS_FILE
        return path / MODEL_FILE, results if results.is_file() else None
    methods = sorted(p.name for p in path.iterdir() if (p / MODEL_FILE).is_file())
    if len(methods) == 1:
        return path / methods[0] / MODEL_FILE, _or_none(path / methods[0] / RESULTS_FILE)
    if methods:
        raise ValueError(f"{path} holds the models of several methods {methods}; pass "
                         f"one of them, e.g. {path / methods[0]}")
    raise FileNotFoundError(f"{path} holds no {MODEL_FILE} (nor a method folder with one)")


def _or_none(path: Path) -> Path | None:
    return path if path.is_file() else None


def _is_checkpoint(blob) -> bool:
    return isinstance(blob, dict) and set(blob) == {"state", "meta"}


def _architecture(model_path: Path, results: Path | None, blob) -> dict:
    """The recorded ``{name, num_classes, in_channels, image_size}`` of the model."""
    if results is not None:
        recorded = json.loads(results.read_text()).get("model", {}).get("architecture")
        if recorded:
            return recorded
    if _is_checkpoint(blob) and "config" in blob["meta"]:
        from .harness.data import DATASET_SHAPES  # a cached model of the harness

        config = blob["meta"]["config"]
        classes, channels, size = DATASET_SHAPES[config["dataset"]]
        return {"name": config["model"], "num_classes": classes, "in_channels": channels,
                "image_size": size}
    raise ValueError(f"{model_path}: no record of the model's architecture (a results.json "
                     "with model.architecture beside it, as a fedunlearn-run job writes); "
                     "pass model_fn=<your model class> to build it")


def _build(architecture: dict) -> torch.nn.Module:
    from .harness.models import create_model  # the model zoo the job's record names

    return create_model(**architecture)


__all__ = ["load_module"]
