"""Linear CKA between the layer activations of two models (NoT paper, Figure 3).

Centered kernel alignment with a linear kernel (Kornblith et al., ICML 2019,
"Similarity of Neural Network Representations Revisited") compares two
representations ``X`` (n x d1) and ``Y`` (n x d2) of the same ``n`` inputs::

    CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F * ||Yc^T Yc||_F)

where ``Xc``/``Yc`` have centred columns. It is 1 for identical representations
and is invariant to orthogonal transforms, isotropic scaling (including a sign
flip, i.e. multiplying by -1) and adding a constant. That last point is why the
NoT paper sees a CKA of about 1 at the *negated* layer itself: negating a
convolution's weights and bias negates its output, which linear CKA cannot see;
the difference only shows after the next non-linearity, in the layers that
follow ("a break in co-adaptation").

:func:`layer_activations` records the output of every layer that
:func:`fedunlearn.layers.trace_layers` reports (parameter-owning modules, in
execution order) with forward hooks; :func:`cka_by_layer` compares two models of
the same architecture layer by layer on the same inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from fedunlearn.layers import trace_layers

__all__ = ["cka_by_layer", "layer_activations", "linear_cka"]

# A centred matrix whose squared norm is below this fraction of the raw matrix's
# squared norm is treated as constant (rounding of the column means leaves
# residues of about 1e-16 relative, i.e. 1e-32 squared).
_ZERO_VARIANCE = 1e-24
_SHOWN = 12


def _as_matrix(a: Any, name: str) -> torch.Tensor:
    """``a`` (torch, numpy or nested lists) as a float64 CPU matrix ``(n, d)``."""
    if isinstance(a, torch.Tensor):
        t = a.detach().to(device="cpu", dtype=torch.float64)
    else:
        try:
            t = torch.as_tensor(np.asarray(a, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}: not a numeric feature matrix ({err})") from None
    if t.ndim == 0:
        raise ValueError(f"{name}: expected an (n, d) feature matrix, got a scalar")
    if t.ndim == 1:
        t = t.reshape(-1, 1)
    elif t.ndim > 2:
        t = t.reshape(t.shape[0], -1)
    if t.shape[0] == 0:
        raise ValueError(f"{name}: empty feature matrix (0 samples)")
    if t.shape[1] == 0:
        raise ValueError(f"{name}: feature matrix with 0 features, shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return t


def linear_cka(x: Any, y: Any) -> float:
    """Linear CKA of two representations of the same samples.

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray
        Features ``(n, d1)``; a 1-D array is one feature per sample, more
        dimensions are flattened per sample (``(n, ...)`` -> ``(n, d1)``).
    y : torch.Tensor or numpy.ndarray
        Features ``(n, d2)`` of the same ``n`` samples, in the same order.

    Returns
    -------
    float
        ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` in ``[0, 1]``, computed
        in float64 in the feature form (cost ~ ``n (d1 + d2)^2``) or the ``n x n``
        Gram form (cost ~ ``n^2 (d1 + d2)``), whichever is cheaper -- so
        ``d >> n`` stays cheap. NaN when either representation is constant
        over the samples (CKA is undefined then).

    Raises
    ------
    ValueError
        If the sample counts differ, there are fewer than 2 samples, a matrix
        is empty or holds NaN/inf values.

    Notes
    -----
    Linear CKA is biased upwards when ``d`` is not small against ``n``: for
    independent Gaussian features its expected value is about
    ``sqrt(d1 d2) / sqrt((n + d1)(n + d2))`` (``d / (n + d)`` for equal widths),
    so compare models on enough samples.
    """
    xm = _as_matrix(x, "x")
    ym = _as_matrix(y, "y")
    n = xm.shape[0]
    if ym.shape[0] != n:
        raise ValueError(f"x has {n} samples but y has {ym.shape[0]}; CKA compares two "
                         "representations of the same samples")
    if n < 2:
        raise ValueError(f"CKA needs at least 2 samples, got n={n}")
    xc = xm - xm.mean(dim=0, keepdim=True)
    yc = ym - ym.mean(dim=0, keepdim=True)
    for c, raw in ((xc, xm), (yc, ym)):
        if float(c.square().sum()) <= _ZERO_VARIANCE * float(raw.square().sum()):
            return float("nan")
    d1, d2 = xc.shape[1], yc.shape[1]
    if n * (d1 + d2) < d1 * d2 + d1 * d1 + d2 * d2:
        k = xc @ xc.T
        ll = yc @ yc.T
        hsic = (k * ll).sum()
        norm_x = torch.linalg.matrix_norm(k)
        norm_y = torch.linalg.matrix_norm(ll)
    else:
        hsic = torch.linalg.matrix_norm(yc.T @ xc).square()
        norm_x = torch.linalg.matrix_norm(xc.T @ xc)
        norm_y = torch.linalg.matrix_norm(yc.T @ yc)
    return float(hsic / (norm_x * norm_y))


def _describe(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    more = len(names) - _SHOWN
    return shown + (f", ... ({more} more)" if more > 0 else "")


def _as_inputs(inputs: Any) -> torch.Tensor:
    t = inputs if isinstance(inputs, torch.Tensor) else torch.as_tensor(np.asarray(inputs))
    if t.ndim == 0 or t.shape[0] == 0:
        raise ValueError(f"inputs: empty batch (shape {tuple(t.shape)}); pass at least one "
                         "sample")
    return t


def _device_dtype(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    param = next(model.parameters(), None)
    if param is None:
        return batch
    if batch.is_floating_point() and param.is_floating_point():
        return batch.to(device=param.device, dtype=param.dtype)
    return batch.to(device=param.device)


def _select(model: nn.Module, inputs: torch.Tensor, layers: Sequence[str] | None,
            label: str = "the model") -> list[str]:
    """Traced layer names of ``model`` (execution order), restricted to ``layers``."""
    traced = [info.name for info in trace_layers(model, inputs[:1])]
    if not traced:
        raise ValueError(f"{label} has no parameter-owning layer that runs in its forward pass")
    if layers is None:
        return traced
    if isinstance(layers, str):
        layers = [layers]
    if len(layers) == 0:
        raise ValueError("layers=[]: select at least one layer (or None for all)")
    wanted = list(dict.fromkeys(layers))
    for name in wanted:
        if name not in traced:
            raise ValueError(f"unknown layer {name!r} for {label}; layers in execution order: "
                             f"{_describe(traced)}")
    return [name for name in traced if name in wanted]


def _first_tensor(output: Any, name: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    for leaf in tree_leaves(output):
        if isinstance(leaf, torch.Tensor):
            return leaf
    raise ValueError(f"layer {name!r} returned no tensor ({type(output).__name__})")


def _capture(models: Sequence[nn.Module], names: Sequence[str], inputs: torch.Tensor,
             batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Flattened float32 CPU outputs ``(n, d)`` of ``names`` for each model."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected a positive integer")
    n = inputs.shape[0]
    results: list[dict[str, torch.Tensor]] = []
    for model in models:
        modules = dict(model.named_modules())
        store: dict[str, torch.Tensor] = {}
        seen: dict[str, torch.Tensor] = {}

        def make_hook(name: str):
            def hook(_module: nn.Module, _args: Any, output: Any) -> None:
                # A module called several times per forward counts at its first call,
                # as in trace_layers.
                if name not in seen:
                    seen[name] = _first_tensor(output, name)
            return hook

        flags = {m: m.training for m in model.modules()}
        handles = [modules[name].register_forward_hook(make_hook(name)) for name in names]
        try:
            model.eval()
            with torch.no_grad():
                for start in range(0, n, batch_size):
                    batch = inputs[start:start + batch_size]
                    seen.clear()
                    model(_device_dtype(model, batch))
                    for name in names:
                        if name not in seen:
                            raise ValueError(f"layer {name!r} did not run in the forward pass")
                        out = seen[name]
                        if out.ndim == 0 or out.shape[0] != batch.shape[0]:
                            raise ValueError(
                                f"layer {name!r} returned shape {tuple(out.shape)} for a batch "
                                f"of {batch.shape[0]}: its first dimension is not the batch")
                        flat = out.detach().reshape(out.shape[0], -1).to("cpu", torch.float32)
                        if name not in store:
                            store[name] = torch.empty(n, flat.shape[1], dtype=torch.float32)
                        store[name][start:start + batch.shape[0]] = flat
                    seen.clear()
        finally:
            for handle in handles:
                handle.remove()
            for m, flag in flags.items():
                m.training = flag
        results.append({name: store[name] for name in names})
    return results


def layer_activations(
    model: nn.Module,
    inputs: Any,
    layers: Sequence[str] | None = None,
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Record the output of each traced layer of ``model`` on ``inputs``.

    Parameters
    ----------
    model : torch.nn.Module
        The model; it runs in eval mode under :func:`torch.no_grad` and every
        module's training flag is restored afterwards. It is not modified.
    inputs : torch.Tensor or numpy.ndarray
        A batch ``(n, ...)`` the model accepts; moved to the model's device
        batch by batch.
    layers : sequence of str, optional
        Layer names as :func:`fedunlearn.layers.trace_layers` reports them
        (``""`` is the top-level module when it owns parameters, e.g. a ViT's
        ``cls_token``); ``None`` takes every traced layer.
    batch_size : int, optional
        Samples per forward pass; only one batch's activations are on the
        model's device at a time.

    Returns
    -------
    dict of str to torch.Tensor
        Layer name -> float32 CPU tensor ``(n, d)`` (the layer's output
        flattened per sample; for a module that returns a tuple, its first
        tensor; for a module called several times, its first call), in
        execution order.

    Raises
    ------
    ValueError
        If ``inputs`` is empty, a name in ``layers`` is not a traced layer of
        ``model`` (the message lists the layers), or ``batch_size`` < 1.
    """
    x = _as_inputs(inputs)
    names = _select(model, x, layers)
    return _capture([model], names, x, batch_size)[0]


def cka_by_layer(
    model_a: nn.Module,
    model_b: nn.Module,
    inputs: Any,
    layers: Sequence[str] | None = None,
    batch_size: int = 256,
) -> list[tuple[str, float]]:
    """Linear CKA between two models' activations, layer by layer.

    Parameters
    ----------
    model_a, model_b : torch.nn.Module
        Two models of the same architecture (``model_a``'s traced layers must
        all exist in ``model_b``); neither is modified.
    inputs : torch.Tensor or numpy.ndarray
        The same ``n >= 2`` inputs for both, ``(n, ...)``.
    layers : sequence of str, optional
        Layers to compare (names from :func:`fedunlearn.layers.trace_layers`);
        ``None``: every traced layer.
    batch_size : int, optional
        Samples per forward pass.

    Returns
    -------
    list of (str, float)
        ``(layer, linear_cka)`` in ``model_a``'s execution order.

    Raises
    ------
    ValueError
        If ``inputs`` is empty or has fewer than 2 samples, or a layer name is
        unknown to either model.
    """
    x = _as_inputs(inputs)
    if x.shape[0] < 2:
        raise ValueError(f"CKA needs at least 2 input samples, got {x.shape[0]}")
    names = _select(model_a, x, layers, "model_a")
    _select(model_b, x, names, "model_b")
    if model_a is model_b:
        acts = _capture([model_a], names, x, batch_size)
        acts = acts * 2
    else:
        acts = _capture([model_a, model_b], names, x, batch_size)
    return [(name, linear_cka(acts[0][name], acts[1][name])) for name in names]
