""":func:`fedunlearn.training.train_local` for many clients at once, with ``torch.func``.

Every client of a chunk starts from its own copy of the model's parameters (stacked
along a leading client dimension) and takes exactly the SGD steps ``train_local`` takes
for it: its own data order (the ``DataLoader`` shuffle seeded by its seed, one draw per
epoch), batch size, learning rate, local epochs, momentum, weight decay and gradient
clipping. One step of all the clients is one ``vmap(grad_and_value(loss))`` call over
the stacked parameters and a padded batch; a mask keeps every client's loss the mean
over its own batch, and a client whose steps are done stops moving (parameters and
momentum buffer kept by ``torch.where``). SGD with momentum is elementwise, so it is the
same arithmetic on the stacked tensors.

A chunk of one client takes the gradient without ``vmap`` and without padding: its
result is bit-identical to ``train_local``'s. Larger chunks agree within float32
rounding (batched convolutions and matrix products sum in another order).

What can be batched: a model whose state is parameters only (no buffers: BatchNorm's
running statistics cannot be updated per client inside ``vmap``) and whose forward draws
no random numbers (dropout: the per-message path draws from the global generator, which
a batch cannot reproduce) — :func:`vectorisable` says why not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn import functional as F
from torch.utils.data import default_collate

from ..samples import pair


@dataclass
class ClientJob:
    """One client's ``train_local`` call: its start state, data and settings.

    ``state`` maps every parameter name of the model to a tensor (the message's model);
    ``indices`` are the positions of ``dataset`` it trains on (``train_local``'s
    ``indices``); ``transform(x, y, ids) -> (x, y)`` is applied to each of its batches.
    """

    state: dict[str, torch.Tensor]
    dataset: object
    indices: np.ndarray
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    seed: int
    clip_norm: float = 0.0
    weight_decay: float = 0.0
    transform: Callable | None = None
    samples: tuple | None = field(default=None, repr=False)
    """``(x, y)`` of every sample in ``indices`` (read from ``dataset`` when ``None``)."""


@dataclass
class ClientResult:
    state: dict[str, torch.Tensor]
    loss: float
    num_examples: int
    samples_processed: int


def vectorisable(model: nn.Module, example: torch.Tensor) -> str | None:
    """Why ``model`` cannot be trained batched (``None``: it can): it has buffers, or a
    forward pass on ``example`` (one input sample) under ``vmap`` fails or draws random
    numbers."""
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        return (f"{type(model).__name__} has buffers ({', '.join(buffers[:3])}"
                f"{', ...' if len(buffers) > 3 else ''}: e.g. BatchNorm running statistics), "
                "which vmap cannot update per client")
    params = {k: v.detach().unsqueeze(0).expand(2, *v.shape)
              for k, v in model.named_parameters()}
    x = example.unsqueeze(0).unsqueeze(0).expand(2, 1, *example.shape)
    model.train()
    try:
        with torch.no_grad():
            vmap(lambda p, b: functional_call(model, p, (b,)), randomness="error")(params, x)
    except Exception as err:  # noqa: BLE001 - the reason is reported, the node falls back
        return f"its forward pass does not run under torch.func.vmap ({type(err).__name__}: " \
               f"{str(err).splitlines()[0] if str(err) else ''})"
    return None


def epoch_orders(n: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """The sample order of each epoch of ``DataLoader(..., shuffle=True,
    generator=torch.Generator().manual_seed(seed))`` over ``n`` samples: per epoch the
    loader draws its base seed, then the sampler one permutation (and an empty tail)."""
    generator = torch.Generator().manual_seed(int(seed))
    orders = []
    for _ in range(epochs):
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        orders.append(torch.randperm(n, generator=generator))
        torch.randperm(n, generator=generator)  # RandomSampler's (empty) remainder
    return orders


def read_samples(dataset, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of ``dataset[indices]`` collated as the ``DataLoader`` collates them."""
    xs, ys = zip(*(pair(dataset[int(i)]) for i in indices))
    return default_collate(list(xs)), torch.as_tensor([int(y) for y in ys], dtype=torch.long)


def train_batched(model: nn.Module, jobs: Sequence[ClientJob], device: torch.device
                  ) -> list[ClientResult]:
    """Train every job from its own ``state`` as ``train_local`` would; ``model`` (any
    instance of the architecture, in training mode) only provides the forward pass."""
    results: list[ClientResult | None] = [None] * len(jobs)
    active = []
    for k, job in enumerate(jobs):
        if len(job.indices) == 0 or job.epochs <= 0:
            results[k] = ClientResult({n: t.clone() for n, t in job.state.items()},
                                      float("nan"), int(len(job.indices)), 0)
        else:
            active.append(k)
    if active:
        model.train()
        for k, result in zip(active, _Chunk(model, [jobs[k] for k in active], device).run()):
            results[k] = result
    return results  # type: ignore[return-value]


class _Chunk:
    """The stacked SGD of a list of clients (each with at least one step)."""

    def __init__(self, model: nn.Module, jobs: Sequence[ClientJob], device) -> None:
        self.model, self.jobs, self.device = model, list(jobs), device
        self.names = [n for n, _ in model.named_parameters()]
        self.single = len(self.jobs) == 1
        self.params = {n: torch.stack([j.state[n] for j in self.jobs]).to(device)
                       for n in self.names}
        self.buffers: dict[str, torch.Tensor] = {}
        self._plan()

    def _plan(self) -> None:
        """Every client's batches as rows of one index table into the stacked samples."""
        xs, ys, self.offsets, steps = [], [], [], []
        total = 0
        for job in self.jobs:
            x, y = job.samples if job.samples is not None else read_samples(job.dataset,
                                                                              job.indices)
            xs.append(x)
            ys.append(y)
            self.offsets.append(total)
            total += len(y)
            steps.append(job.epochs * math.ceil(len(job.indices) / job.batch_size))
        self.width = max(j.batch_size if len(j.indices) >= j.batch_size else len(j.indices)
                         for j in self.jobs)
        self.x = torch.cat(xs + [torch.zeros_like(xs[0][:1])])  # last row: the padding
        self.y = torch.cat(ys + [torch.zeros(1, dtype=torch.long)])
        self.ids = np.concatenate([np.asarray(j.indices, dtype=np.int64) for j in self.jobs]
                                  + [np.zeros(1, dtype=np.int64)])
        self.steps = np.asarray(steps)
        self.table = np.full((len(self.jobs), int(self.steps.max()), self.width), total,
                             dtype=np.int64)
        for k, job in enumerate(self.jobs):
            n, b = len(job.indices), job.batch_size
            per_epoch = math.ceil(n / b)
            for e, order in enumerate(epoch_orders(n, job.epochs, job.seed)):
                padded = np.full(per_epoch * b, -1, dtype=np.int64)
                padded[:n] = order.numpy()
                rows = padded.reshape(per_epoch, b)[:, :self.width]
                rows = np.where(rows >= 0, rows + self.offsets[k], total)
                self.table[k, e * per_epoch:(e + 1) * per_epoch, :b] = rows
        self.pad = total

    def _batch(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = self.table[:, t, :]
        x, y = self.x[torch.from_numpy(rows)], self.y[torch.from_numpy(rows)]
        for k, job in enumerate(self.jobs):
            if job.transform is not None and t < self.steps[k]:
                n = int((rows[k] != self.pad).sum())
                tx, ty = job.transform(x[k, :n].clone(), y[k, :n].clone(),
                                       torch.from_numpy(self.ids[rows[k, :n]]))
                x[k, :n], y[k, :n] = tx, ty
        mask = torch.from_numpy(rows != self.pad)
        return x.to(self.device), y.to(self.device), mask.to(self.device)

    def _grads(self, x, y, mask):
        model = self.model
        if self.single:  # no vmap, no padding: train_local's arithmetic exactly
            n = int(mask[0].sum())
            p = {k: v[0] for k, v in self.params.items()}
            g, loss = grad_and_value(
                lambda q: F.cross_entropy(functional_call(model, q, (x[0, :n],)), y[0, :n])
            )(p)
            return {k: v.unsqueeze(0) for k, v in g.items()}, loss.unsqueeze(0)

        def loss_fn(q, xb, yb, mb):
            out = functional_call(model, q, (xb,))
            losses = F.cross_entropy(out, yb, reduction="none")
            return (losses * mb).sum() / mb.sum().clamp(min=1)

        return vmap(grad_and_value(loss_fn), randomness="error")(
            self.params, x, y, mask.to(x.dtype))

    def run(self) -> list[ClientResult]:
        jobs, k_all = self.jobs, len(self.jobs)
        lr = _column([j.lr for j in jobs], self.device)
        momentum = _column([j.momentum for j in jobs], self.device)
        decay = _column([j.weight_decay for j in jobs], self.device)
        clip = [j.clip_norm for j in jobs]
        totals, seen = [0.0] * k_all, [0] * k_all
        for t in range(int(self.steps.max())):
            x, y, mask = self._batch(t)
            live = torch.from_numpy(self.steps > t).to(self.device)
            grads, loss = self._grads(x, y, mask)
            if any(c > 0 for c in clip):
                grads = _clipped(grads, clip, self.device)
            counts = mask.sum(1).tolist()
            for k, (value, count) in enumerate(zip(loss.tolist(), counts)):
                if count:
                    totals[k] += float(value) * count
                    seen[k] += count
            self._step(grads, live, lr, momentum, decay, first=t == 0)
        return [ClientResult({n: self.params[n][k].detach().cpu() for n in self.names},
                             totals[k] / max(seen[k], 1), int(len(job.indices)), seen[k])
                for k, job in enumerate(jobs)]

    def _step(self, grads, live, lr, momentum, decay, first: bool) -> None:
        """``torch.optim.SGD``'s step (no dampening, no Nesterov) for the live clients."""
        for name in self.names:
            p, d = self.params[name], grads[name].detach()
            shape = (-1,) + (1,) * (p.dim() - 1)
            if decay.any:
                d = d.add(p * decay.value.view(shape)) if decay.varies else \
                    d.add(p, alpha=decay.scalar)
            if momentum.any:
                if first:
                    buf = d.clone()
                elif momentum.varies:
                    buf = self.buffers[name] * momentum.value.view(shape) + d
                else:
                    buf = self.buffers[name].mul(momentum.scalar).add_(d)
                if not first:
                    buf = torch.where(live.view(shape), buf, self.buffers[name])
                self.buffers[name] = buf
                d = buf
            new = p - d * lr.value.view(shape) if lr.varies else p.add(d, alpha=-lr.scalar)
            self.params[name] = torch.where(live.view(shape), new, p)


@dataclass
class _Setting:
    """One per-client SGD setting: a scalar when every client has the same value (the
    arithmetic of ``torch.optim.SGD`` exactly), else a column."""

    scalar: float
    value: torch.Tensor
    varies: bool
    any: bool


def _column(values: list[float], device) -> _Setting:
    return _Setting(float(values[0]), torch.tensor(values, dtype=torch.float32, device=device),
                    len(set(values)) > 1, any(v != 0 for v in values))


def _clipped(grads: dict, clip: list[float], device) -> dict:
    """``nn.utils.clip_grad_norm_`` per client: the norm of every parameter's gradient,
    their norm, and the gradients scaled by ``min(1, clip / (norm + 1e-6))`` (clients with
    ``clip`` 0 are not clipped)."""
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads.values()],
                        dim=1)
    total = torch.linalg.vector_norm(norms, dim=1)
    limit = torch.tensor(clip, dtype=total.dtype, device=device)
    coef = torch.where(limit > 0, torch.clamp(limit / (total + 1e-6), max=1.0),
                       torch.ones_like(total))
    return {k: g * coef.view((-1,) + (1,) * (g.dim() - 1)) for k, g in grads.items()}


__all__ = ["ClientJob", "ClientResult", "epoch_orders", "read_samples", "train_batched",
           "vectorisable"]
