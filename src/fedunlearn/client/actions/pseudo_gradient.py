"""``pseudo_gradient`` (message type ``train.pseudo_gradient``): train on the forget data.

A target node runs ordinary local SGD from the received global model on the data it
wants forgotten (all of its training split for a client-wise request, the forget
classes or samples otherwise), with the data as the node trained on it (a backdoor
client's trigger included). The server reads the returned model as the node's
pseudo-gradient ``w_u - theta`` and applies it negated (PUF). Config: ``lr``,
``local-epochs``. The reply's ``num-examples`` is the forget set's size.
"""

from __future__ import annotations

from ...training import train_local
from . import ActionJob, ActionResult, register_action


@register_action("pseudo_gradient")
def train_on_forget_data(job: ActionJob) -> ActionResult:
    if job.forget.size == 0:
        raise ValueError("pseudo_gradient needs the node's forget data, and this node has "
                         "no accepted request in the message config")
    view = job.view
    stats = train_local(
        job.model, view.dataset, job.forget,
        epochs=job.local_epochs(), batch_size=view.batch_size, lr=job.lr(),
        momentum=view.momentum, device=job.device, seed=job.seed,
        transform=view.poison_transform(),
    )
    return ActionResult(job.model, stats.num_examples, stats.loss, stats.samples_processed)
