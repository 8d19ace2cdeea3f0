"""``default`` (message type ``train``): local SGD on the node's retained data.

Used by pretraining, Retrain and every recovery round. Config: ``lr``, ``local-epochs``,
``clip-norm`` (0: off), ``weight-decay`` (default 0). A backdoor client keeps planting
its trigger (it is an attacker, not a method).
"""

from __future__ import annotations

from ...training import train_local
from ..user_data import retained_loader
from . import ActionJob, ActionResult, register_action


@register_action("default", reuses_models=True)
def local_training(job: ActionJob) -> ActionResult:
    view, config = job.view, job.config
    if view.train_fn is not None:
        return user_training(job)
    stats = train_local(
        job.model, view.dataset, job.retained,
        epochs=job.local_epochs(), batch_size=view.batch_size, lr=job.lr(),
        momentum=view.momentum, device=job.device, seed=job.seed,
        clip_norm=float(config.get("clip-norm", 0.0)),
        weight_decay=float(config.get("weight-decay", 0.0)),
        transform=view.poison_transform(),
    )
    return ActionResult(job.model, stats.num_examples, stats.loss, stats.samples_processed)


@register_action("retained", reuses_models=True)
def retained_training(job: ActionJob) -> ActionResult:
    """``train.retained``: the same local training, under a name of its own, so a plugin
    node's own ``@app.train()`` handler keeps serving plain ``train`` messages while a
    node with an accepted request trains on its retained data only."""
    return local_training(job)


def user_training(job: ActionJob) -> ActionResult:
    """The node owner's ``train_fn(model, loader, epochs, lr, device) -> loss`` (the
    signature of Flower's quickstart-pytorch ``train``) on the retained data, in batches
    of the user's own format (:func:`..user_data.retained_loader`)."""
    view = job.view
    ids = [int(i) for i in job.retained]
    if not ids:
        return ActionResult(job.model, 0, float("nan"), 0)
    loader = retained_loader(view.user_train, view.dataset, ids, view.batch_size, job.seed)
    epochs = job.local_epochs()
    loss = view.train_fn(job.model, loader, epochs, job.lr(), job.device)
    loss = float(loss) if isinstance(loss, (int, float)) else float("nan")
    return ActionResult(job.model, len(ids), loss, len(ids) * epochs)
