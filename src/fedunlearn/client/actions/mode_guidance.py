"""``mode_guidance`` (message type ``train.mode_guidance``): MoDE's memory guidance.

The target node trains the global model (``arrays``) on its forget data labelled by the
degradation model (``degradation``, the message's second model): each forget sample's
label is replaced by ``argmax theta_d(x)`` of the very input it trains on (hard
pseudo-labels with cross-entropy on logits; no softmax before the loss). A class- or
instance-wise target trains on its retained data with the true labels in the same
epochs. Config: ``lr``, ``local-epochs``. Every pseudo-label costs one forward pass of
the degradation model, reported as ``forward-samples``.
"""

from __future__ import annotations

import numpy as np
import torch

from ...training import train_local
from . import ActionJob, ActionResult, register_action

from ...protocol import DEGRADATION_KEY


@register_action("mode_guidance")
def memory_guidance(job: ActionJob) -> ActionResult:
    if DEGRADATION_KEY not in job.models:
        raise ValueError(f"mode_guidance needs the degradation model as ArrayRecord "
                         f"{DEGRADATION_KEY!r}; the message carries {sorted(job.models)}")
    if job.forget.size == 0:
        raise ValueError("mode_guidance needs the node's forget data, and this node has "
                         "no accepted request in the message config")
    view = job.view
    degradation = job.models[DEGRADATION_KEY].eval()
    forget_ids = torch.as_tensor(np.sort(job.forget))
    poison = view.poison_transform()
    forward = 0

    def guide(x, y, ids):
        nonlocal forward
        if poison is not None:
            x, y = poison(x, y, ids)
        mask = torch.isin(ids, forget_ids)
        if mask.any():
            with torch.no_grad():
                pseudo = degradation(x[mask].to(job.device)).argmax(1).cpu()
            y = y.clone()
            y[mask] = pseudo
            forward += int(mask.sum())
        return x, y

    ids = np.union1d(job.retained, job.forget)
    stats = train_local(
        job.model, view.dataset, ids,
        epochs=job.local_epochs(), batch_size=view.batch_size, lr=job.lr(),
        momentum=view.momentum, device=job.device, seed=job.seed, transform=guide,
    )
    return ActionResult(job.model, stats.num_examples, stats.loss, stats.samples_processed,
                        forward_samples=forward)
