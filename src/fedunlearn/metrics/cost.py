"""Computation (FLOPs) and communication (bytes) cost helpers."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fedunlearn.metrics.accuracy import eval_mode

__all__ = ["flops_per_sample", "arrayrecord_nbytes", "state_nbytes"]

_FLOP_BATCH = 2  # batch of 2 (not 1) so BatchNorm-style layers never see a singleton batch


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def flops_per_sample(
    model: nn.Module, input_shape: tuple[int, ...], num_classes: int
) -> dict[str, int]:
    """FLOPs of one sample's forward pass and of one training step.

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode`, i.e. 2 FLOPs
    per multiply-accumulate, matmul/conv-type ops only (activations, norms and
    the loss are not counted by torch). A batch of 2 zero inputs is run and the
    totals are divided by 2. The model runs in ``eval`` mode (per-submodule
    flags are restored afterwards); FLOP counts of counted ops do not depend on it.

    The backward pass uses :func:`torch.autograd.grad` with respect to *all*
    floating-point parameters (``requires_grad`` is enabled temporarily on
    frozen ones and restored afterwards), so no ``.grad`` is written and the
    parameters, gradients and buffers of ``model`` are left unchanged. The
    input does not require grad, so the first layer's input gradient is not
    counted (as in real training).

    Parameters
    ----------
    model : nn.Module
        Classifier mapping ``[B, *input_shape]`` to ``[B, num_classes]``.
    input_shape : tuple of int
        Shape of one sample, e.g. ``(C, H, W)`` (any shape the model accepts).
    num_classes : int
        Number of classes (labels used for the cross-entropy loss are 0).

    Returns
    -------
    dict
        ``{"forward": fwd FLOPs per sample, "train": fwd + bwd FLOPs per
        sample}``. For a single ``nn.Linear(i, o)``: forward ``2*i*o``, train
        ``4*i*o`` (the backward only computes the weight gradient).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    device = _model_device(model)
    x = torch.zeros((_FLOP_BATCH, *input_shape), dtype=torch.float32, device=device)
    y = torch.zeros(_FLOP_BATCH, dtype=torch.long, device=device)
    params = [p for p in model.parameters() if p.is_floating_point()]
    old_flags = [p.requires_grad for p in params]
    try:
        with eval_mode(model):
            with torch.no_grad(), FlopCounterMode(display=False) as fwd_counter:
                model(x)
            forward = fwd_counter.get_total_flops()

            for p in params:
                p.requires_grad_(True)
            with torch.enable_grad(), FlopCounterMode(display=False) as train_counter:
                loss = nn.functional.cross_entropy(model(x), y)
                if params:
                    torch.autograd.grad(loss, params, allow_unused=True)
            train = train_counter.get_total_flops()
    finally:
        for p, flag in zip(params, old_flags):
            p.requires_grad_(flag)
    return {"forward": int(forward) // _FLOP_BATCH, "train": int(train) // _FLOP_BATCH}


def arrayrecord_nbytes(record: ArrayRecord) -> int:
    """Serialized payload size of a Flower ``ArrayRecord`` in bytes.

    Sum of ``len(array.data)`` over its ``Array`` values, i.e. the bytes that are
    transmitted (for NumPy/torch arrays: the ``.npy`` serialization, raw data
    plus a ~128-byte header per array). Unlike ``ArrayRecord.count_bytes`` the
    key strings are not counted.

    Parameters
    ----------
    record : flwr.app.ArrayRecord
        The record.

    Returns
    -------
    int
        Number of bytes.
    """
    return int(sum(len(array.data) for array in record.values()))


def state_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    """Raw size of a tensor dict (e.g. a ``state_dict``) in bytes.

    Parameters
    ----------
    state : Mapping[str, torch.Tensor]
        Tensors to measure.

    Returns
    -------
    int
        ``sum(t.numel() * t.element_size())``.
    """
    return int(sum(t.numel() * t.element_size() for t in state.values()))
