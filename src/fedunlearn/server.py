"""ServerApp-side experiment: pretrain -> collect requests -> unlearn -> measure.

``flower_apps/server_app.py`` calls :func:`run_experiment`. Phases hand each other an
``ArrayRecord`` plus a small record of what they did:

1. **pretrain** (or load the cached model for the same pretraining config);
2. **collect requests** with a ``query.unlearn`` message, validate each, log rejections;
3. **measure the original model** (federated evaluation on every node's own data for
   retain/forget accuracy and MIA features; test accuracy on the server's test set);
4. for each method: **unlearn** from the same pretrained model, measure, write results;
5. print and write the comparison table.
"""

from __future__ import annotations

import datetime as _dt
import time
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from .backdoor import attack_success_rate, patch_size_for, trigger_value
from .checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from .client import federated_data, request_to_config
from .config import ExperimentConfig
from .data import FederatedData
from .metrics import (accuracy_from_logits, flops_per_sample, membership_features,
                      mia_score, predict, split_nonmembers)
from .models import create_model
from .negation import example_input_for, negate_layers
from .requests import (NODE_RECORD, QUERY_UNLEARN, REQUEST_RECORD, UnlearningRequest,
                       forget_indices, validate_request)
from .results import (COMPARISON_FILE, comparison_markdown, comparison_text,
                      results_path, write_json)
from .strategies import UnlearningContext, UnlearningStrategy, create_method
from .strategies.base import PretrainingProtocol
from .training import load_arrays, resolve_device, to_arrays

NODE_STALL_S = 60.0
REPLY_TIMEOUT_S = 3600.0


class Experiment:
    """One fedunlearn job on a Flower ``Grid``."""

    def __init__(self, grid: Grid, cfg: ExperimentConfig) -> None:
        self.grid = grid
        self.cfg = cfg
        self.data: FederatedData = federated_data(cfg)
        info = self.data.info
        self.device = resolve_device(cfg.device)
        self.example_input = example_input_for(info.in_channels, info.image_size)
        self.output_dir = resolve_output_dir(cfg.output_dir)
        self.test_ids = np.arange(len(self.data.test))
        self.attack_nonmembers, self.heldout_nonmembers = split_nonmembers(
            len(self.data.test), seed=cfg.seed)
        self.context = UnlearningContext(
            cfg=cfg, model_factory=self.new_model, example_input=self.example_input,
            flops_per_sample=flops_per_sample(
                self.new_model(), (info.in_channels, info.image_size, info.image_size),
                info.num_classes)["train"],
            progress=self.progress)
        self.rejected: list[dict] = []
        self.trigger = (trigger_value(cfg.backdoor, self.data.train)
                        if cfg.backdoor.enabled else None)

    # -- helpers ----------------------------------------------------------------------
    def new_model(self) -> torch.nn.Module:
        info = self.data.info
        return create_model(self.cfg.model, num_classes=info.num_classes,
                            in_channels=info.in_channels, image_size=info.image_size)

    def progress(self, phase: str, server_round: int, arrays: ArrayRecord,
                 num_rounds: int) -> MetricRecord:
        model = load_arrays(self.new_model(), arrays).to(self.device)
        logits, labels = predict(model, self.data.test, self.test_ids, device=self.device)
        acc = accuracy_from_logits(logits, labels)
        log(INFO, "[%s] round %d/%d  test accuracy %.2f%%", phase, server_round, num_rounds, acc)
        return MetricRecord({"test-accuracy": acc})

    def preflight(self) -> None:
        """Fail before pretraining on settings that would only fail after it."""
        bd, info = self.cfg.backdoor, self.data.info
        if bd.enabled and not 0 <= bd.target < info.num_classes:
            raise ValueError(f"backdoor.target={bd.target} outside the label set "
                             f"0..{info.num_classes - 1}")
        if bd.enabled:
            patch_size_for(bd, info.image_size)
            missing = sorted(set(bd.clients) - set(self.cfg.forget.clients))
            if missing:
                log(WARNING, "backdoor clients %s do not ask to be forgotten "
                    "(forget.clients=%s): their backdoor stays in every method",
                    missing, list(self.cfg.forget.clients))
        if "not" in self.cfg.methods:
            negate_layers(self.new_model(), self.example_input,
                          layers=list(self.cfg.negate_layers) or None,
                          include_bias=self.cfg.negate_bias)

    def wait_for_nodes(self) -> list[int]:
        """Wait until ``federation.num-clients`` nodes are connected.

        Gives up once no new node has connected for ``NODE_STALL_S`` seconds (a
        simulation has all its nodes at once; a deployment's nodes keep arriving)."""
        want = self.cfg.num_clients
        start = last_change = time.monotonic()
        last_log, seen = -1e9, -1
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= want:
                return nodes
            now = time.monotonic()
            if len(nodes) != seen:
                seen, last_change = len(nodes), now
            if now - last_change > NODE_STALL_S:
                raise RuntimeError(
                    f"only {len(nodes)} of federation.num-clients={want} nodes connected "
                    f"(none joined in the last {NODE_STALL_S:.0f}s): in simulation pass "
                    f"--federation-config \"num-supernodes={want}\" (fedunlearn-run does), "
                    f"on a deployment start {want} SuperNodes")
            if now - last_log >= 10:
                log(INFO, "Waiting for nodes: %d of %d connected after %.0fs (simulation: "
                    "num-supernodes must equal federation.num-clients)", len(nodes), want,
                    now - start)
                last_log = now
            time.sleep(1.0)

    # -- phases -----------------------------------------------------------------------
    def pretrain(self) -> tuple[ArrayRecord, dict]:
        cfg = self.cfg
        resolved = {}
        if self.trigger is not None:
            resolved["backdoor_resolved"] = {
                "patch_size": patch_size_for(cfg.backdoor, self.data.info.image_size),
                "value": [round(float(v), 6) for v in self.trigger]}
        key = cfg.pretrain_key(resolved)
        path = checkpoint_path(cfg.resolved_checkpoint_dir(), key)
        cached = load_checkpoint(path)
        if cached is not None:
            arrays, meta = cached
            log(INFO, "[pretrain] loaded cached model %s (key %s); skipping pretraining",
                path, key)
            return arrays, {"key": key, "path": str(path), "cached": True,
                            "cost": meta.get("cost", {})}
        log(INFO, "[pretrain] FedAvg from scratch: %d rounds over all %d clients (key %s)",
            cfg.pretrain_rounds, cfg.num_clients, key)
        torch.manual_seed(cfg.seed)
        initial = to_arrays(self.new_model())
        strategy = PretrainStrategy(self.context)
        start = time.perf_counter()
        arrays = strategy.train_rounds(self.grid, initial, cfg.pretrain_rounds)
        strategy.cost.wall_s = time.perf_counter() - start
        meta = {"key": key, "config": cfg.to_dict(), "cost": strategy.cost.as_dict(),
                "created": _dt.datetime.now().isoformat(timespec="seconds")}
        save_checkpoint(path, arrays, meta)
        log(INFO, "[pretrain] saved %s", path)
        return arrays, {"key": key, "path": str(path), "cached": False,
                        "cost": strategy.cost.as_dict()}

    def query(self, nodes: list[int]) -> list[Message]:
        """Send ``query.unlearn`` to ``nodes``; every node answers with the partition it
        holds and its unlearning request, if it has one."""
        messages = [Message(RecordDict(), dst_node_id=n, message_type=QUERY_UNLEARN)
                    for n in nodes]
        return list(self.grid.send_and_receive(messages, timeout=REPLY_TIMEOUT_S))

    def discover_partitions(self, nodes: list[int]) -> dict[int, int]:
        """Which node holds which partition, checked before any training."""
        self.context.node_partitions = check_partitions(self.query(nodes), self.cfg.num_clients)
        return self.context.node_partitions

    def collect_requests(self, nodes: list[int]) -> dict[int, UnlearningRequest]:
        """Ask every node for its unlearning request; keep the valid ones."""
        accepted, self.rejected = collect_valid_requests(self.query(nodes), self.data)
        self.context.requests = accepted
        labels = np.asarray(self.data.train.targets)
        self.context.fully_forgotten = {
            n for n, r in accepted.items()
            if forget_indices(r, self.data.train_indices(r.partition_id), labels).size
            == self.data.train_indices(r.partition_id).size}
        return accepted

    def evaluate(self, arrays: ArrayRecord) -> dict:
        """Retain/forget accuracy (federated), test accuracy and MIA (server)."""
        cfg = self.cfg
        nodes = sorted(self.grid.get_node_ids())
        per_node = max(1, -(-cfg.mia_max_members // max(len(nodes), 1)))
        messages = []
        for n in nodes:
            config = ConfigRecord({"max-members": per_node})
            request = self.context.requests.get(n)
            if request is not None:
                config.update(request_to_config(request))
            messages.append(Message(RecordDict({"arrays": arrays, "config": config}),
                                    dst_node_id=n, message_type="evaluate"))
        replies = list(self.grid.send_and_receive(messages, timeout=REPLY_TIMEOUT_S))
        # Replies arrive in any order; fix it so the MIA's subsampling is reproducible.
        parts = self.context.node_partitions
        replies.sort(key=lambda m: parts.get(int(m.metadata.src_node_id), -1))
        sums = {"retain-correct": 0, "retain-total": 0, "forget-correct": 0, "forget-total": 0}
        members, targets = [], []
        for msg in replies:
            if msg.has_error():
                log(WARNING, "evaluation failed on node %s: %s", msg.metadata.src_node_id,
                    msg.error.reason)
                continue
            m = msg.content["metrics"]
            for k in sums:
                sums[k] += int(m[k])
            if "retain-features" in m:
                members.append(np.asarray(m["retain-features"], dtype=np.float64).reshape(-1, 3))
            if "forget-features" in m:
                targets.append(np.asarray(m["forget-features"], dtype=np.float64).reshape(-1, 3))
        model = load_arrays(self.new_model(), arrays).to(self.device)
        logits, labels = predict(model, self.data.test, self.test_ids, device=self.device)
        test_feats = membership_features(logits, labels)
        member = np.concatenate(members) if members else np.zeros((0, 3))
        target = np.concatenate(targets) if targets else np.zeros((0, 3))
        out = {
            "retain": _pct(sums["retain-correct"], sums["retain-total"]),
            "forget": _pct(sums["forget-correct"], sums["forget-total"]),
            "test": accuracy_from_logits(logits, labels),
            "mia": mia_score(member, test_feats[self.attack_nonmembers], target,
                             test_feats[self.heldout_nonmembers], seed=cfg.seed),
        }
        if self.trigger is not None:
            out["asr"] = attack_success_rate(model, self.data.test, labels, cfg.backdoor,
                                             self.trigger, self.data.info.image_size,
                                             device=self.device)
        return out

    def run(self) -> dict[str, dict]:
        cfg = self.cfg
        self.preflight()
        nodes = self.wait_for_nodes()
        log(INFO, "fedunlearn: %s on %s/%s, %d clients (%s), methods: %s",
            cfg.forget.scope, cfg.dataset, cfg.model, cfg.num_clients, cfg.partitioning,
            ", ".join(cfg.methods))
        self.discover_partitions(nodes)
        pretrained, pretrain_info = self.pretrain()
        accepted = self.collect_requests(nodes)
        if not accepted:
            log(WARNING, "No valid unlearning request was received; nothing to unlearn.")
            write_json(self.output_dir / "no-request.json",
                       {"rejected": self.rejected, "pretrain": pretrain_info})
            log(INFO, "Wrote %s", self.output_dir / "no-request.json")
            return {}
        log(INFO, "[measure] original (pretrained) model")
        original = self.evaluate(pretrained)
        log(INFO, "[measure] original: %s", _short(original))
        several = len(cfg.methods) > 1
        results: dict[str, dict] = {}
        for method in cfg.methods:
            strategy = create_method(method, self.context)
            log(INFO, "[%s] unlearning starts", method)
            unlearned_arrays = strategy.unlearn(self.grid, pretrained)
            unlearned = self.evaluate(unlearned_arrays)
            log(INFO, "[%s] unlearned: %s", method, _short(unlearned))
            result = self.result_record(strategy, original, unlearned, pretrain_info)
            path = write_json(results_path(self.output_dir, method, several), result)
            log(INFO, "[%s] wrote %s", method, path)
            results[method] = result
        ordered = list(results.values())
        (self.output_dir).mkdir(parents=True, exist_ok=True)
        if several:
            (self.output_dir / COMPARISON_FILE).write_text(comparison_markdown(ordered))
        for line in comparison_text(ordered).splitlines():
            log(INFO, "%s", line)
        log(INFO, "Results written to %s", self.output_dir)
        return results

    def result_record(self, strategy: UnlearningStrategy, original: dict, unlearned: dict,
                      pretrain_info: dict) -> dict:
        return {
            "method": strategy.name,
            "request": [dict(r.describe(), node_id=n)
                        for n, r in sorted(self.context.requests.items())],
            "rejected": self.rejected,
            "original": original,
            "unlearned": unlearned,
            "cost": strategy.cost.as_dict(),
            "pretrain": pretrain_info,
            "notes": strategy.notes,
            "config": self.cfg.to_dict(),
        }


class PretrainStrategy(PretrainingProtocol, UnlearningStrategy):
    """FedAvg over all clients with the pretraining settings (no requests yet)."""

    name = "pretrain"
    uses_requests = False


def check_partitions(replies, num_clients: int) -> dict[int, int]:
    """node id -> partition id from ``query.unlearn`` replies.

    Raises ``RuntimeError`` unless every partition ``0..num_clients-1`` is held by exactly
    one node: a partition held twice would keep training on data that is being forgotten,
    a missing one would silently shrink the federation.
    """
    node_partitions: dict[int, int] = {}
    problems: list[str] = []
    for msg in replies:
        node = int(msg.metadata.src_node_id)
        if msg.has_error():
            problems.append(f"node {node} failed to answer: {msg.error.reason}")
        elif NODE_RECORD not in msg.content:
            problems.append(f"node {node} did not say which partition it holds")
        else:
            node_partitions[node] = int(msg.content[NODE_RECORD]["partition-id"])
    holders: dict[int, list[int]] = {}
    for node, partition in sorted(node_partitions.items()):
        holders.setdefault(partition, []).append(node)
    for partition, nodes in sorted(holders.items()):
        if len(nodes) > 1:
            problems.append(f"partition {partition} is held by several nodes {nodes}")
        if not 0 <= partition < num_clients:
            problems.append(f"node {nodes[0]} holds partition {partition}, outside "
                            f"0..{num_clients - 1} (federation.num-clients={num_clients})")
    missing = sorted(set(range(num_clients)) - set(holders))
    if missing:
        problems.append(f"no node holds partition(s) {missing}")
    if problems:
        raise RuntimeError("the federation's partitions are inconsistent: "
                           + "; ".join(problems)
                           + ". Give each SuperNode a distinct node-config partition-id "
                           "in 0..num-partitions-1.")
    return node_partitions


def collect_valid_requests(replies, data: FederatedData
                           ) -> tuple[dict[int, UnlearningRequest], list[dict]]:
    """Validate the requests in ``query.unlearn`` replies.

    Returns ``(accepted, rejected)``: node id -> request, and one
    ``{"node_id", "reason"}`` per rejected request (each also logged).
    """
    node_partitions: dict[int, int] = {}
    raw: list[tuple[int, dict]] = []
    for msg in replies:
        node = int(msg.metadata.src_node_id)
        if msg.has_error():
            log(WARNING, "node %d failed to answer the unlearning query: %s", node,
                msg.error.reason)
            continue
        if NODE_RECORD in msg.content:
            node_partitions[node] = int(msg.content[NODE_RECORD]["partition-id"])
        if REQUEST_RECORD in msg.content:
            raw.append((node, dict(msg.content[REQUEST_RECORD])))
    labels = np.asarray(data.train.targets)
    accepted: dict[int, UnlearningRequest] = {}
    rejected: list[dict] = []
    for node, record in raw:
        reason = None
        if node not in node_partitions:
            reason = "the node did not say which partition it holds"
        elif "error" in record:
            reason = f"the node could not build its request: {record['error']}"
        else:
            try:
                request = UnlearningRequest.from_config_record(record, node_id=node)
            except ValueError as err:
                reason = str(err)
            else:
                reason = validate_request(request, node_partitions[node], node_partitions,
                                          data.train_indices, labels, data.info.num_classes)
        if reason is None:
            accepted[node] = request
            log(INFO, "Unlearning request accepted from node %d: %s", node, request.describe())
        else:
            rejected.append({"node_id": node, "reason": reason})
            log(WARNING, "Unlearning request REJECTED from node %d: %s", node, reason)
    return accepted, rejected


def resolve_output_dir(output_dir: str) -> Path:
    """``output-dir`` or, when empty, ``~/fedunlearn-results/<timestamp>``."""
    if output_dir:
        return Path(output_dir).expanduser().resolve()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path.home() / "fedunlearn-results" / stamp


def run_experiment(grid: Grid, run_config) -> dict[str, dict]:
    cfg = ExperimentConfig.from_run_config(run_config)
    return Experiment(grid, cfg).run()


def _pct(correct: int, total: int) -> float:
    return 100.0 * correct / total if total else float("nan")


def _short(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())
