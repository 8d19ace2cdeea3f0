"""Model predictions and top-1 accuracy over dataset subsets."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..samples import pair

__all__ = ["predict", "accuracy_from_logits", "accuracy"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule of ``model`` in eval mode; restore each one's flag on exit.

    Per-module restoration keeps mixed states (e.g. frozen BatchNorm layers in
    eval mode inside a training model) intact.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def predict(
    model: nn.Module,
    dataset: Dataset,
    indices: Sequence[int] | NDArray[np.integer],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Compute logits and labels for ``dataset[indices]``.

    The model is evaluated in ``eval`` mode under :func:`torch.no_grad`; its
    previous ``training`` flags (per submodule) are restored afterwards, also on error. The model
    is *not* moved: it must already live on ``device``.

    Parameters
    ----------
    model : nn.Module
        Classifier mapping a batch ``[B, C, H, W]`` to logits ``[B, num_classes]``.
    dataset : Dataset
        Map-style dataset whose items are ``(x: Tensor[C, H, W], y: int)`` (read with
        :func:`fedunlearn.samples.pair`: dict samples are refused by name).
    indices : sequence of int or np.ndarray
        Positions of the samples to evaluate, in output order.
    batch_size : int, default 256
        Evaluation batch size.
    device : str or torch.device, default "cpu"
        Device the inputs are moved to.

    Returns
    -------
    logits : np.ndarray
        ``float32`` array of shape ``[N, num_classes]``; ``(0, 0)`` when
        ``indices`` is empty.
    labels : np.ndarray
        ``int64`` array of shape ``[N]``.
    """
    idx = [int(i) for i in np.asarray(indices, dtype=np.int64).reshape(-1)]
    if not idx:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    loader = DataLoader(Subset(dataset, idx), batch_size=batch_size, shuffle=False, num_workers=0)
    logits_parts: list[NDArray[np.float32]] = []
    label_parts: list[NDArray[np.int64]] = []
    with eval_mode(model), torch.no_grad():
        for batch in loader:
            x, y = pair(batch)
            out = model(x.to(device))
            logits_parts.append(out.detach().float().cpu().numpy())
            label_parts.append(torch.as_tensor(y).reshape(-1).cpu().numpy().astype(np.int64))
    return np.concatenate(logits_parts, axis=0), np.concatenate(label_parts, axis=0)


def accuracy_from_logits(logits: ArrayLike, labels: ArrayLike) -> float:
    """Top-1 accuracy in percent.

    Parameters
    ----------
    logits : array_like
        Scores of shape ``[N, num_classes]``.
    labels : array_like
        Integer labels of shape ``[N]``.

    Returns
    -------
    float
        ``100 * mean(argmax(logits) == labels)`` in ``[0, 100]``; NaN when
        ``N == 0``.
    """
    y = np.asarray(labels).reshape(-1)
    if y.size == 0:
        return float("nan")
    z = np.asarray(logits)
    if z.ndim != 2 or z.shape[0] != y.size:
        raise ValueError(f"logits shape {z.shape} does not match {y.size} labels")
    return float(100.0 * np.mean(np.argmax(z, axis=1) == y))


def accuracy(
    model: nn.Module,
    dataset: Dataset,
    indices: Sequence[int] | NDArray[np.integer],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> float:
    """Top-1 accuracy (percent) of ``model`` on ``dataset[indices]``.

    See :func:`predict` for the parameters. Returns NaN for empty ``indices``.
    """
    logits, labels = predict(model, dataset, indices, batch_size=batch_size, device=device)
    return accuracy_from_logits(logits, labels)
