"""Building blocks of the unlearning procedures a data holder runs as client actions.

FCU, RandL, GA, BadT, l1-sparse, SSD and SalUn are run by whoever holds the forget
data: in fedunlearn, the target node, through a client action. They share a few pieces,
kept here so each action module holds only its own algorithm:

* the method's parameters travel in the message config as ``param.<name>`` entries
  (:func:`params_to_config` on the server, :func:`method_param` on the node);
* :func:`local_loader` yields batches ``(x, y, ids)`` of the node's data as the node
  holds it (a backdoor client's trigger included), seeded per round and node;
* :func:`random_model` builds the same freshly initialised model on every node from a
  seed in the config (FCU's downgraded model, BadT's incompetent teacher);
* :func:`random_labels` draws wrong labels for RandL and SalUn;
* :class:`PenultimateFeatures` reads the input of the last ``nn.Linear`` in execution
  order (the pooled features of the CNN, ResNet-18 and timm ViTs);
* :func:`weights_are_finite` and :func:`l1_norm` guard and regularise.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..samples import pair
from ..protocol import PARAM_PREFIX, RANDOM_MODEL_SEED_KEY, params_to_config  # noqa: F401
from ..training import parameter_nbytes, random_model  # noqa: F401  (re-export)


def method_param(config: Mapping, name: str, kind: type = float):
    """Parameter ``name`` from a message config (sent by :func:`params_to_config`)."""
    key = PARAM_PREFIX + name
    if key not in config:
        raise ValueError(f"the message config has no {key!r}; the server sends every "
                         "parameter of the method as param.<name>")
    value = config[key]
    if kind is bool:
        return bool(value)
    return kind(value)


class _IndexedSubset(Dataset):
    """``dataset[ids]`` yielding ``(x, y, global id)``."""

    def __init__(self, dataset: Dataset, ids: np.ndarray) -> None:
        self.dataset, self.ids = dataset, np.asarray(ids, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        x, y = pair(self.dataset[int(self.ids[i])])
        return x, int(y), int(self.ids[i])


def local_loader(dataset: Dataset, ids: np.ndarray, batch_size: int, seed: int,
                 shuffle: bool = True, transform=None) -> Iterator:
    """Batches ``(x, y, ids)`` of ``dataset[ids]``; ``transform(x, y, ids) -> (x, y)``
    (e.g. a backdoor client's trigger) is applied to each batch.

    Each call to the returned object's ``__iter__`` is one epoch; the order is seeded by
    ``seed`` and differs between epochs."""
    generator = torch.Generator().manual_seed(int(seed))
    loader = DataLoader(_IndexedSubset(dataset, ids), batch_size=batch_size,
                        shuffle=shuffle, generator=generator)
    return _Transformed(loader, transform)


class _Transformed:
    def __init__(self, loader: DataLoader, transform) -> None:
        self.loader, self.transform = loader, transform

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y, ids in self.loader:
            if self.transform is not None:
                x, y = self.transform(x, y, ids)
            yield x, y, ids




def random_labels(labels: torch.Tensor, num_classes: int, generator: torch.Generator,
                  exclude_true: bool = True) -> torch.Tensor:
    """Labels drawn uniformly from ``0..num_classes-1``; with ``exclude_true`` uniformly
    from the *other* classes, so every label is wrong."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if not exclude_true:
        return torch.randint(0, num_classes, labels.shape, generator=generator)
    if num_classes < 2:
        raise ValueError("random wrong labels need at least 2 classes")
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    return (labels + shift) % num_classes


class PenultimateFeatures:
    """The input of a model's last ``nn.Linear`` in execution order, with the logits.

    For the paper's CNN that is the hidden layer before ``fc2``, for ResNet-18 the
    globally pooled features before ``fc``, for timm ViTs the pooled token before
    ``head``: the penultimate features FCU contrasts. The layer is found by one forward
    pass on ``example`` (module names are never used)."""

    def __init__(self, model: nn.Module, example: torch.Tensor) -> None:
        order: list[nn.Module] = []
        hooks = [m.register_forward_pre_hook(lambda mod, args: order.append(mod))
                 for m in model.modules() if isinstance(m, nn.Linear)]
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                model(example)
        finally:
            model.train(was_training)
            for h in hooks:
                h.remove()
        if not order:
            raise ValueError(f"{type(model).__name__} runs no nn.Linear: no penultimate "
                             "features to read")
        self.model, self.layer = model, order[-1]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen: list[torch.Tensor] = []
        hook = self.layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
        try:
            logits = self.model(x)
        finally:
            hook.remove()
        return logits, seen[-1].flatten(1)


def weights_are_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()
               if t.is_floating_point())


def l1_norm(model: nn.Module) -> torch.Tensor:
    """Sum of ``|w|`` over every parameter (normalisation parameters included)."""
    return sum(p.abs().sum() for p in model.parameters())


def require_local_data(action: str, forget: np.ndarray, retained: np.ndarray | None = None
                       ) -> None:
    """Fail clearly when a node lacks the data ``action`` needs (``retained=None``: the
    action does not need retained data)."""
    if forget.size == 0:
        raise ValueError(f"{action} needs the node's forget data, and this node has no "
                         "accepted request in the message config")
    if retained is not None and retained.size == 0:
        raise ValueError(f"{action} needs retained data at the node, and it keeps none (a "
                         "client-wise request, or one covering all of its training data)")


__all__ = ["PARAM_PREFIX", "RANDOM_MODEL_SEED_KEY", "PenultimateFeatures", "l1_norm",
           "local_loader", "method_param", "parameter_nbytes", "params_to_config",
           "random_labels", "random_model", "require_local_data", "weights_are_finite"]
