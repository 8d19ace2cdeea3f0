"""``random_label_finetune`` (``train.random_label_finetune``): RandL at the data holder.

The node relabels its forget samples at random and fine-tunes the global model on them
together with its retained data (NoT, section 6.2: "the forget set is randomly
relabeled, followed by fine-tuning the model on the updated dataset"). The labels are
drawn once per sample (the updated data set), from the other classes when
``param.exclude_true_label`` is set (every forget label is then wrong), and the forget
and retained samples are shuffled together. Local SGD with the federation's momentum
and batch size.

Config: ``param.epochs``, ``param.lr``, ``param.weight_decay``,
``param.exclude_true_label``. Needs the forget and the retained data.
"""

from __future__ import annotations

import numpy as np
import torch

from ...training import train_local
from ..local_steps import method_param, random_labels, require_local_data
from . import ActionJob, ActionResult, register_action


def relabelling(job: ActionJob, exclude_true: bool, seed_offset: int = 1):
    """A batch transform that gives each forget sample its own random label (drawn once,
    seeded per round and node) after the node's own transform (a backdoor trigger)."""
    view = job.view
    forget = np.sort(job.forget)
    generator = torch.Generator().manual_seed(job.seed + seed_offset)
    new_labels = random_labels(torch.as_tensor(view.labels()[forget]),
                               view.num_classes, generator, exclude_true)
    lookup = dict(zip(forget.tolist(), new_labels.tolist()))
    poison = view.poison_transform()

    def transform(x, y, ids):
        if poison is not None:
            x, y = poison(x, y, ids)
        y = torch.as_tensor([lookup.get(int(i), int(t)) for i, t in zip(ids, y)],
                            dtype=torch.long)
        return x, y

    return transform, lookup


@register_action("random_label_finetune")
def random_label_finetune(job: ActionJob) -> ActionResult:
    require_local_data("random_label_finetune", job.forget, job.retained)
    view, config = job.view, job.config
    transform, _ = relabelling(job, method_param(config, "exclude_true_label", bool))
    stats = train_local(
        job.model, view.dataset, np.union1d(job.retained, job.forget),
        epochs=method_param(config, "epochs", int), batch_size=view.batch_size,
        lr=method_param(config, "lr"), momentum=view.momentum, device=job.device,
        seed=job.seed, weight_decay=method_param(config, "weight_decay"),
        transform=transform,
    )
    return ActionResult(job.model, stats.num_examples, stats.loss, stats.samples_processed)
