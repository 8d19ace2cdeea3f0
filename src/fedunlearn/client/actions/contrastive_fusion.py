"""``contrastive_fusion`` (``train.contrastive_fusion``): FCU's unlearning at the target
(Deng, Luo, Chen, MICCAI 2024, "Unlearning during learning: an efficient federated
machine unlearning method"; reference code ``dzp2095/FCU``).

Starting from the global model ``theta`` the target holds two frozen models: the
original ``theta_o`` (a copy of the global model) and a *downgraded* model ``theta_dn``,
freshly initialised on the node from ``random-model-seed`` (the same on every node; the
reference uses an ImageNet-pretrained DenseNet-121 with a new head, i.e. any model that
never saw the federation's data). For ``param.iterations`` Adam steps on forget batches:

* model-contrastive unlearning on penultimate features ``h`` (the input of the last
  ``nn.Linear``, :class:`~fedunlearn.client.local_steps.PenultimateFeatures`): logits
  ``[cos(h, h_o), cos(h, h_dn)] / tau`` and cross-entropy with label 1, pulling ``h``
  towards the downgraded model's features and pushing it away from the original's;
* every ``param.fusion_interval`` steps (and after the last), frequency-guided fusion
  (:func:`fuse_into`): every Conv/Linear weight (chosen by module type, never by name)
  is rebuilt from the amplitude spectra of ``theta`` and ``theta_o`` and the phase of
  ``theta_o``; every other tensor (biases, normalisation layers, embeddings, buffers) is
  reset to ``theta_o``, as the reference does. Training goes on from the fused model
  with the same Adam state.

``param.preserve`` picks which model gives the low-frequency amplitude band:
``original_low`` (the paper: "preserving low-frequency components of the global model";
the unlearned model gives the high frequencies) or ``unlearned_low`` (what the reference
code does). The band is the centred block ``|k_h| <= floor(h * rho / 2)``,
``|k_w| <= floor(w * rho / 2)`` of the shifted 2-D spectrum: symmetric, so the fused
spectrum stays Hermitian and its inverse FFT is real (the reference's half-open block
``[c - b, c + b)`` is not symmetric, and it keeps only the real part).

Every trained sample costs two frozen forward passes (``theta_o``, ``theta_dn``),
reported as ``forward-samples``. Config: ``param.iterations``,
``param.fusion_interval``, ``param.lr``, ``param.weight_decay``, ``param.rho``,
``param.temperature``, ``param.preserve``, ``random-model-seed``. Needs only the
forget data.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..local_steps import (RANDOM_MODEL_SEED_KEY, PenultimateFeatures, local_loader,
                           method_param, random_model, require_local_data)
from . import ActionJob, ActionResult, register_action

from ...protocol import PRESERVE
FUSED_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


def _as_matrix(weight: np.ndarray) -> np.ndarray:
    """A weight as the 2-D matrix the fusion transforms: Linear (out, in) as it is; a
    convolution (C_out, C_in, k_1, ..., k_n) permuted to (C_in, k_1, ..., k_n, C_out) and
    reshaped to (C_in * k_1 * ... * k_{n-1}, k_n * C_out) (the reference's permute(1, 2,
    3, 0) for Conv2d)."""
    if weight.ndim == 2:
        return weight
    moved = np.moveaxis(weight, 0, -1)
    return moved.reshape(int(np.prod(moved.shape[:-2])), -1)


def _from_matrix(matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) == 2:
        return matrix.reshape(shape)
    moved_shape = (*shape[1:], shape[0])
    return np.moveaxis(matrix.reshape(moved_shape), -1, 0)


def low_band(h: int, w: int, rho: float) -> np.ndarray:
    """Boolean mask over the *shifted* spectrum of an ``h x w`` matrix: frequencies with
    ``|k_h| <= floor(h * rho / 2)`` and ``|k_w| <= floor(w * rho / 2)``."""
    kh = np.abs(np.fft.fftshift(np.fft.fftfreq(h) * h))
    kw = np.abs(np.fft.fftshift(np.fft.fftfreq(w) * w))
    return (kh[:, None] <= np.floor(h * rho / 2)) & (kw[None, :] <= np.floor(w * rho / 2))


def frequency_fusion(unlearned: np.ndarray, original: np.ndarray, rho: float,
                     preserve: str = "original_low") -> np.ndarray:
    """FCU's weight-level fusion of one Conv/Linear weight.

    Amplitude: in the low band (:func:`low_band`) from the ``preserve`` side, elsewhere
    from the other model; phase: the original's everywhere."""
    if preserve not in PRESERVE:
        raise ValueError(f"preserve={preserve!r}; allowed: {PRESERVE}")
    if unlearned.shape != original.shape:
        raise ValueError(f"weights of shapes {unlearned.shape} and {original.shape}")
    a = _as_matrix(np.asarray(unlearned, dtype=np.float64))
    o = _as_matrix(np.asarray(original, dtype=np.float64))
    spec_a = np.fft.fftshift(np.fft.fft2(a))
    spec_o = np.fft.fftshift(np.fft.fft2(o))
    band = low_band(*a.shape, rho)
    low_src, high_src = (spec_o, spec_a) if preserve == "original_low" else (spec_a, spec_o)
    amplitude = np.where(band, np.abs(low_src), np.abs(high_src))
    fused = np.fft.ifft2(np.fft.ifftshift(amplitude * np.exp(1j * np.angle(spec_o))))
    return _from_matrix(fused.real, np.shape(unlearned)).astype(np.asarray(unlearned).dtype)


@torch.no_grad()
def fuse_into(model: nn.Module, original: nn.Module, rho: float, preserve: str) -> list[str]:
    """Frequency-guided fusion of ``model`` with ``original``, in place: every Conv/Linear
    weight fused, every other tensor taken from ``original``. Returns the fused keys."""
    fused_keys = {f"{name}.weight" if name else "weight" for name, m in model.named_modules()
                  if isinstance(m, FUSED_TYPES) and getattr(m, "weight", None) is not None}
    reference = original.state_dict()
    state = model.state_dict()
    for key, value in state.items():
        if key in fused_keys:
            w = frequency_fusion(value.detach().cpu().numpy(),
                                 reference[key].detach().cpu().numpy(), rho, preserve)
            value.copy_(torch.from_numpy(w))
        else:
            value.copy_(reference[key])
    return sorted(fused_keys)


def contrastive_loss(h: torch.Tensor, h_original: torch.Tensor, h_downgraded: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """Cross-entropy of ``[cos(h, h_o), cos(h, h_dn)] / tau`` with label 1."""
    logits = torch.stack([F.cosine_similarity(h, h_original, dim=-1),
                          F.cosine_similarity(h, h_downgraded, dim=-1)], dim=1) / temperature
    return F.cross_entropy(logits, torch.ones(len(h), dtype=torch.long, device=h.device))


@register_action("contrastive_fusion")
def contrastive_fusion(job: ActionJob) -> ActionResult:
    require_local_data("contrastive_fusion", job.forget)
    view, config, device = job.view, job.config, job.device
    iterations = method_param(config, "iterations", int)
    interval = method_param(config, "fusion_interval", int)
    rho = method_param(config, "rho")
    preserve = method_param(config, "preserve", str)
    temperature = method_param(config, "temperature")
    if preserve not in PRESERVE:
        raise ValueError(f"param.preserve={preserve!r}; allowed: {PRESERVE}")
    model = job.model.to(device)
    original = copy.deepcopy(model).eval()
    downgraded = random_model(view.new_model, int(config[RANDOM_MODEL_SEED_KEY])).to(device)
    downgraded.eval()
    batches = local_loader(view.dataset, job.forget, view.batch_size, job.seed,
                           transform=view.poison_transform())
    example = next(iter(batches))[0][:1].to(device)
    features = PenultimateFeatures(model, example)
    features_o = PenultimateFeatures(original, example)
    features_dn = PenultimateFeatures(downgraded, example)
    optimizer = torch.optim.Adam(model.parameters(), lr=method_param(config, "lr"),
                                 betas=(0.9, 0.9999),
                                 weight_decay=method_param(config, "weight_decay"))
    model.train()

    def forever():
        while True:
            yield from batches

    stream = forever()
    trained, total = 0, 0.0
    for step in range(1, iterations + 1):
        x, _y, _ids = next(stream)
        x = x.to(device)
        _, h = features(x)
        with torch.no_grad():
            _, h_o = features_o(x)
            _, h_dn = features_dn(x)
        loss = contrastive_loss(h, h_o, h_dn, temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        trained += len(x)
        total += float(loss.detach()) * len(x)
        if step % interval == 0 or step == iterations:
            fuse_into(model, original, rho, preserve)
    return ActionResult(model, int(job.forget.size), total / max(trained, 1), trained,
                        forward_samples=2 * trained)
