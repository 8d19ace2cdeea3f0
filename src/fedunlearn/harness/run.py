"""ServerApp-side experiment: pretrain -> collect requests -> unlearn -> measure.

``flower_apps/server_app.py`` calls :func:`run_experiment`. This module only composes
the phases, each in its own module, which hand each other an ``ArrayRecord`` plus a small
record of what they did:

1. federation checks (:mod:`.federation`): wait for the nodes, verify which partition
   each holds (kept for the whole job);
2. pretraining (:mod:`.pretraining`), or the cached model for the same config;
3. requests (:mod:`.federation`): collect with ``query.unlearn``, validate each against
   the verified map, log rejections;
4. evaluation (:mod:`.evaluation`) of the original model;
5. for each method (:mod:`.strategies`): refuse it up front if it cannot serve the
   requests, else unlearn from the same pretrained model, measure, write results
   (:mod:`.results`);
6. print and write the comparison table.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, MetricRecord
from ..logs import log
from flwr.serverapp import Grid

from .. import federation
from ..audit import AuditLog, audit_path, model_digest
from .backdoor import patch_size_for, trigger_value
from .config import ExperimentConfig
from .data import FederatedData, federated_data
from ..console import emit
from .evaluation import Evaluator
from ..ledger import Ledger
from ..metrics import flops_per_sample
from .models import create_model
from ..layers import example_input_for
from .outputs import OUTPUTS_FILE, PerExampleOutputs, forget_ids, split_record
from .pretraining import pretrain
from .relearn import relearn, relearn_target
from ..serving import MODEL_FILE, save_model
from ..requests import UnlearningRequest
from .results import (COMPARISON_FILE, FAILED_FILE, SKIPPED_FILE, comparison_markdown,
                      comparison_text, result_record, results_path, write_json)
from ..strategies import UnlearningFailed
from ..lifecycle import run_method
from .methods import HarnessContext, check_methods, create_method, history_spec, preflight
from ..training import resolve_device


class Experiment:
    """One fedunlearn job on a Flower ``Grid``."""

    def __init__(self, grid: Grid, cfg: ExperimentConfig) -> None:
        # Run-config requests (forget.clients) name simulated clients: not on a deployment.
        self.deployment = federation.is_deployment(grid)
        self.ignored_forget_clients: tuple[int, ...] = ()
        if self.deployment:
            cfg, self.ignored_forget_clients = without_run_config_requests(cfg)
        self.cfg = cfg
        self.method_params = check_methods(cfg)
        self.data: FederatedData = federated_data(cfg)
        info = self.data.info
        self.device = resolve_device(cfg.device)
        self.example_input = example_input_for(info.in_channels, info.image_size)
        self.output_dir = resolve_output_dir(cfg.output_dir)
        audit = AuditLog(audit_path(self.output_dir), federation.run_id_of(grid))
        # The verified view, replies checked, one reply timeout for every exchange.
        self.grid = federation.GuardedGrid(grid, audit, cfg.reply_timeout)
        self.ledger = Ledger(audit, self.grid, audit.run_id)
        self.trigger = (trigger_value(cfg.backdoor, self.data.train)
                        if cfg.backdoor.enabled else None)
        self.evaluator = Evaluator(cfg, self.data, self.new_model, self.device, self.trigger)
        flops = flops_per_sample(self.new_model(),
                                 (info.in_channels, info.image_size, info.image_size),
                                 info.num_classes)
        self.context = HarnessContext(
            cfg=cfg, model_factory=self.new_model, example_input=self.example_input,
            flops_per_sample=flops["train"], forward_flops_per_sample=flops["forward"],
            progress=self.progress, on_round=self.on_round, data=self.data,
            trajectory=cfg.eval_trajectory)
        self.trajectories: dict[str, list[dict]] = {}
        self.history_spec = history_spec(cfg, self.method_params)
        self.rejected: list[dict] = []
        self.forget_ids, self.outputs = None, None  # set once the requests are in

    def progress(self, phase: str, server_round: int, arrays, num_rounds: int):
        """Test accuracy in the log and in the progress display (:mod:`.console`); with
        ``eval.trajectory``, every metric of a method's model, kept for its results."""
        if self.cfg.eval_trajectory and phase != "pretrain":
            saved = getattr(self, "last_measurement", None)
            measured = self.evaluate(arrays)
            self.last_measurement = saved
            self.trajectories.setdefault(phase, []).append(
                {"round": server_round, **{k: _finite(v) for k, v in measured.items()}})
            if server_round == 0 and ":" not in phase:  # the model its unlearning step made
                save_model(results_path(self.output_dir, phase).with_name(
                    ROUND0_MODEL_FILE), arrays)
            log(INFO, "[%s] round %d/%d  %s", phase, server_round, num_rounds,
                _short(measured))
            metrics = MetricRecord({"test-accuracy": float(measured["test"])})
        else:
            metrics = self.evaluator.progress(phase, server_round, arrays, num_rounds)
        emit("round", phase=phase, round=server_round, rounds=num_rounds,
             test=round(float(metrics["test-accuracy"]), 4))
        return metrics

    @staticmethod
    def on_round(phase: str, server_round: int, num_rounds: int) -> None:
        emit("round", phase=phase, round=server_round, rounds=num_rounds)

    def architecture(self) -> dict:
        """What builds the job's model (``results.json``'s ``model.architecture``, read
        by :func:`fedunlearn.load_module`): the model's name and the data's shape."""
        info = self.data.info
        return {"name": self.cfg.model, "num_classes": info.num_classes,
                "in_channels": info.in_channels, "image_size": info.image_size}

    def new_model(self) -> torch.nn.Module:
        return create_model(**self.architecture())

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
        for method in self.cfg.methods:
            preflight(method, self.context)

    def wait_for_nodes(self) -> list[int]:
        return federation.wait_for_nodes(self.grid, self.cfg.num_clients)

    def discover_partitions(self, nodes: list[int]) -> dict[int, int]:
        """Which node holds which partition, checked before any training and kept."""
        replies = list(federation.query(self.grid, nodes, not self.deployment,
                                        want_request=False))
        self.context.node_partitions = federation.check_partitions(replies,
                                                                   self.cfg.num_clients)
        # Reply bounds come from what the nodes report about their own data, never from
        # the server's copy of the partitions.
        self.grid.verify(self.context.node_partitions)
        self.grid.reports = federation.node_reports(replies, self.context.node_partitions)
        self.ledger.verified(self.context.node_partitions)
        return self.context.node_partitions

    def collect_requests(self, nodes: list[int]) -> dict[int, UnlearningRequest]:
        """Ask every node for its unlearning request; keep the valid ones, checked with
        what each node reports about its own data (counts, never the data)."""
        reports: dict[int, dict] = {}
        accepted, self.rejected = federation.collect_valid_requests(
            federation.query(self.grid, nodes, not self.deployment), None,
            verified=self.context.node_partitions or None, audit=self.ledger.audit,
            reports=reports)
        self.grid.reports.update({n: r for n, r in reports.items()
                                  if n in self.context.node_partitions})
        self.context.requests = accepted
        self.context.fully_forgotten = {n for n in accepted
                                        if reports.get(n, {}).get("num-retained", 1) == 0}
        return accepted

    def evaluate(self, arrays: ArrayRecord) -> dict:
        """The model's metrics; what the MIA rests on goes to ``last_measurement``."""
        self.last_measurement: dict = {}
        return self.evaluator.evaluate(self.grid, arrays, self.context.requests,
                                       self.context.node_partitions,
                                       details=self.last_measurement)

    def own_data_nodes(self) -> list[int]:
        """Nodes with data of their own (``dataset-path``): no copy on the server."""
        return sorted(n for n, r in self.grid.reports.items() if "num-partitions" not in r)

    def prepare_outputs(self, accepted: dict) -> None:
        """The accepted requests' forget ids (``results.json``) and, with
        ``audit.outputs``, the writer of each method's ``outputs.npz``."""
        self.forget_ids = forget_ids(self.cfg, accepted, self.own_data_nodes())
        self.outputs = (PerExampleOutputs(self.cfg, self.new_model, self.device,
                                          self.forget_ids, self.trigger)
                        if self.cfg.audit_outputs else None)

    def pretrain(self) -> tuple[ArrayRecord, dict]:
        resolved = {}
        chunk = batched_chunk(self.grid)
        if chunk:  # batched training sums in another float order: a model of its own
            resolved["batch_clients"] = chunk
        if self.trigger is not None:
            resolved["backdoor_resolved"] = {
                "patch_size": patch_size_for(self.cfg.backdoor, self.data.info.image_size),
                "value": [round(float(v), 6) for v in self.trigger]}
        own = self.own_data_nodes()
        if own:
            # Nodes with data of their own (dataset-path): the config does not say what
            # they hold, so no cached model stands for it.
            directory = self.output_dir / "pretrained"
            log(INFO, "[pretrain] node(s) %s hold data of their own (dataset-path): "
                "pretraining for this job only, saved in %s (the shared cache is not used)",
                own, directory)
            return pretrain(self.grid, self.context, resolved, history=self.history_spec,
                            directory=directory)
        return pretrain(self.grid, self.context, resolved, history=self.history_spec)

    def publish(self, strategy, run, original: dict, original_measurement, pretrain_info,
                results: dict[str, dict]) -> dict:
        """The harness's publication of an honoured run: every metric of the unlearned
        model, ``model.pt`` with its hash and ``results.json``."""
        method, cfg = run.method, self.cfg
        unlearned = self.evaluate(run.arrays)
        log(INFO, "[%s] unlearned: %s", method, _short(unlearned))
        result = result_record(strategy, self.context, self.rejected, original,
                               unlearned, pretrain_info)
        result["measurement"] = {"original": original_measurement,
                                 "unlearned": self.last_measurement}
        result.update(split_record(cfg, self.forget_ids))
        target = results_path(self.output_dir, method)
        if self.outputs is not None:
            result["outputs"] = str(self.outputs.write(
                target.with_name(OUTPUTS_FILE), method, self.context.original_arrays,
                run.arrays))
        model_path, digest = save_model(target.with_name(MODEL_FILE), run.arrays)
        arrays_digest = model_digest(run.arrays)
        # sha256: of the file's bytes (sha256sum); arrays_sha256: the array digest.
        result["model"] = {"path": str(model_path), "sha256": digest,
                           "arrays_sha256": arrays_digest,
                           "architecture": self.architecture()}
        if cfg.audit_relearn_rounds:
            result["relearn"] = self.relearn(method, run.arrays, original)
        if cfg.eval_trajectory:
            retrain = (unlearned if method == "retrain"
                       else results.get("retrain", {}).get("unlearned"))
            result["trajectory"] = trajectory_of(method, self.trajectories, retrain)
        # Verified nodes that left the federation so far (failed in every round and
        # evaluation since; see the audit log's node.departed).
        result["departed_nodes"] = self.grid.departed
        path = write_json(target, result)
        log(INFO, "[%s] wrote %s", method, path)
        results[method] = result
        return {"metrics": unlearned, "model_sha256": digest,
                "model_arrays_sha256": arrays_digest}

    def relearn(self, method: str, arrays: ArrayRecord, original: dict) -> dict:
        """``results.json``'s ``relearn`` (:mod:`.relearn`): rounds of federated
        training with the targets' forget data until the original's forget accuracy (or
        ASR) is back; ``arrays`` stay as they are."""
        target = relearn_target(original, self.trigger is not None)
        requests, parts = self.context.requests, self.context.node_partitions
        measure = (self.evaluator.attack_success if target.metric == "asr" else
                   lambda a: self.evaluator.forget_accuracy(self.grid, a, requests, parts))
        return relearn(self.grid, self.context, arrays, self.cfg.audit_relearn_rounds,
                       target, measure, f"{method}:relearn")

    def started(self) -> None:
        """``job.started``: the job's methods, data and federation."""
        cfg = self.cfg
        self.ledger.started(methods=list(cfg.methods), dataset=cfg.dataset, model=cfg.model,
                            num_clients=cfg.num_clients, deployment=self.deployment,
                            ignored_forget_clients=list(self.ignored_forget_clients))

    def not_published(self, run, accepted, skipped: dict, failed: dict) -> None:
        """A refused or failed method: its ``skipped.json`` or ``failed.json``. Its
        failure is its own: the other methods still run, and the job fails at the end,
        naming it."""
        method = run.method
        target = results_path(self.output_dir, method)
        described = [dict(r.describe(), node_id=n) for n, r in sorted(accepted.items())]
        if run.status == "refused":
            skipped[method] = run.reason
            log(WARNING, "[%s] refused: %s; the other methods still run", method, run.reason)
            write_json(target.with_name(SKIPPED_FILE),
                       {"method": method, "skipped": run.reason, "request": described})
            return
        log(WARNING, "[%s] FAILED: %s; the other methods still run", method, run.reason)
        failed[method] = run.reason
        skipped[method] = f"FAILED: {run.reason}"
        write_json(target.with_name(FAILED_FILE),
                   {"method": method, "failed": run.reason,
                    "departed_nodes": self.grid.departed, "request": described})

    def run(self) -> dict[str, dict]:
        cfg = self.cfg
        self.started()
        self.preflight()
        nodes = self.wait_for_nodes()
        log(INFO, "fedunlearn: %s on %s/%s, %d clients (%s), methods: %s",
            cfg.forget.scope, cfg.dataset, cfg.model, cfg.num_clients, cfg.partitioning,
            ", ".join(cfg.methods))
        self.discover_partitions(nodes)
        pretrained, pretrain_info = self.pretrain()
        self.context.original_arrays = pretrained
        accepted = self.collect_requests(nodes)
        self.ledger.verdicts(accepted, self.rejected, pretrained)
        if not accepted:
            log(WARNING, "No valid unlearning request was received; nothing to unlearn.")
            write_json(self.output_dir / "no-request.json",
                       {"rejected": self.rejected, "pretrain": pretrain_info})
            log(INFO, "Wrote %s", self.output_dir / "no-request.json")
            return {}
        self.prepare_outputs(accepted)
        strategies = [create_method(method, self.context) for method in cfg.methods]
        log(INFO, "[measure] original (pretrained) model")
        original = self.evaluate(pretrained)
        original_measurement = self.last_measurement
        log(INFO, "[measure] original: %s", _short(original))
        results, failed, skipped = {}, {}, {}
        runnable = [s for s in strategies if s.refusal(accepted) is None]
        for strategy in strategies:
            if strategy in runnable:
                log(INFO, "[%s] unlearning starts (params: %s)", strategy.name,
                    strategy.params.as_dict() or "none")
                emit("phase", phase=strategy.name, index=runnable.index(strategy) + 1,
                     of=len(runnable))
            run = run_method(
                strategy, self.grid, pretrained, accepted, self.ledger,
                lambda run: self.publish(strategy, run, original, original_measurement,
                                         pretrain_info, results),
                departed=lambda: self.grid.departed)
            if run.status != "honoured":
                self.not_published(run, accepted, skipped, failed)
        ordered = list(results.values())
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / COMPARISON_FILE).write_text(comparison_markdown(ordered, skipped))
        for line in comparison_text(ordered, skipped=skipped).splitlines():
            log(INFO, "%s", line)
        log(INFO, "Results written to %s", self.output_dir)
        if failed:
            raise UnlearningFailed("method(s) failed: " + "; ".join(
                f"{m}: {r}" for m, r in failed.items()) + f" (the others' results are in "
                f"{self.output_dir})")
        return results


def _finite(value):
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


TRAJECTORY_METRICS = ("retain", "forget", "test", "mia")
ROUND0_MODEL_FILE = "model-round0.pt"
"""With ``eval.trajectory``: the model a method's unlearning step produced, before
recovery (NoT's negated model), beside its ``model.pt``."""


def trajectory_of(method: str, trajectories: dict[str, list[dict]],
                  retrain: dict | None) -> dict[str, list[dict]]:
    """A method's measured rounds by phase (``<method>`` for its recovery, e.g.
    ``federaser:replay`` for a phase of its own); with Retrain's final metrics, each
    point's ``gap``: the mean |difference| over the metrics both have."""
    out = {}
    for phase in [p for p in trajectories if p == method or p.startswith(method + ":")]:
        points = trajectories.pop(phase)
        for point in points:
            if retrain:
                diffs = [abs(point[k] - retrain[k]) for k in TRAJECTORY_METRICS
                         if point.get(k) is not None and _finite(retrain.get(k)) is not None]
                point["gap"] = round(sum(diffs) / len(diffs), 4) if diffs else None
        out[phase] = points
    return out


def resolve_output_dir(output_dir: str) -> Path:
    """``output-dir`` or, when empty, ``~/fedunlearn-results/<timestamp>``."""
    if output_dir:
        return Path(output_dir).expanduser().resolve()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path.home() / "fedunlearn-results" / stamp


def run_experiment(grid: Grid, run_config) -> dict[str, dict]:
    cfg = ExperimentConfig.from_run_config(run_config)
    experiment = Experiment(grid, cfg)
    if cfg.service_rounds:
        return run_service(experiment)
    try:
        results = experiment.run()
    except BaseException as err:
        experiment.ledger.failed(err)
        raise
    experiment.ledger.finished(results, experiment.output_dir)
    return results


def run_service(experiment: Experiment) -> dict:
    """Service mode on the harness (run-config ``service.rounds`` > 0): pretrain (or
    resume from ``<output-dir>/checkpoint.pt``), then train continuously and serve the
    nodes' requests as they arrive with the one configured method
    (:class:`fedunlearn.service.UnlearningService`); the output dir is the service's state
    directory (checkpoint, versions, audit log)."""
    import numpy as np

    from ..service import CHECKPOINT_FILE, UnlearningService
    from ..metrics import accuracy_from_logits, predict
    from ..training import load_arrays

    cfg, out = experiment.cfg, experiment.output_dir
    experiment.ledger.interrupted()
    experiment.preflight()
    nodes = experiment.wait_for_nodes()
    log(INFO, "fedunlearn service mode: %s on %s/%s, %d clients, method %s, %d rounds; "
        "state in %s", cfg.forget.scope, cfg.dataset, cfg.model, cfg.num_clients,
        cfg.methods[0], cfg.service_rounds, out)
    experiment.discover_partitions(nodes)
    if (out / CHECKPOINT_FILE).exists():
        arrays = ArrayRecord(experiment.new_model().state_dict())  # checked against it
    else:
        arrays, _ = experiment.pretrain()
    strategy = create_method(cfg.methods[0], experiment.context)
    test_ids = np.arange(len(experiment.data.test))

    def evaluate(a):  # the server's own test set, for each published version
        model = load_arrays(experiment.new_model(), a).to(experiment.device)
        logits, labels = predict(model, experiment.data.test, test_ids,
                                 device=experiment.device)
        return {"test": accuracy_from_logits(logits, labels)}

    def on_round(rnd, info):
        emit("round", phase="service", round=rnd, rounds=cfg.service_rounds)

    context = {k: getattr(experiment.context, k) for k in ("managed", "data", "on_round")}
    service = UnlearningService(
        strategy, state_dir=out, config=cfg.service_config(), evaluate_fn=evaluate,
        model_fn=experiment.new_model, example_input=experiment.example_input,
        on_round=on_round, reply_timeout=cfg.reply_timeout,
        run_config_requests=not experiment.deployment, context_defaults=context,
        note_interrupted=False, verbose=True,  # the job's console hides Flower's lines
        rebuild=cfg.service_rebuild)
    emit("phase", phase="service", index=1, of=1)
    outcome = service.run(experiment.grid.inner, arrays,
                          verified=(experiment.context.node_partitions,
                                    experiment.grid.reports))
    summary = {"round": outcome.round, "version": outcome.version,
               "stopped": outcome.stopped, "resumed_from": outcome.resumed_from,
               "steps": outcome.steps, "failed": outcome.failed, "pending": outcome.pending,
               "departed_nodes": service.grid.departed}
    write_json(out / "service.json", summary)
    if outcome.failed:
        raise UnlearningFailed("service: request(s) failed: " + "; ".join(
            f"node {f['node']}: {f['reason']}" for f in outcome.failed)
            + f" (see {out / 'audit.jsonl'})")
    return summary


def _short(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())


def without_run_config_requests(cfg):
    """``cfg`` for a deployment: the run-config's ``forget.clients`` cleared (it names
    simulated clients; on a deployment a request comes from the node, through its inbox
    or node-config), and the partitions it named, for the log and the audit."""
    ignored = tuple(cfg.forget.clients)
    if not ignored:
        return cfg, ignored
    log(WARNING, "forget.clients=%s is ignored on a deployment: run-config requests apply "
        "to simulations only; a node asks through its inbox (fedunlearn request file) or "
        "its node-config (forget-scope=...)", ",".join(map(str, ignored)))
    return dataclasses.replace(cfg, forget=dataclasses.replace(cfg.forget, clients=())), ignored


def batched_chunk(grid) -> int:
    """The in-process engine's batched chunk behind ``grid`` and the grids that wrap it
    (``inner``), 0 when it trains one message at a time or is not that engine."""
    while grid is not None:
        chunk = getattr(grid, "batch_clients", None)
        if isinstance(chunk, int):
            return chunk
        grid = getattr(grid, "inner", None)
    return 0
