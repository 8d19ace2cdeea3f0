"""Service mode's unlearning steps: a method run on the current model for the
requests due, and what a step that fails leaves behind."""

from __future__ import annotations

import time
from logging import INFO, WARNING

import torch
from ..logs import log

from ..lifecycle import request_fields, run_method
from ..metrics import flops_per_sample
from ..requests import UnlearningRequest, merge_requests
from ..strategies.base import UnlearningContext
from .state import PendingRequest, _request_dict, _what


class Steps:
    """The part of :class:`UnlearningService` that runs unlearning steps."""

    # -- unlearning steps -----------------------------------------------------------------
    def _flops(self) -> None:
        self.flops = {"train": 0, "forward": 0}
        if self.model_fn is None or self.example_input is None:
            return
        classes = max((int(r.get("num-classes", 0)) for r in self.state.reports.values()),
                      default=0)
        with torch.random.fork_rng(devices=[]):
            model = self.model_fn()
            if not classes:
                with torch.no_grad():
                    classes = int(model.eval()(self.example_input[:1]).shape[-1])
            self.flops = flops_per_sample(model, tuple(self.example_input.shape[1:]), classes)

    def context(self, requests: dict[int, UnlearningRequest]) -> UnlearningContext:
        reports = self.state.reports
        fully = {n for n, r in requests.items()
                 if reports.get(n, {}).get("num-retained", 1) == 0}
        fields = dict(self.context_defaults)
        fields.update(requests=requests, fully_forgotten=fully,
                      node_partitions=dict(self.state.view), original_arrays=self.arrays,
                      model_factory=self.model_fn, example_input=self.example_input,
                      flops_per_sample=self.flops["train"],
                      forward_flops_per_sample=self.flops["forward"],
                      served=dict(self.state.served),
                      served_fully=set(self.state.served_fully))
        return UnlearningContext(**fields)

    def unlearn(self) -> None:
        """One unlearning step for every pending request due now, served together
        (through :func:`fedunlearn.lifecycle.run_method`)."""
        due = [p for p in self.state.pending if p.next_try <= self.state.round]
        requests = {p.node: p.request for p in due}
        strategy = self.method.fresh()
        strategy.bind(self.context(requests))
        step = len(self.state.steps) + 1
        what = ", ".join(f"node {n} ({_what(r)})" for n, r in sorted(requests.items()))
        log(INFO, "[service] unlearning step %d at round %d: %s with %s", step,
            self.state.round, what, strategy.name)
        attempts = max(p.attempts for p in due) + 1
        final = [p for p in due if p.attempts + 1 > self.config.method_retries]
        by_node = {p.node: p for p in due}
        run = run_method(
            strategy, self.grid, self.arrays, requests, self.ledger,
            lambda run: self._publish_step(strategy, run, due, step),
            departed=lambda: self.grid.departed, final=bool(final),
            request_extra=lambda n: {"attempts": by_node[n].attempts + 1},
            started_fields={"attempt": attempts},
            failed_fields={"targets": sorted(requests), "final": bool(final)})
        if run.status == "refused":
            for p in due:  # a refusal does not change by waiting
                p.attempts = self.config.method_retries
            self.ledger.unlearning_failed(strategy.name, run.reason,
                                          model_before=run.model_before,
                                          failures=[dict(request_fields(p.node, p.request),
                                                         attempts=p.attempts + 1)
                                                    for p in due],
                                          targets=sorted(requests), final=True)
        if run.status != "honoured":
            self._step_failed(strategy, due, run.reason)

    def _publish_step(self, strategy, run, due: list[PendingRequest], step: int) -> None:
        """Service mode's publication of an honoured step: a new version, the requests
        served for good (checkpointed), then the audit records and receipts."""
        self.arrays, self.momentum = run.arrays, None  # the method's model; a fresh optimizer
        for p in due:
            earlier = self.state.served.get(p.node)
            self.state.served[p.node] = (p.request if earlier is None
                                         else merge_requests(earlier, p.request))
            if self.state.reports.get(p.node, {}).get("num-retained", 1) == 0:
                self.state.served_fully.add(p.node)
            self.state.seen.add((p.node, p.request.digest()))
            self.state.seen_inbox.update(p.request.inbox_ids)
        self.state.pending = [p for p in self.state.pending if p not in due]
        cost = strategy.cost
        honours = [dict(_request_dict(p.request), node=p.node, digest=p.request.digest(),
                        accepted_round=p.round,
                        deadline_missed=self._deadline_missed(p)) for p in due]
        for h in honours:
            h.pop("sample_ids")
        entry = self.publish("unlearned", honours)
        info = {"step": step, "round": self.state.round, "version": entry["version"],
                "method": strategy.name, "targets": sorted(p.node for p in due),
                "rounds": cost.rounds, "comm_bytes": cost.comm_bytes, "flops": cost.flops,
                "wall_s": round(run.wall_s, 3), "model_sha256": entry["sha256"],
                "model_arrays_sha256": entry["arrays_sha256"],
                "flops_partial": cost.flops_partial,
                "path": entry["path"], "metrics": entry.get("metrics", {}),
                "requests": honours,
                "filed_to_published_s": [round(time.time() - p.accepted_at, 3) for p in due]}
        self.state.steps.append(info)
        for p in due:
            if p.request.inbox_ids:
                self.queue_verdict({"node": p.node, "status": "honoured",
                                    "request": _request_dict(p.request),
                                    "version": entry["version"], "round": self.state.round,
                                    "method": strategy.name, "sha256": entry["sha256"],
                                    "arrays_sha256": entry["arrays_sha256"],
                                    "path": entry["path"], "rounds": cost.rounds,
                                    "comm_bytes": cost.comm_bytes,
                                    "deadline_missed": self._deadline_missed(p)})
        info["model_before_arrays_sha256"] = run.model_before
        info["audited"] = False
        # One checkpoint commits the step: its requests served, the version and the
        # step's records (held since publish()); a crash before it runs the step again.
        self.audit_steps()
        log(INFO, "[service]   %s: %d round(s), %.3g B, %.1f s; published version %d: %s "
            "(sha256 %s)", strategy.name, cost.rounds, cost.comm_bytes, run.wall_s,
            entry["version"], entry["path"], entry["sha256"][:12])
        self.flush_outbox()
        return None  # recorded by audit_steps, once the checkpoint holds the step

    def audit_steps(self) -> None:
        """Record the honoured steps that have no records yet and checkpoint: held since
        :meth:`publish`, the records are committed with the step (a checkpoint of an
        earlier fedunlearn that holds an unrecorded step is caught up at resume)."""
        pending = [step for step in self.state.steps if not step.get("audited", True)]
        for step in pending:
            honours = [{"node": r["node"], "scope": r["scope"], "digest": r["digest"],
                        "inbox_ids": list(r["inbox_ids"]),
                        "accepted_round": r["accepted_round"],
                        "published_version": step["version"],
                        "deadline_missed": r["deadline_missed"]} for r in step["requests"]]
            self.ledger.unlearning_finished(
                step["method"], rounds=step["rounds"], comm_bytes=step["comm_bytes"],
                wall_s=step["wall_s"], metrics=step["metrics"],
                model_before=step.get("model_before_arrays_sha256", step.get("model_before")),
                model_sha256=step["model_sha256"],
                # a step checkpointed before file hashes: its model_sha256 is the digest
                model_arrays_sha256=step.get("model_arrays_sha256", step["model_sha256"]),
                honours=honours, published_version=step["version"])
            step["audited"] = True
        if pending:
            self.checkpoint()

    def _deadline_missed(self, p: PendingRequest) -> bool:
        share = self._deadline_share(p, time.time())
        return bool(share is not None and share > 1.0)

    def _step_failed(self, strategy, due: list[PendingRequest], reason: str) -> None:
        """Count the attempt (the lifecycle wrote the records): due again later, or
        failed for good after ``method_retries`` retries."""
        c = self.config
        final = []
        for p in due:
            p.attempts += 1
            if p.attempts > c.method_retries:
                final.append(p)
            else:
                p.next_try = self.state.round + c.retry_after
        if not final:
            log(WARNING, "[service] %s failed (%s); trying again at round %d", strategy.name,
                reason, due[0].next_try)
            self.checkpoint()
            return
        log(WARNING, "[service] %s failed (%s) after %d attempt(s): the request(s) of "
            "node(s) %s fail", strategy.name, reason, final[0].attempts,
            [p.node for p in final])
        for p in final:
            self.state.seen.add((p.node, p.request.digest()))
            self.state.seen_inbox.update(p.request.inbox_ids)
            self.state.failed.append({"node": p.node, "request": _request_dict(p.request),
                                      "round": self.state.round, "reason": reason[:2000],
                                      "method": strategy.name, "attempts": p.attempts})
            if p.request.inbox_ids:
                self.queue_verdict({"node": p.node, "status": "failed",
                                    "request": _request_dict(p.request),
                                    "method": strategy.name, "round": self.state.round,
                                    "reason": f"{strategy.name} could not serve the "
                                              f"request: {reason}"})
        self.state.pending = [p for p in self.state.pending if p not in final]
        self.checkpoint()
        self.flush_outbox()

