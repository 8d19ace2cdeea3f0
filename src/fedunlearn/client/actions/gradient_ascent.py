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
from dataclasses import dataclass
from logging import INFO

import torch
from ...logs import log
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
    tally = _Tally()
    for x, y, _ids in _every_epoch(batches, epochs):
        if tally.steps >= max_steps:
            tally.stop = "max_steps"
            break
        x, y = x.to(device), y.to(device)
        if not _ascent_step(model, optimizer, criterion, params, x, y, tally,
                            loss_bound=loss_bound, clip_norm=clip_norm,
                            last_finite=last_finite):
            break
    return tally.as_dict()


@dataclass
class _Tally:
    """What :func:`gradient_ascent_steps` has done so far."""

    steps: int = 0
    trained: int = 0
    measured: int = 0
    stepped: int = 0
    total: float = 0.0
    stop: str = "epochs"

    def as_dict(self) -> dict:
        return {"steps": self.steps, "trained": self.trained, "measured": self.measured,
                "loss": self.total / self.stepped if self.stepped else float("nan"),
                "stop": self.stop}


def _every_epoch(batches, epochs: int):
    """The batches, ``epochs`` times over."""
    for _ in range(epochs):
        yield from batches


def _ascent_step(model: nn.Module, optimizer, criterion, params, x, y, tally: _Tally, *,
                 loss_bound: float, clip_norm: float, last_finite: dict) -> bool:
    """One bounded ascent step on batch ``(x, y)``, counted in ``tally``; ``False`` (with
    ``tally.stop`` set) when ascent stops: the loss is past ``loss_bound`` (no step) or
    a loss, gradient or weight is not finite (the last finite state restored where the
    model may have changed)."""
    optimizer.zero_grad(set_to_none=True)
    loss = criterion(model(x), y)
    if not torch.isfinite(loss):
        tally.measured += len(y)
        tally.stop = "non-finite loss"
        model.load_state_dict(last_finite)  # a train-mode forward may have updated buffers
        return False
    if float(loss.detach()) > loss_bound:
        tally.measured += len(y)  # this batch is forgotten already: no step on it
        tally.stop = "loss_bound"
        return False
    (-loss).backward()
    tally.trained += len(y)
    if not all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None):
        tally.stop = "non-finite gradient"
        return False
    if clip_norm > 0:
        nn.utils.clip_grad_norm_(params, clip_norm)
    optimizer.step()
    tally.steps += 1
    tally.stepped += len(y)
    tally.total += float(loss.detach()) * len(y)
    if not weights_are_finite(model):
        model.load_state_dict(last_finite)
        tally.stop = "non-finite weights"
        return False
    with torch.no_grad():
        for key, value in model.state_dict().items():
            last_finite[key].copy_(value)
    return True


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
    log(INFO, "[gradient_ascent] partition %s: %d steps on %d forget samples, stopped by %s",
        view.partition_id, out["steps"], job.forget.size, out["stop"])
    return ActionResult(job.model, int(job.forget.size), out["loss"], out["trained"],
                        forward_samples=out["measured"])
