"""``bad_teacher`` (``train.bad_teacher``): BadT at the data holder (Chundawat et al.,
AAAI 2023, "Can bad teaching induce forgetting?").

The student starts from the global model. On a forget sample it is distilled towards an
*incompetent* teacher (a randomly initialised model, built on the node from
``random-model-seed`` so it never crosses the network), on a retained sample towards
the *competent* teacher (a frozen copy of the global model). The data are the forget
samples plus a random ``param.retain_fraction`` of the retained ones, shuffled together;
the loss is ``KL(softmax(z_T / T) || softmax(z_S / T))`` with the reference's
``F.kl_div(..., reduction="mean")`` scaling (summed, divided by batch size x classes:
1/C of ``batchmean``; with Adam the scale barely matters). Adam, the student in
train mode (stated explicitly: the reference never sets it).

Each sample costs one forward pass of the teacher it is distilled from, reported as
``forward-samples``. The node holds the two teachers while it runs.

Config: ``param.epochs``, ``param.lr``, ``param.temperature``,
``param.retain_fraction``, ``random-model-seed``. Needs the forget and the retained
data.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from ..local_steps import (RANDOM_MODEL_SEED_KEY, local_loader, method_param, random_model,
                           require_local_data)
from . import ActionJob, ActionResult, register_action


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """``F.kl_div(log_softmax(z_S/T), softmax(z_T/T), reduction="mean")`` (the
    reference's scaling), computed without the deprecated ``mean`` reduction."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    teacher = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_student, teacher, reduction="sum") / log_student.numel()


@register_action("bad_teacher")
def bad_teacher(job: ActionJob) -> ActionResult:
    require_local_data("bad_teacher", job.forget, job.retained)
    view, config, device = job.view, job.config, job.device
    epochs = method_param(config, "epochs", int)
    temperature = method_param(config, "temperature")
    fraction = method_param(config, "retain_fraction")
    rng = np.random.default_rng(job.seed)
    k = round(fraction * job.retained.size)
    retained_part = np.sort(rng.choice(job.retained, size=k, replace=False))
    ids = np.union1d(job.forget, retained_part)
    student = job.model.train()
    competent = copy.deepcopy(student).eval()
    incompetent = random_model(view.new_model, int(config[RANDOM_MODEL_SEED_KEY])).to(device)
    incompetent.eval()
    forget_ids = torch.as_tensor(np.sort(job.forget))
    optimizer = torch.optim.Adam(student.parameters(), lr=method_param(config, "lr"))
    batches = local_loader(view.dataset, ids, view.batch_size, job.seed,
                           transform=view.poison_transform())
    trained = forward = 0
    total = 0.0
    for _ in range(epochs):
        for x, _y, batch_ids in batches:
            x = x.to(device)
            is_forget = torch.isin(batch_ids, forget_ids).to(device)
            with torch.no_grad():
                teacher_logits = torch.empty(len(x), view.num_classes,
                                             device=device)
                if is_forget.any():
                    teacher_logits[is_forget] = incompetent(x[is_forget])
                if (~is_forget).any():
                    teacher_logits[~is_forget] = competent(x[~is_forget])
            forward += len(x)
            loss = distillation_loss(student(x), teacher_logits, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            trained += len(x)
            total += float(loss.detach()) * len(x)
    return ActionResult(student, int(ids.size), total / max(trained, 1), trained,
                        forward_samples=forward)
