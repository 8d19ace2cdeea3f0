"""Local training and model <-> ArrayRecord conversion shared by clients and server."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .arrays import record_from_state, state_dict
from .samples import pair


def resolve_device(preference: str = "auto") -> torch.device:
    """``auto``: the GPU when one is visible to this process (e.g. a Ray actor given
    ``client-resources-num-gpus``), the CPU otherwise."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={preference!r} but no CUDA device is visible")
    return torch.device(preference)


def to_arrays(model: nn.Module) -> ArrayRecord:
    """The model's full state (parameters and buffers) as an ArrayRecord (the bytes
    Flower's ``ArrayRecord(state_dict)`` writes, built faster: :mod:`.arrays`)."""
    return record_from_state(model.state_dict())


def to_state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord as writable torch tensors (copies, on the CPU)."""
    return dict(state_dict(arrays))


def load_arrays(model: nn.Module, arrays: ArrayRecord) -> nn.Module:
    """Load an ArrayRecord into ``model`` (strict: every key must match)."""
    model.load_state_dict(state_dict(arrays), strict=True)
    return model


@dataclass
class TrainStats:
    loss: float
    num_examples: int
    samples_processed: int


def train_local(model: nn.Module, dataset: Dataset, indices: Sequence[int] | np.ndarray, *,
                epochs: int, batch_size: int, lr: float, momentum: float,
                device: torch.device, seed: int, clip_norm: float = 0.0,
                weight_decay: float = 0.0, transform=None) -> TrainStats:
    """Train ``model`` in place with SGD on ``dataset[indices]``.

    ``clip_norm > 0`` clips the global gradient norm of every step: a guard that keeps a
    freshly negated model from diverging at a high learning rate. ``transform`` maps a
    batch ``(x, y, ids)`` to a new ``(x, y)`` (used to plant a backdoor, or to replace
    labels). ``weight_decay`` is SGD's (L2 on every parameter). Parameters with
    ``requires_grad`` False are not trained (not in the optimizer).
    """
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        return TrainStats(loss=float("nan"), num_examples=0, samples_processed=0)
    model.to(device).train()
    generator = torch.Generator().manual_seed(int(seed))
    loader = DataLoader(_WithIds(dataset, indices), batch_size=batch_size, shuffle=True,
                        generator=generator)
    # Frozen parameters (requires_grad False, e.g. the ``frozen`` action's) stay out of
    # the optimizer; every parameter trains otherwise, as before.
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                                momentum=momentum, weight_decay=weight_decay)
    criterion = nn.CrossEntropyLoss()
    total_loss, seen = 0.0, 0
    for _ in range(epochs):
        for x, y, ids in loader:
            if transform is not None:
                x, y = transform(x, y, ids)
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            loss.backward()
            if clip_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            optimizer.step()
            total_loss += float(loss.detach()) * len(y)
            seen += len(y)
    return TrainStats(loss=total_loss / max(seen, 1), num_examples=int(indices.size),
                      samples_processed=seen)


class _WithIds(Dataset):
    """``Subset`` that also yields each sample's global id."""

    def __init__(self, dataset: Dataset, indices: np.ndarray):
        self.subset = Subset(dataset, indices.tolist())
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x, y = pair(self.subset[i])
        return x, int(y), int(self.indices[i])


def random_model(new_model, seed: int) -> nn.Module:
    """``new_model()`` initialised from ``seed`` (global RNG state left untouched), so
    every node builds the same random model without it crossing the network."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return new_model()


def parameter_nbytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (buffers excluded)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
