"""``gradient_ascent`` (``train.gradient_ascent``): GA at the data holder, bounded.

The node maximises the cross-entropy of the global model on its forget data with SGD
(the federation's momentum and batch size), i.e. minimises ``-CE``. Plain gradient
ascent is unbounded (the loss grows without limit and the weights can overflow), so
three rules bound it:

* a step budget: at most ``param.max_steps`` steps (and ``param.epochs`` passes);
* a stop rule: before each step the batch's loss is measured, and once it exceeds
  ``param.loss_bound`` x ln(C) (ln C: the loss of a uniform guess over C classes; a
  bound of 1 means "no better than chance on that batch") ascent stops, without a step
  on that batch;
* a guard: after every step the weights are checked, and if the loss, a gradient or a
  weight is not finite the last finite weights are restored and ascent stops. The reply
  never carries NaN or infinite weights.

Config: ``param.epochs``, ``param.lr``, ``param.max_steps``, ``param.loss_bound``,
``param.clip_norm`` (0: off). Needs only the forget data. The measured forward pass
of the batch that triggers the stop rule is reported as ``forward-samples``.
"""

from __future__ import annotations

import math
from logging import INFO

import torch
from flwr.common.logger import log
from torch import nn

from ..local_steps import local_loader, method_param, require_local_data, weights_are_finite
from . import ActionJob, ActionResult, register_action


def gradient_ascent_steps(model: nn.Module, batches, *, epochs: int, lr: float,
                          momentum: float, max_steps: int, loss_bound: float,
                          clip_norm: float, device: torch.device) -> dict:
    """Run bounded gradient ascent in place; return what happened.

    ``loss_bound`` is in nats (the caller scales it by ln C). Returns ``steps``,
    ``trained`` (samples through forward + backward), ``measured`` (forward only),
    ``loss`` (mean ascent loss over the steps taken), ``stop`` (why it stopped)."""
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)
    criterion = nn.CrossEntropyLoss()
    # The last state (parameters and buffers, e.g. BatchNorm statistics) known finite.
    last_finite = {k: v.detach().clone() for k, v in model.state_dict().items()}
    steps = trained = measured = stepped = 0
    total = 0.0
    stop = "epochs"

    def restore() -> None:
        model.load_state_dict(last_finite)

    def every_epoch():
        for _ in range(epochs):
            yield from batches

    for x, y, _ids in every_epoch():
        if steps >= max_steps:
            stop = "max_steps"
            break
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        if not torch.isfinite(loss):
            measured += len(y)
            stop = "non-finite loss"
            restore()  # a train-mode forward may have updated buffers with it
            break
        if float(loss.detach()) > loss_bound:
            measured += len(y)  # this batch is forgotten already: no step on it
            stop = "loss_bound"
            break
        (-loss).backward()
        trained += len(y)
        if not all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None):
            stop = "non-finite gradient"
            break
        if clip_norm > 0:
            nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        steps += 1
        stepped += len(y)
        total += float(loss.detach()) * len(y)
        if not weights_are_finite(model):
            restore()
            stop = "non-finite weights"
            break
        with torch.no_grad():
            for key, value in model.state_dict().items():
                last_finite[key].copy_(value)
    return {"steps": steps, "trained": trained, "measured": measured,
            "loss": total / stepped if stepped else float("nan"), "stop": stop}


@register_action("gradient_ascent")
def gradient_ascent(job: ActionJob) -> ActionResult:
    require_local_data("gradient_ascent", job.forget)
    view, config = job.view, job.config
    num_classes = view.num_classes
    bound = method_param(config, "loss_bound") * math.log(num_classes)
    batches = local_loader(view.dataset, job.forget, view.batch_size, job.seed,
                           transform=view.poison_transform())
    out = gradient_ascent_steps(
        job.model, batches, epochs=method_param(config, "epochs", int),
        lr=method_param(config, "lr"), momentum=view.momentum,
        max_steps=method_param(config, "max_steps", int), loss_bound=bound,
        clip_norm=method_param(config, "clip_norm"), device=job.device)
    log(INFO, "[gradient_ascent] partition %d: %d steps on %d forget samples, stopped by %s",
        view.partition_id, out["steps"], job.forget.size, out["stop"])
    return ActionResult(job.model, int(job.forget.size), out["loss"], out["trained"],
                        forward_samples=out["measured"])
