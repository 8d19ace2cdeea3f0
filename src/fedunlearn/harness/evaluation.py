"""Evaluation: retain/forget accuracy (federated), test accuracy, MIA and ASR (server).

Nodes evaluate a model on their own data (the forget data never leaves them) and send
counts plus membership features; the server adds test accuracy, fits the membership
attack, and measures a backdoor's attack success rate when one is configured.
"""

from __future__ import annotations

from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from ..logs import log
from flwr.serverapp import Grid

from .backdoor import attack_success_rate
from ..metrics import (MIA_MIN_SAMPLES, accuracy_from_logits, membership_features, mia_result,
                      predict, split_nonmembers)
from ..replies import parse_evaluate_reply
from ..protocol import EVALUATE_UNLEARN
from ..requests import request_to_config
from ..training import load_arrays
from ..parsing import WireError

from ..protocol import reply_timeout  # noqa: E402


class Evaluator:
    """Measures models for one job.

    Parameters
    ----------
    cfg : ExperimentConfig
    data : FederatedData
    new_model : callable returning a fresh model
    device : torch.device for server-side inference
    trigger : the backdoor's resolved trigger value, or ``None`` without a backdoor
    """

    def __init__(self, cfg, data, new_model, device, trigger=None) -> None:
        self.cfg, self.data, self.new_model, self.device = cfg, data, new_model, device
        self.trigger = trigger
        self._test_labels = None
        self.test_ids = np.arange(len(data.test))
        self.attack_nonmembers, self.heldout_nonmembers = split_nonmembers(
            len(data.test), seed=cfg.seed)

    def progress(self, phase: str, server_round: int, arrays: ArrayRecord,
                 num_rounds: int) -> MetricRecord:
        """Test accuracy for the progress log."""
        model = load_arrays(self.new_model(), arrays).to(self.device)
        logits, labels = predict(model, self.data.test, self.test_ids, device=self.device)
        acc = accuracy_from_logits(logits, labels)
        log(INFO, "[%s] round %d/%d  test accuracy %.2f%%", phase, server_round, num_rounds, acc)
        return MetricRecord({"test-accuracy": acc})

    def evaluate(self, grid: Grid, arrays: ArrayRecord, requests: dict,
                 node_partitions: dict[int, int], details: dict | None = None) -> dict:
        """Retain/forget accuracy (federated), test accuracy and MIA (server).

        If a node fails its evaluation, Retain, Forget and MIA are NaN (missing): a sum
        over fewer nodes would be another metric. When every request is class-wise, the
        MIA compares the forget samples with held-out test samples *of the forgotten
        classes* (otherwise the attack would partly detect the class, not membership).
        ``details``, when given, receives the MIA's sample counts and 95% interval, the
        failed nodes, and whether the held-out set was class-matched."""
        cfg = self.cfg
        # Every node of the verified view, connected or not: one that left is a failed
        # node (its metrics missing), never a smaller federation measured as the same.
        nodes = sorted(node_partitions) if node_partitions else sorted(grid.get_node_ids())
        per_node = max(1, -(-cfg.mia_max_members // max(len(nodes), 1)))
        messages = _evaluation_messages(nodes, arrays, requests, per_node)
        replies = list(grid.send_and_receive(messages, timeout=reply_timeout(grid)))
        # Replies arrive in any order; fix it so the MIA's subsampling is reproducible.
        replies.sort(key=lambda m: node_partitions.get(int(m.metadata.src_node_id), -1))
        sums, members, targets, failed = _node_counts(replies, nodes, per_node)
        model = load_arrays(self.new_model(), arrays).to(self.device)
        logits, labels = predict(model, self.data.test, self.test_ids, device=self.device)
        classes = forgotten_classes(requests)
        mia = self._membership_attack(logits, labels, members, targets, classes)
        out = {
            "retain": _pct(sums["retain-correct"], sums["retain-total"]),
            "forget": _pct(sums["forget-correct"], sums["forget-total"]),
            "test": accuracy_from_logits(logits, labels),
            "mia": mia["score"],
        }
        _flag_unreliable(out, failed, mia)
        if details is not None:
            details.update(mia_n_forget=mia["n_forget"], mia_n_heldout=mia["n_heldout"],
                           mia_ci95=[round(v, 2) for v in mia["ci95"]],
                           mia_too_small=bool(mia["too_small"]),
                           mia_class_matched=[int(c) for c in classes],
                           failed_nodes=sorted(set(failed)))
        if self.trigger is not None:
            out["asr"] = attack_success_rate(model, self.data.test, labels, cfg.backdoor,
                                             self.trigger, self.data.info.image_size,
                                             device=self.device)
        return out

    def forget_accuracy(self, grid: Grid, arrays: ArrayRecord, requests: dict,
                        node_partitions: dict[int, int]) -> float:
        """Forget accuracy alone (%), as :meth:`evaluate` counts it, asking only the
        nodes with a request (the others hold no forget data); NaN when one of them
        fails (logged)."""
        nodes = sorted(n for n in requests if not node_partitions or n in node_partitions)
        messages = _evaluation_messages(nodes, arrays, requests, 1)
        replies = list(grid.send_and_receive(messages, timeout=reply_timeout(grid)))
        sums, _, _, failed = _node_counts(replies, nodes, 1)
        if failed:
            log(WARNING, "forget accuracy: node(s) %s failed; the value is missing",
                sorted(set(failed)))
            return float("nan")
        return _pct(sums["forget-correct"], sums["forget-total"])

    def attack_success(self, arrays: ArrayRecord) -> float:
        """The backdoor's attack success rate (%) on the server's test set."""
        if self.trigger is None:
            raise ValueError("attack_success: this job plants no backdoor "
                             "(backdoor.clients is empty)")
        model = load_arrays(self.new_model(), arrays).to(self.device)
        if self._test_labels is None:  # the test set's labels, as evaluate() reads them
            _, self._test_labels = predict(model, self.data.test, self.test_ids,
                                           device=self.device)
        labels = self._test_labels
        return attack_success_rate(model, self.data.test, labels, self.cfg.backdoor,
                                   self.trigger, self.data.info.image_size,
                                   device=self.device)

    def _membership_attack(self, logits, labels, members: list, targets: list,
                           classes: list[int]) -> dict:
        """The MIA (:func:`~fedunlearn.metrics.mia_result`): the nodes' retained
        (``members``) and forget (``targets``) features against the test set's. With
        forgotten ``classes``, the held-out samples are those classes' test samples and
        the attack is fit on the other classes only."""
        test_feats = membership_features(logits, labels)
        member = np.concatenate(members) if members else np.zeros((0, 3))
        target = np.concatenate(targets) if targets else np.zeros((0, 3))
        attack, heldout = self.attack_nonmembers, self.heldout_nonmembers
        if classes:
            # The forgotten classes are scored on every test sample of theirs; the attack
            # is fit on the other classes only, like the members (retained data) it sees.
            attack = attack[~np.isin(labels[attack], classes)]
            heldout = self.test_ids[np.isin(labels, classes)]
        return mia_result(member, test_feats[attack], target, test_feats[heldout],
                          seed=self.cfg.seed)


def _evaluation_messages(nodes: list[int], arrays: ArrayRecord, requests: dict,
                         per_node: int) -> list[Message]:
    """One ``evaluate.unlearn`` message per node: the model, the node's share of the
    MIA's members and its request, if any."""
    messages = []
    for n in nodes:
        config = ConfigRecord({"max-members": per_node})
        request = requests.get(n)
        if request is not None:
            config.update(request_to_config(request))
        messages.append(Message(RecordDict({"arrays": arrays, "config": config}),
                                dst_node_id=n, message_type=EVALUATE_UNLEARN))
    return messages


def _node_counts(replies: list[Message], nodes: list[int], per_node: int
                 ) -> tuple[dict[str, int], list, list, list[int]]:
    """``(sums, members, targets, failed)``: the retain/forget counts summed over the
    nodes' replies, their retained and forget membership features, and the nodes that
    did not answer, failed or sent a malformed reply (each logged)."""
    sums = {"retain-correct": 0, "retain-total": 0, "forget-correct": 0, "forget-total": 0}
    members, targets = [], []
    answered = {int(m.metadata.src_node_id) for m in replies}
    failed = sorted(set(nodes) - answered)
    for msg in replies:
        if msg.has_error():
            failed.append(int(msg.metadata.src_node_id))
            log(WARNING, "evaluation failed on node %s: %s", msg.metadata.src_node_id,
                msg.error.reason)
            continue
        try:  # untrusted: a malformed reply is a failed node, never a crash
            reply = parse_evaluate_reply(msg, max_members=per_node)
        except WireError as err:
            log(WARNING, "evaluation reply from node %s is malformed (counted as a failed "
                "node): %s", msg.metadata.src_node_id, err)
            failed.append(int(msg.metadata.src_node_id))
            continue
        for k in sums:
            sums[k] += reply.counts[k]
        members.append(reply.retain_features)
        targets.append(reply.forget_features)
    return sums, members, targets, failed


def _flag_unreliable(out: dict, failed: list[int], mia: dict) -> None:
    """With a failed node, Retain, Forget and MIA become NaN (logged); else an MIA on
    too few samples is logged with its interval."""
    if failed:
        log(WARNING, "evaluation failed on node(s) %s: Retain, Forget and MIA are "
            "missing for this model", sorted(set(failed)))
        out.update(retain=float("nan"), forget=float("nan"), mia=float("nan"))
    elif mia["too_small"]:
        log(WARNING, "MIA rests on %d forget and %d held-out samples (fewer than %d): "
            "its 95%% interval is [%.1f, %.1f]", mia["n_forget"], mia["n_heldout"],
            MIA_MIN_SAMPLES, *mia["ci95"])


def forgotten_classes(requests: dict) -> list[int]:
    """The forgotten classes when every accepted request is class-wise, else ``[]``."""
    if not requests or any(r.scope != "class" for r in requests.values()):
        return []
    return sorted({int(c) for r in requests.values() for c in r.classes})


def _pct(correct: int, total: int) -> float:
    return 100.0 * correct / total if total else float("nan")
