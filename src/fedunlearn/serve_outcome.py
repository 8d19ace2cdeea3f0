"""What :func:`fedunlearn.serve` returns: each method's :class:`MethodOutcome` and the
:class:`ServeOutcome` with its table."""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.app import ArrayRecord

from .serve_checks import unmeasured_note

PARTIAL_FLOPS = ("only server-side arithmetic is counted: the work on the nodes is not "
                 "(give serve() or the strategy model_fn= and example_input= to count it)")


@dataclass
class MethodOutcome:
    """What one method did: its model (``None`` if it failed or was refused; a
    ``degraded`` method's model is kept here for inspection, never handed on)."""

    method: str
    status: str  # "honoured", "degraded", "refused" or "failed"
    arrays: ArrayRecord | None = None
    reason: str = ""
    model_path: str = ""
    model_sha256: str = ""
    """SHA-256 of ``model_path``'s bytes (``sha256sum model_path`` prints it)."""
    model_arrays_sha256: str = ""
    """The model's array digest (:func:`fedunlearn.audit.model_digest`): what a node
    sent the model checks it against."""
    rounds: int = 0
    comm_bytes: int = 0
    flops: int = 0
    wall_s: float = 0.0
    metrics: dict = field(default_factory=dict)
    """``test`` (from ``evaluate_fn``), ``forget`` and ``retain`` (accuracy % reported by
    the target nodes on their own forget / retained data; NaN, ``null`` in
    ``results.json``: not measured)."""
    notes: dict = field(default_factory=dict)
    not_measured: dict = field(default_factory=dict)
    """Metric -> why it was not measured (e.g. ``{"test": "evaluate_fn raised ..."}``)."""
    flops_partial: str = ""
    """Why ``flops`` counts only part of the work ("": it counts all of it)."""
    unmeasured: dict = field(default_factory=dict)
    """What the targets could not measure: ``{"forget": "node 12: <reason>", ...}``."""

    def as_dict(self) -> dict:
        return {"method": self.method, "status": self.status, "reason": self.reason,
                "model_path": self.model_path, "model_sha256": self.model_sha256,
                "model_arrays_sha256": self.model_arrays_sha256,
                "rounds": self.rounds, "comm_bytes": self.comm_bytes, "flops": self.flops,
                "flops_partial": bool(self.flops_partial),
                **({"flops_partial_reason": self.flops_partial} if self.flops_partial else {}),
                "wall_s": round(self.wall_s, 3), "metrics": self.metrics,
                "not_measured": self.not_measured, "unmeasured": self.unmeasured,
                "notes": self.notes}


@dataclass
class ServeOutcome:
    """The result of :func:`serve`."""

    arrays: ArrayRecord
    """The unlearned model of the last method that honoured the requests; the input
    model when no request was accepted (when requests were accepted and no method
    honoured them, :func:`serve` raises). Never a ``degraded`` method's model."""
    methods: dict[str, MethodOutcome]
    report: dict
    """``nodes``, ``accepted``, ``rejected``, ``model_before`` and, once a method honoured
    the requests, ``go_on_with``: the strategy wrapper that keeps forgotten nodes out of
    later training (:class:`fedunlearn.ExcludeForgotten`, docs/plugin.md)."""

    @property
    def honoured(self) -> bool:
        return any(m.status == "honoured" for m in self.methods.values())

    def table(self) -> str:
        """One line per method: test, forget and retain accuracy, rounds, bytes, FLOPs
        (``*``: partial, said in a footnote) and the model file with the first 12 hex
        digits of its SHA-256 (``sha256sum`` of the file)."""
        rows = [f"{'method':<10} {'status':<9} {'test':>7} {'forget':>7} {'retain':>7} "
                f"{'rounds':>6} {'comm (B)':>10} {'FLOPs':>10}  model (file sha256)"]
        partial: dict[str, list[str]] = {}  # reason -> methods
        for m in self.methods.values():
            def pct(key):
                v = m.metrics.get(key)
                return f"{v:7.2f}" if isinstance(v, float) and v == v else f"{'-':>7}"
            model = f"{m.model_path} ({m.model_sha256[:12]})" if m.model_path else m.reason
            flops = f"{m.flops:.3g}" + ("*" if m.flops_partial else " ")
            if m.flops_partial:
                partial.setdefault(m.flops_partial, []).append(m.method)
            rows.append(f"{m.method:<10} {m.status:<9} {pct('test')} {pct('forget')} "
                        f"{pct('retain')} {m.rounds:>6} {m.comm_bytes:>10.3g} {flops:>10}  {model}")
        rows += [f"* partial FLOPs ({', '.join(names)}): {why}" for why, names in partial.items()]
        for m in self.methods.values():  # what a row's numbers do not say
            if m.status == "degraded":
                rows.append(f"  {m.method} degraded: {m.reason}")
            if m.unmeasured:
                rows.append(f"  {m.method}: {unmeasured_note(m.unmeasured)}")
        return "\n".join(rows)


__all__ = ["MethodOutcome", "PARTIAL_FLOPS", "ServeOutcome"]
