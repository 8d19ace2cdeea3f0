"""``saliency_unlearning`` (``train.saliency_unlearning``): SalUn at the data holder
(Fan et al., ICLR 2024, "SalUn: Empowering machine unlearning via gradient-based weight
saliency").

1. Saliency: with the model in eval mode, ``g = |sum over forget batches of
   grad(-CE_batch)|`` per weight; the top ``param.mask_ratio`` of all weights (one global
   ranking over every parameter) form the mask.
2. RandL (as in ``random_label_finetune``: forget samples relabelled once at random,
   shuffled with the retained ones) updating the salient weights only: the gradient,
   weight decay included, is multiplied by the mask before the SGD step, so weights
   outside the mask and their momentum stay exactly as they were (the reference's fixed
   behaviour; before its fix weight decay and momentum still moved them).

The saliency pass is forward + backward, counted as trained samples. The node holds
the gradient sums and then the mask (parameter-sized) while it runs.

Config: ``param.epochs``, ``param.lr``, ``param.weight_decay``, ``param.mask_ratio``,
``param.exclude_true_label``. Needs the forget and the retained data.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..local_steps import local_loader, method_param, require_local_data
from . import ActionJob, ActionResult, register_action
from .random_label_finetune import relabelling


def saliency_mask(model: nn.Module, batches, ratio: float, device: torch.device
                  ) -> tuple[list[torch.Tensor], int]:
    """0/1 masks (one per parameter) of the top ``ratio`` of all weights by
    ``|sum_batches grad(-CE)|``, and the number of samples seen."""
    model.to(device).eval()
    params = list(model.parameters())
    sums = [torch.zeros_like(p) for p in params]
    criterion = nn.CrossEntropyLoss()
    seen = 0
    for x, y, _ids in batches:
        x, y = x.to(device), y.to(device)
        model.zero_grad(set_to_none=True)
        (-criterion(model(x), y)).backward()
        for s, p in zip(sums, params):
            if p.grad is not None:
                s += p.grad.detach()
        seen += len(y)
    model.zero_grad(set_to_none=True)
    flat = torch.cat([s.abs().flatten() for s in sums])
    k = round(ratio * flat.numel())
    chosen = torch.zeros_like(flat)
    if k > 0:
        chosen[torch.topk(flat, k).indices] = 1.0
    masks, start = [], 0
    for p in params:
        masks.append(chosen[start:start + p.numel()].view_as(p))
        start += p.numel()
    return masks, seen


def masked_finetune(model: nn.Module, masks: list[torch.Tensor], batches, *, epochs: int,
                    lr: float, momentum: float, weight_decay: float,
                    device: torch.device) -> tuple[float, int]:
    """SGD on ``batches`` where only weights with mask 1 move (weight decay is added to
    the gradient before masking, so it too spares the others). Returns (loss, samples)."""
    model.to(device).train()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)
    criterion = nn.CrossEntropyLoss()
    trained, total = 0, 0.0
    for _ in range(epochs):
        for x, y, _ids in batches:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            loss.backward()
            with torch.no_grad():
                for p, m in zip(params, masks):
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    if weight_decay:
                        p.grad.add_(p, alpha=weight_decay)
                    p.grad.mul_(m)
            optimizer.step()
            trained += len(y)
            total += float(loss.detach()) * len(y)
    return total / max(trained, 1), trained


@register_action("saliency_unlearning")
def saliency_unlearning(job: ActionJob) -> ActionResult:
    require_local_data("saliency_unlearning", job.forget, job.retained)
    view, config, device = job.view, job.config, job.device
    model = job.model
    poison = view.poison_transform()
    masks, seen_mask = saliency_mask(model, local_loader(
        view.dataset, job.forget, view.batch_size, job.seed + 2, transform=poison),
        method_param(config, "mask_ratio"), device)
    transform, _ = relabelling(job, method_param(config, "exclude_true_label", bool))
    ids = np.union1d(job.retained, job.forget)
    batches = local_loader(view.dataset, ids, view.batch_size, job.seed,
                           transform=transform)
    loss, trained = masked_finetune(
        model, masks, batches, epochs=method_param(config, "epochs", int),
        lr=method_param(config, "lr"), momentum=view.momentum,
        weight_decay=method_param(config, "weight_decay"), device=device)
    return ActionResult(model, int(ids.size), loss, seen_mask + trained)
