"""``frozen`` (message type ``train.frozen``): the default local training with some
parameters frozen.

Config: the default action's (``lr``, ``local-epochs``, ``clip-norm``, ``weight-decay``)
plus ``frozen``, a comma-separated list of parameter names (``named_parameters()``
names, e.g. ``conv1.weight,conv1.bias``). Those parameters are not trained: their
``requires_grad`` is turned off, so they get no gradient and stay out of the optimizer
(:func:`fedunlearn.training.train_local`): they come back bit-identical. An unknown name,
an empty list or a list that freezes every parameter fails the node, saying which.

Used by the ``lwo`` method (the NoT paper's layer-wise-optimality check: the negated
first layer frozen while the re-initialised rest trains). Registered without
``reuses_models`` (it changes ``requires_grad``).
"""

from __future__ import annotations

from . import ActionJob, ActionResult, register_action
from .default import local_training

FROZEN_KEY = "frozen"


def frozen_names(job: ActionJob) -> list[str]:
    """The parameter names the config's ``frozen`` lists, checked against the model."""
    raw = job.config.get(FROZEN_KEY)
    if not isinstance(raw, str):
        raise ValueError(f"train.frozen: the config must carry {FROZEN_KEY!r}, a "
                         "comma-separated list of parameter names (got "
                         f"{type(raw).__name__ if raw is not None else 'nothing'})")
    names = list(dict.fromkeys(s.strip() for s in raw.split(",") if s.strip()))
    if not names:
        raise ValueError(f"train.frozen: {FROZEN_KEY}={raw!r} names no parameter")
    params = dict(job.model.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        known = list(params)
        shown = ", ".join(known[:12]) + (f", ... ({len(known) - 12} more)"
                                         if len(known) > 12 else "")
        raise ValueError(f"train.frozen: {FROZEN_KEY} names unknown parameter(s) "
                         f"{unknown}; the model's parameters: {shown}")
    if len(names) == len(params):
        raise ValueError(f"train.frozen: {FROZEN_KEY} freezes every parameter of the model: "
                         "nothing would train")
    return names


@register_action("frozen")
def frozen_training(job: ActionJob) -> ActionResult:
    params = dict(job.model.named_parameters())
    for name in frozen_names(job):
        params[name].requires_grad_(False)
        params[name].grad = None
    return local_training(job)
