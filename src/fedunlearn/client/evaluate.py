"""``evaluate``: retain/forget accuracy and membership features on the node's own data."""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict

from ..metrics import membership_features, predict
from .actions import ActionJob


VALIDATION_SPLIT = "val"


def validation_ids(job: ActionJob) -> np.ndarray:
    """This node's validation split without the classes its accepted request forgets.

    Instance-wise requests name training samples only, so they leave the validation
    split whole; a client-wise target is never asked (it has nothing retained)."""
    view = job.view
    val = view.val_indices()
    classes = job.config.get("forget.classes", [])
    if str(job.config.get("forget.scope", "")) == "class" and len(classes):
        val = val[~np.isin(view.labels()[val], np.asarray(list(classes), dtype=np.int64))]
    return val


def handle_evaluate(msg: Message, context: Context, view_for=None) -> Message:
    """Report retain/forget accuracy and MIA features on this node's own data, or, with
    config ``split="val"``, accuracy on its validation split (the recovery stopping
    rule's signal)."""
    job = ActionJob.from_message(msg, context, view_for)
    view, config, device, model = job.view, job.config, job.device, job.model
    if str(config.get("split", "")) == VALIDATION_SPLIT:
        ids = validation_ids(job)
        logits, labels = predict(model, view.dataset, ids, device=device)
        correct = int((logits.argmax(1) == labels).sum()) if len(ids) else 0
        return Message(RecordDict({"metrics": MetricRecord(
            {"num-examples": int(len(ids)), "val-correct": correct,
             "val-total": int(len(ids))})}), reply_to=msg)
    retained, forget = job.retained, job.forget
    max_members = int(config.get("max-members", 200))
    rng = np.random.default_rng(view.seed + 7919 * view.draw_id)

    metrics: dict = {"num-examples": int(retained.size)}
    for name, ids in (("retain", retained), ("forget", forget)):
        logits, labels = predict(model, view.dataset, ids, device=device)
        metrics[f"{name}-correct"] = int((logits.argmax(1) == labels).sum()) if len(ids) else 0
        metrics[f"{name}-total"] = int(len(ids))
        if len(ids):
            feats = membership_features(logits, labels)
            if name == "retain" and len(feats) > max_members:
                feats = feats[rng.choice(len(feats), size=max_members, replace=False)]
            metrics[f"{name}-features"] = [float(v) for v in feats.reshape(-1)]
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
