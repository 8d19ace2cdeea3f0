"""``projected_ascent`` (``train.projected_ascent``): PGD's unlearning at the target.

The node starts from the reference model ``w_ref`` it receives as ``arrays`` (the
average of the other clients' last local models) and maximises the cross-entropy on
its forget data: each step minimises ``-CE`` with SGD, the gradient norm clipped to
``param.clip_norm``; after every step the parameters are projected back into the ball
``|w - w_ref|^2 <= param.radius`` (squared norms throughout, as in the reference). It
stops early once ``|w - w_u|^2 > param.distance_threshold``, ``w_u`` its own last local
model of federated training (received as ``last_local``). Buffers (e.g. BatchNorm
statistics) are the reference model's. Config: ``param.epochs``, ``param.lr``,
``param.momentum``, ``param.clip_norm``, ``param.radius``, ``param.distance_threshold``.
"""

from __future__ import annotations

from logging import INFO

import torch
from ...logs import log
from torch import nn

from ..local_steps import local_loader, method_param, require_local_data
from . import ActionJob, ActionResult, register_action

from ...protocol import LAST_LOCAL_KEY
"""ArrayRecord key of the target's own last local model in a PGD message."""


def squared_distance(params: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return float(sum((p.detach() - r).double().pow(2).sum() for p, r in zip(params, reference)))


@torch.no_grad()
def project_to_ball(params: list[torch.Tensor], reference: list[torch.Tensor],
                    radius: float) -> bool:
    """Project ``params`` in place onto ``{w : |w - reference|^2 <= radius}``;
    return whether they were outside."""
    d2 = squared_distance(params, reference)
    if d2 <= radius:
        return False
    scale = (radius / d2) ** 0.5
    for p, r in zip(params, reference):
        p.copy_(r + scale * (p - r))
    return True


@register_action("projected_ascent")
def projected_ascent(job: ActionJob) -> ActionResult:
    require_local_data("projected_ascent", job.forget)
    if LAST_LOCAL_KEY not in job.models:
        raise ValueError(f"projected_ascent needs the node's last local model as ArrayRecord "
                         f"{LAST_LOCAL_KEY!r}; got {sorted(job.models)}")
    view, config = job.view, job.config
    epochs = method_param(config, "epochs", int)
    radius = method_param(config, "radius")
    threshold = method_param(config, "distance_threshold")
    clip = method_param(config, "clip_norm")
    model = job.model.train()
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    params = [p for p in model.parameters() if p.requires_grad]
    reference = [p.detach().clone() for p in params]
    last = [p.detach().to(job.device) for p in job.models[LAST_LOCAL_KEY].parameters()
            if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=method_param(config, "lr"),
                                momentum=method_param(config, "momentum"))
    criterion = nn.CrossEntropyLoss()
    batches = local_loader(view.dataset, job.forget, view.batch_size, job.seed,
                           transform=view.poison_transform())
    seen, steps, projected, total, stop = 0, 0, 0, 0.0, "epochs"
    for _ in range(epochs):
        for x, y, _ids in batches:
            x, y = x.to(job.device), y.to(job.device)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            (-loss).backward()
            if clip > 0:
                nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            projected += project_to_ball(params, reference, radius)
            seen += len(y)
            steps += 1
            total += float(loss.detach()) * len(y)
            if squared_distance(params, last) > threshold:
                stop = "distance_threshold"
                break
        if stop != "epochs":
            break
    with torch.no_grad():
        for name, value in model.named_buffers():
            value.copy_(buffers[name])
    log(INFO, "[projected_ascent] partition %s: %d steps on %d forget samples (%d "
        "projected), stopped by %s", view.partition_id, steps, job.forget.size, projected, stop)
    return ActionResult(model, int(job.forget.size), total / max(seen, 1), seen)
