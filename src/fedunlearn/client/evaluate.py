"""``evaluate``: retain/forget accuracy and membership features on the node's own data."""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict

from ..metrics import membership_features, predict
from .actions import ActionJob


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Report retain/forget accuracy and MIA features on this node's own data."""
    job = ActionJob.from_message(msg, context)
    view, config, device, model = job.view, job.config, job.device, job.model
    retained, forget = job.retained, job.forget
    max_members = int(config.get("max-members", 200))
    rng = np.random.default_rng(view.cfg.seed + 7919 * view.partition_id)

    metrics: dict = {"num-examples": int(retained.size)}
    for name, ids in (("retain", retained), ("forget", forget)):
        logits, labels = predict(model, view.data.train, ids, device=device)
        metrics[f"{name}-correct"] = int((logits.argmax(1) == labels).sum()) if len(ids) else 0
        metrics[f"{name}-total"] = int(len(ids))
        if len(ids):
            feats = membership_features(logits, labels)
            if name == "retain" and len(feats) > max_members:
                feats = feats[rng.choice(len(feats), size=max_members, replace=False)]
            metrics[f"{name}-features"] = [float(v) for v in feats.reshape(-1)]
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
