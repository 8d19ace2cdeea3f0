"""Trajectories: Avg. Gap to Retrain against rounds of NoT's results (the NoT paper's
Figures 4 and 5), from the trajectory's own gap or the Retrain result of the same seed."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...metrics import METRIC_KEYS
from .aggregation import _finite, mean_std
from .constants import METHOD_FIELDS, REFERENCE

TRAJECTORY_METHOD = "not"
PERTURBATION_ORDER = ("negate", "none", "reinit", "noise", "flip", "rotate")
# NoT's settings besides the perturbation and the layer selection: they split a line.
_REST_FIELDS = tuple(f for f in METHOD_FIELDS if f not in ("negate_layers", "params"))
GAP_NOTE = ("Avg. Gap to Retrain = mean |Δ| over Retain, Forget, Test and MIA between the "
            "model after that round (round 0: right after the perturbation, before any "
            "recovery round) and Retrain's final model of the same seed; mean ± std over "
            "seeds (ddof=1), End = each seed's last round.")


def perturbation_of(result: dict) -> str:
    """NoT's perturbation: ``params.perturbation``, ``notes.perturbation``, else negate."""
    for part in ("params", "notes"):
        value = (result.get(part) or {}).get("perturbation")
        if value:
            return str(value)
    return "negate"


def layers_of(result: dict) -> str:
    """The perturbed layer selection: module names from ``notes.perturbed`` (``.weight``
    and ``.bias`` folded into their module), else ``config.negate_layers``, else
    ``first layer``."""
    names = (result.get("notes") or {}).get("perturbed") or []
    if isinstance(names, str):
        names = [names]
    if not names:
        names = _str_list((result.get("config") or {}).get("negate_layers"))
    modules: list[str] = []
    for name in names:
        module = re.sub(r"\.(weight|bias)$", "", str(name))
        if module not in modules:
            modules.append(module)
    return "+".join(modules) if modules else "first layer"


def _str_list(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [p for p in re.split(r"[,;\s]+", value.strip()) if p]
    return [str(v) for v in value]


def _perturbation_order(name: str) -> tuple:
    return (PERTURBATION_ORDER.index(name) if name in PERTURBATION_ORDER
            else len(PERTURBATION_ORDER), name)


@dataclass
class GapLine:
    """One NoT variant's Avg. Gap over rounds: one series per results file (seed)."""

    perturbation: str
    layers: str
    rest: tuple
    series: list[tuple[int, list[tuple[int, float]]]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    label: str = ""

    @property
    def seeds(self) -> list[int]:
        return sorted({seed for seed, _ in self.series})

    @property
    def n(self) -> int:
        return len(self.series)

    def rounds(self) -> list[int]:
        return sorted({r for _, pts in self.series for r, _ in pts})

    def at(self, rnd: int) -> tuple[float, float, int]:
        """Mean, std and count over the series that measured round ``rnd``."""
        vals = [g for _, pts in self.series for r, g in pts if r == rnd]
        return (*mean_std(vals), len(vals))

    def end(self) -> tuple[float, float, list[int]]:
        """Mean and std of each series' last point, and the last rounds."""
        lasts = [max(pts) for _, pts in self.series if pts]
        return (*mean_std(g for _, g in lasts), sorted({r for r, _ in lasts}))


@dataclass
class GapTrajectories:
    """A setting's NoT lines, and what the report did about missing gaps."""

    lines: list[GapLine]
    notes: list[str]
    from_job: int = 0       # trajectories whose gap the job wrote (Retrain in the job)
    computed: int = 0       # trajectories whose gap the report computed (separate Retrain)


def _retrain_references(entries: Sequence[tuple[Path, dict]]) -> dict[int, dict[str, float]]:
    """Per seed: Retrain's final metrics (the mean over its results files of that seed)."""
    per_seed: dict[int, list[dict]] = {}
    for _, r in entries:
        if r.get("method") == REFERENCE:
            seed = int((r.get("config") or {}).get("seed", 0))
            per_seed.setdefault(seed, []).append(r.get("unlearned") or {})
    return {seed: {k: mean_std(u.get(k) for u in found)[0] for k in METRIC_KEYS}
            for seed, found in per_seed.items()}


def _gap_to(point: dict, reference: dict[str, float]) -> float | None:
    """The mean |difference| over the metrics both have (as the job computes it)."""
    diffs = [abs(float(point[k]) - reference[k]) for k in METRIC_KEYS
             if _finite(point.get(k)) and _finite(reference.get(k))]
    return sum(diffs) / len(diffs) if diffs else None


def _gap_series(points: Sequence[Any], refs: dict[int, dict[str, float]],
                seed: int) -> tuple[list[tuple[int, float]], bool, bool]:
    """One trajectory's ``(round, gap)`` points, whether any gap was the trajectory's own
    and whether any was computed against Retrain's result of ``seed``; no points when a
    point has neither."""
    series: list[tuple[int, float]] = []
    own = used_ref = False
    for point in points:
        if not isinstance(point, dict) or not _finite(point.get("round")):
            continue
        gap = point.get("gap")
        if _finite(gap):
            own = True
            series.append((int(point["round"]), float(gap)))
            continue
        gap = _gap_to(point, refs[seed]) if seed in refs else None
        if gap is None:
            series = []
            break
        used_ref = True
        series.append((int(point["round"]), gap))
    return series, own, used_ref


def gap_trajectories(entries: Sequence[tuple[Path, dict]]) -> GapTrajectories:
    """The NoT trajectories of one setting's results, as Avg. Gap to Retrain per round.

    A point's gap is the trajectory's own ``gap`` (Retrain ran earlier in the same job)
    or, when missing, computed here from the Retrain result of the same setting and seed
    (``entries`` are one setting's results, so only the seed is matched here). A
    trajectory with neither is skipped with a note."""
    refs = _retrain_references(entries)
    lines: dict[tuple, GapLine] = {}
    notes: list[str] = []
    from_job = computed = 0
    skipped: list[str] = []
    for path, r in entries:
        if r.get("method") != TRAJECTORY_METHOD:
            continue
        points = (r.get("trajectory") or {}).get(TRAJECTORY_METHOD)
        if not isinstance(points, list) or not points:
            continue
        cfg = r.get("config") or {}
        seed = int(cfg.get("seed", 0))
        series, own, used_ref = _gap_series(points, refs, seed)
        if not series:
            skipped.append(f"`{path}` (seed {seed})")
            continue
        from_job += own and not used_ref
        computed += used_ref
        params = {k: v for k, v in (r.get("params") or {}).items() if k != "perturbation"}
        rest = tuple((f, json.dumps(cfg.get(f), sort_keys=True)) for f in _REST_FIELDS) + (
            ("params", json.dumps(params, sort_keys=True)),)
        key = (perturbation_of(r), layers_of(r), rest)
        line = lines.setdefault(key, GapLine(*key))
        line.series.append((seed, sorted(dict(series).items())))
        line.files.append(path)
    if skipped:
        notes.append(f"{len(skipped)} NoT trajectory(ies) skipped: no `gap` in the trajectory "
                     "and no Retrain result of the same setting and seed under the report's "
                     "root (add method=retrain with eval.trajectory=true or a separate "
                     "method=retrain job): " + ", ".join(skipped) + ".")
        for s in skipped:
            print(f"report: skipping the trajectory of {s}: no gap and no Retrain result "
                  "of the same setting and seed", file=sys.stderr)
    if computed:
        notes.append(f"The gap of {computed} trajectory(ies) was computed here against the "
                     "separate Retrain result of the same setting and seed (final Retain, "
                     "Forget, Test, MIA).")
    ordered = sorted(lines.values(), key=lambda l: (_perturbation_order(l.perturbation),
                                                    l.layers, l.rest))
    return GapTrajectories(lines=ordered, notes=notes, from_job=from_job, computed=computed)
