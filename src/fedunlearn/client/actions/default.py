"""``default`` (message type ``train``): local SGD on the node's retained data.

Used by pretraining, Retrain and every recovery round. Config: ``lr``, ``local-epochs``,
``clip-norm`` (0: off), ``weight-decay`` (default 0). A backdoor client keeps planting
its trigger (it is an attacker, not a method).
"""

from __future__ import annotations

from ...training import train_local
from . import ActionJob, ActionResult, register_action


@register_action("default")
def local_training(job: ActionJob) -> ActionResult:
    view, config = job.view, job.config
    stats = train_local(
        job.model, view.data.train, job.retained,
        epochs=job.local_epochs(), batch_size=view.cfg.batch_size, lr=job.lr(),
        momentum=view.cfg.momentum, device=job.device, seed=job.seed,
        clip_norm=float(config.get("clip-norm", 0.0)),
        weight_decay=float(config.get("weight-decay", 0.0)),
        transform=view.poison_transform(),
    )
    return ActionResult(job.model, stats.num_examples, stats.loss, stats.samples_processed)
