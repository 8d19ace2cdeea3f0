"""BadNets-style backdoor planted by chosen clients, and its attack success rate (ASR).

A backdoor is the measurable test of unlearning: on easy data a model retrained without
a client still classifies that client's samples well, so accuracy cannot tell whether
the client was forgotten, but a trigger that only the client taught the model can.

* Poisoning: each backdoor client stamps a square trigger patch (``patch_size`` pixels,
  at ``position``, every channel set to ``value``) on a deterministic ``fraction`` of its
  training samples whose label is not ``target``, and relabels them ``target``. It does
  so whenever it trains, so a method that keeps it out of training (client-wise
  forgetting) removes the poisoned data too.
* ASR (%) = share of test samples whose true label is not ``target`` that the model
  classifies as ``target`` once the trigger is stamped on them (:func:`asr_ids`, on
  :func:`triggered` samples; ``outputs.npz``'s trigger points are the same samples).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..metrics import predict
from ..ranges import Range

POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left")
#: The allowed values of the numeric ``backdoor.*`` keys (also the run-config key table's).
RANGES = {"fraction": Range(0, 1, lo_open=True),
          "target": Range(0, integer=True, note="a class label"),
          "patch_size": Range(0, integer=True, note="0: auto")}
_VALUE_PROBE = 512  # training images scanned for the brightest value ("auto")


@dataclass(frozen=True)
class BackdoorConfig:
    """Run-config ``backdoor.*``. No ``clients``: no backdoor."""

    clients: tuple[int, ...] = ()
    fraction: float = 0.5
    target: int = 0
    patch_size: int = 0  # 0: max(3, image_size // 8): 3 px on 8x8 digits, 4 px on CIFAR
    position: str = "bottom-right"
    value: str = "auto"  # "auto": brightest value in the data (a white patch), or a number

    @property
    def enabled(self) -> bool:
        return bool(self.clients)

    def validate(self) -> None:
        if not self.enabled:
            return
        for name, allowed in RANGES.items():
            allowed.check(f"backdoor.{name.replace('_', '-')}", getattr(self, name))
        if self.position not in POSITIONS:
            raise ValueError(f"backdoor.position={self.position!r}; choose from {POSITIONS}")
        if self.value != "auto":
            try:
                float(self.value)
            except ValueError:
                raise ValueError(
                    f"backdoor.value={self.value!r}: use 'auto' or a number "
                    "(in the model's normalised input space)") from None

    def describe(self) -> dict:
        return {"clients": list(self.clients), "fraction": self.fraction,
                "target": self.target, "patch_size": self.patch_size,
                "position": self.position, "value": self.value}


def patch_size_for(cfg: BackdoorConfig, image_size: int) -> int:
    size = cfg.patch_size or max(3, image_size // 8)
    if size > image_size:
        raise ValueError(f"backdoor.patch-size={size} is larger than the {image_size}px images")
    return size


def trigger_value(cfg: BackdoorConfig, dataset: Dataset) -> torch.Tensor:
    """Per-channel value of the patch: the brightest value among the first training
    images ("auto") or the configured number."""
    x0 = dataset[0][0]
    if cfg.value != "auto":
        return torch.full((x0.shape[0],), float(cfg.value))
    n = min(len(dataset), _VALUE_PROBE)
    xs = torch.stack([dataset[i][0] for i in range(n)])
    return xs.amax(dim=(0, 2, 3))


def stamp_trigger(x: torch.Tensor, size: int, position: str, value: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` (``[N, C, H, W]`` or ``[C, H, W]``) with the patch stamped."""
    out = x.clone()
    h, w = out.shape[-2], out.shape[-1]
    rows = slice(h - size, h) if position.startswith("bottom") else slice(0, size)
    cols = slice(w - size, w) if position.endswith("right") else slice(0, size)
    out[..., rows, cols] = value.to(out.dtype).view(-1, 1, 1)
    return out


def poisoned_ids(train_indices: np.ndarray, labels: np.ndarray, cfg: BackdoorConfig,
                 seed: int) -> np.ndarray:
    """The training samples a backdoor client poisons: a deterministic ``fraction`` of
    its samples whose label is not the target (sorted global ids)."""
    candidates = np.asarray(train_indices)[labels[np.asarray(train_indices)] != cfg.target]
    n = int(round(cfg.fraction * len(candidates)))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, size=n, replace=False))


class PoisonTransform:
    """Batch transform for :func:`fedunlearn.training.train_local`: stamps the trigger
    on the batch's poisoned samples and relabels them."""

    def __init__(self, ids: np.ndarray, size: int, position: str, value: torch.Tensor,
                 target: int) -> None:
        self.ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        self.size, self.position, self.value, self.target = size, position, value, target

    def __call__(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor):
        mask = torch.isin(ids, self.ids)
        if not mask.any():
            return x, y
        x, y = x.clone(), y.clone()
        x[mask] = stamp_trigger(x[mask], self.size, self.position, self.value)
        y[mask] = self.target
        return x, y


class _Triggered(Dataset):
    def __init__(self, dataset: Dataset, size: int, position: str, value: torch.Tensor):
        self.dataset, self.size, self.position, self.value = dataset, size, position, value

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return stamp_trigger(x, self.size, self.position, self.value), y


def asr_ids(labels: np.ndarray, cfg: BackdoorConfig) -> np.ndarray:
    """The samples the ASR is measured on: positions of ``labels`` (the test set's) whose
    true label is not the target (sorted ``int64``)."""
    return np.flatnonzero(np.asarray(labels) != cfg.target).astype(np.int64)


def triggered(dataset: Dataset, cfg: BackdoorConfig, value: torch.Tensor,
              image_size: int) -> Dataset:
    """``dataset`` with the trigger stamped on every sample, labels unchanged (the true
    labels): what the ASR and ``outputs.npz``'s trigger points are measured on."""
    return _Triggered(dataset, patch_size_for(cfg, image_size), cfg.position, value)


def attack_success_rate(model: nn.Module, dataset: Dataset, labels: np.ndarray,
                        cfg: BackdoorConfig, value: torch.Tensor, image_size: int,
                        device: str | torch.device = "cpu") -> float:
    """ASR (%) on ``dataset`` (the test set): triggered non-target samples -> target."""
    ids = asr_ids(labels, cfg)
    if ids.size == 0:
        return float("nan")
    logits, _ = predict(model, triggered(dataset, cfg, value, image_size), ids,
                        device=device)
    return float(100.0 * (logits.argmax(1) == cfg.target).mean())
