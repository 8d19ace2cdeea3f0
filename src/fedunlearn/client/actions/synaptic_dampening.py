"""``synaptic_dampening`` (``train.synaptic_dampening``): SSD at the data holder
(Foster et al., AAAI 2024, "Fast machine unlearning without retraining through selective
synaptic dampening").

Training-free. With the model in eval mode the node computes, for every parameter,
the importance ``I_S = mean over batches of (d CE_batch / d theta)^2`` (the squared
gradient of the batch-mean loss, as the reference does) once over all of its training
data ``D`` (retained and forget) and once over its forget data ``D_u``. Parameters with
``I_Du > alpha * I_D`` are dampened, ``theta <- beta * theta`` with
``beta = min(lambda * I_D / I_Du, 1)`` (exponent 1, upper bound 1). Both passes use the
federation's batch size.

The two importance passes are forward + backward, counted as trained samples
(``samples-processed``). The node holds two parameter-sized importance maps while it
runs.

Config: ``param.alpha`` (selection weighting), ``param.dampening`` (lambda). Needs the
forget and the retained data: with the forget data alone ``I_D = I_Du`` and nothing is
ever selected.
"""

from __future__ import annotations

from logging import INFO

import numpy as np
import torch
from ...logs import log
from torch import nn

from ..local_steps import local_loader, method_param, require_local_data
from . import ActionJob, ActionResult, register_action


def importance(model: nn.Module, batches, device: torch.device) -> tuple[list[torch.Tensor], int]:
    """Mean over batches of the squared gradient of the batch-mean cross-entropy, per
    parameter (model in eval mode); and the number of samples seen."""
    model.to(device).eval()
    params = list(model.parameters())
    acc = [torch.zeros_like(p) for p in params]
    criterion = nn.CrossEntropyLoss()
    n_batches = seen = 0
    for x, y, _ids in batches:
        x, y = x.to(device), y.to(device)
        model.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        for a, p in zip(acc, params):
            if p.grad is not None:
                a += p.grad.detach() ** 2
        n_batches += 1
        seen += len(y)
    model.zero_grad(set_to_none=True)
    return [a / max(n_batches, 1) for a in acc], seen


@torch.no_grad()
def dampen(params: list[torch.Tensor], importance_all: list[torch.Tensor],
           importance_forget: list[torch.Tensor], alpha: float, dampening: float) -> int:
    """SSD's selection and dampening, in place; returns how many weights were dampened.

    Selected: ``I_Du > alpha * I_D``; those become ``min(lambda * I_D / I_Du, 1) * theta``;
    every other weight is left exactly as it is."""
    dampened = 0
    for p, full, forget in zip(params, importance_all, importance_forget):
        selected = forget > alpha * full
        if not selected.any():
            continue
        beta = torch.clamp(dampening * full[selected] / forget[selected], max=1.0)
        p[selected] = p[selected] * beta
        dampened += int(selected.sum())
    return dampened


@register_action("synaptic_dampening")
def synaptic_dampening(job: ActionJob) -> ActionResult:
    require_local_data("synaptic_dampening", job.forget, job.retained)
    view, config, device = job.view, job.config, job.device
    model = job.model
    everything = np.union1d(job.retained, job.forget)
    poison = view.poison_transform()
    imp_all, seen_all = importance(model, local_loader(
        view.dataset, everything, view.batch_size, job.seed, transform=poison), device)
    imp_forget, seen_forget = importance(model, local_loader(
        view.dataset, job.forget, view.batch_size, job.seed + 1, transform=poison),
        device)
    count = dampen(list(model.parameters()), imp_all, imp_forget,
                   method_param(config, "alpha"), method_param(config, "dampening"))
    total = sum(p.numel() for p in model.parameters())
    log(INFO, "[synaptic_dampening] partition %s: dampened %d of %d weights",
        view.partition_id, count, total)
    return ActionResult(model, int(everything.size), float("nan"), seen_all + seen_forget)
