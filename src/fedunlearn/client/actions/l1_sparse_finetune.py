"""``l1_sparse_finetune`` (``train.l1_sparse_finetune``): l1-sparse at the data holder
(Jia et al., NeurIPS 2023, "Model sparsity can simplify machine unlearning").

The node fine-tunes the global model on its retained data with
``CE + gamma_e * ||theta||_1``, the l1 norm over every parameter (normalisation
parameters included), with the reference's linear decay per epoch:
``gamma_e = gamma * (1 - e / (E - E0))`` for epochs ``e < E - E0`` and 0 for the last
``E0`` epochs (``FT_l1``). SGD with the federation's momentum and batch size.

Config: ``param.epochs`` (E), ``param.lr``, ``param.alpha`` (gamma),
``param.no_l1_epochs`` (E0), ``param.weight_decay``. Needs the retained data (the
forget data only defines what is left out).
"""

from __future__ import annotations

import torch
from torch import nn

from ..local_steps import l1_norm, local_loader, method_param, require_local_data
from . import ActionJob, ActionResult, register_action


def l1_weight(alpha: float, epoch: int, epochs: int, no_l1_epochs: int) -> float:
    """The l1 coefficient of epoch ``epoch`` (0-based) of ``epochs``."""
    active = epochs - no_l1_epochs
    return alpha * (1.0 - epoch / active) if epoch < active else 0.0


@register_action("l1_sparse_finetune")
def l1_sparse_finetune(job: ActionJob) -> ActionResult:
    require_local_data("l1_sparse_finetune", job.forget, job.retained)
    view, config, device = job.view, job.config, job.device
    epochs = method_param(config, "epochs", int)
    alpha = method_param(config, "alpha")
    no_l1 = method_param(config, "no_l1_epochs", int)
    model = job.model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=method_param(config, "lr"),
                                momentum=view.momentum,
                                weight_decay=method_param(config, "weight_decay"))
    criterion = nn.CrossEntropyLoss()
    batches = local_loader(view.dataset, job.retained, view.batch_size, job.seed,
                           transform=view.poison_transform())
    trained, total = 0, 0.0
    for epoch in range(epochs):
        gamma = l1_weight(alpha, epoch, epochs, no_l1)
        for x, y, _ids in batches:
            x, y = x.to(device), y.to(device)
            loss = criterion(model(x), y)
            if gamma > 0:
                loss = loss + gamma * l1_norm(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            trained += len(y)
            total += float(loss.detach()) * len(y)
    return ActionResult(model, int(job.retained.size), total / max(trained, 1), trained)
