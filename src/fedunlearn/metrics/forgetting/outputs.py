"""``model_outputs``: the logits of K torch modules on the same examples, ``(K, n, C)``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import nn
from torch.utils.data import Dataset

from ..accuracy import eval_mode, predict

__all__ = ["model_outputs"]


def _logits(model: nn.Module, x, batch_size: int, device) -> NDArray[np.float32]:
    if isinstance(x, Dataset):
        return predict(model, x, range(len(x)), batch_size=batch_size, device=device)[0]
    parts = []
    with eval_mode(model), torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            out = model(x[start:start + batch_size].to(device))
            parts.append(out.detach().float().cpu().numpy())
    return np.concatenate(parts, axis=0)


def model_outputs(models: Sequence[nn.Module], x: ArrayLike | torch.Tensor | Dataset, *,
                  batch_size: int = 256, device: str | torch.device = "cpu"
                  ) -> NDArray[np.float32]:
    """The logits of every model in ``models`` on the same examples.

    Parameters
    ----------
    models : sequence of torch.nn.Module
        K classifiers returning ``(batch, C)`` logits, already on ``device``; each is run
        in eval mode under ``torch.no_grad`` and its training flags are restored after.
    x : torch.Tensor, numpy array or torch Dataset
        The n inputs (first axis), or a map-style dataset of ``(x, y)`` samples.
    batch_size : int, default 256
    device : str or torch.device, default "cpu"
        Where the inputs are moved.

    Returns
    -------
    np.ndarray
        float32, shape ``(K, n, C)``, for :func:`fedunlearn.audit_forgetting`.
    """
    if isinstance(models, nn.Module) or not isinstance(models, Sequence) or not models:
        raise TypeError("models must be a non-empty list of torch.nn.Module (K models), "
                        f"got {type(models).__name__}")
    for i, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise TypeError(f"models[{i}] is a {type(model).__name__}, not a torch.nn.Module")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(x, Dataset):
        x = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not torch.is_tensor(x) else x
        if x.ndim < 1 or x.shape[0] == 0:
            raise ValueError(f"x must hold at least one example (first axis), got shape "
                             f"{tuple(x.shape)}")
    elif len(x) == 0:
        raise ValueError("x is an empty dataset: give at least one example")
    outs = [_logits(model, x, batch_size, device) for model in models]
    shapes = {o.shape for o in outs}
    if len(shapes) != 1 or len(outs[0].shape) != 2:
        raise ValueError(f"every model must return (n, C) logits of one shape, got "
                         f"{[o.shape for o in outs]}")
    return np.stack(outs)
