"""The forgetting audit over seeds: KLOM and the per-example attack of every method (the
Original included) against every Retrain reference, with the floor beside each number,
the scalar metrics as mean ± 95% CI over seeds, and the relearn time over seeds where
the jobs measured it (:mod:`.forgetting_relearn`).

Reads the ``outputs.npz`` beside each ``results.json`` (``audit.outputs=true``; the K-seed
layout of ``bench/forgetting_audit.py``), groups them by setting and method as the rest of
the report does (:func:`~.aggregation.group_results`) and runs
:func:`fedunlearn.audit_forgetting` on every point set the outputs carry (:data:`POINT_SETS`:
forget, retain and test points, and the trigger points of a backdoor job). Writes
``forgetting-audit.md``, ``forgetting-audit.json`` and, per setting,
``<setting>/forgetting_klom`` and ``<setting>/forgetting_roc`` (PNG and PDF).
Definitions: ``docs/measuring-forgetting.md``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...harness.outputs import OUTPUTS_FILE
from ...metrics.forgetting import MIN_REFERENCE_MODELS, ForgettingAudit, audit_forgetting
from ...metrics.intervals import mean_ci
from .aggregation import Group, Row, group_results
from .constants import MATCHED_REFERENCE, REFERENCE, REPORT_DIR
from .figure_style import FIGURE_FORMATS, check_formats
from .forgetting_relearn import RelearnSummary, relearn_summary
from .loading import load_results

__all__ = ["AUDIT_JSON", "AUDIT_MD", "MIN_AUDIT_SEEDS", "POINT_SETS", "ForgettingReport",
           "ModelSet", "SettingAudit", "audit_setting", "forgetting_report",
           "reference_name", "write_forgetting_audit"]

MIN_AUDIT_SEEDS = MIN_REFERENCE_MODELS
"""Seeds with per-example outputs a setting needs before it is audited: the floor needs
two disjoint halves of 2 Retrain models, the attack 2 to fit, 1 held out, 1 as the floor."""
AUDIT_MD = "forgetting-audit.md"
AUDIT_JSON = "forgetting-audit.json"
POINT_SETS = ("forget", "retain", "test", "trigger")
"""The point sets an ``outputs.npz`` can carry, in the order they are audited: ``trigger``
(the ASR's samples, stamped) only when the job planted a backdoor. A setting is audited
on the sets all its files carry."""
ORIGINAL = "original"
_REFERENCES = (REFERENCE, MATCHED_REFERENCE)


@dataclass
class ModelSet:
    """K models of one kind (a method's row, or the Original) over K seeds."""

    key: str
    label: str
    seeds: list[int]
    logits: np.ndarray
    metrics: dict[str, list[float]]
    relearn: list[dict | None] = field(default_factory=list)
    """Per seed, ``results.json``'s ``relearn`` record (``None``: not measured)."""

    @property
    def k(self) -> int:
        return len(self.seeds)


@dataclass
class SettingAudit:
    """One setting's audit: every model set against every reference, and the scalars."""

    group: Group
    partition_seed: int | None
    sizes: dict[str, int]
    model_sets: list[ModelSet]
    references: list[ModelSet]
    audits: dict[str, dict[str, ForgettingAudit]]
    scalars: dict[str, dict[str, dict]]
    notes: list[str] = field(default_factory=list)
    relearn: dict[str, RelearnSummary] = field(default_factory=dict)
    """Relearn time over seeds per model set that measured it (``audit.relearn-rounds``)."""

    @property
    def seeds(self) -> list[int]:
        return sorted({s for m in self.model_sets for s in m.seeds})


@dataclass
class ForgettingReport:
    """What :func:`write_forgetting_audit` wrote."""

    out_dir: Path
    settings: list[SettingAudit]
    skipped: list[tuple[str, str]]
    markdown: str
    data: dict
    files: list[Path]
    section: str = ""
    """The same markdown a level lower, for the report's ``summary.md``."""


def reference_name(result: dict) -> str:
    """A Retrain reference as the tables name it, from ``results.json``'s ``reference``:
    ``"Retrain (30 rounds)"`` or ``"Retrain (matched, 41 rounds)"``."""
    ref = result.get("reference") or {}
    cfg = result.get("config") or {}
    budget = ref.get("budget") or (result.get("params") or {}).get("budget", "pretrain")
    rounds = ref.get("rounds")
    if rounds is None:
        rounds = int(cfg.get("pretrain_rounds", 0)) + (
            int(cfg.get("unlearn_rounds", 0)) if budget == "matched" else 0)
    return f"Retrain (matched, {rounds} rounds)" if budget == "matched" \
        else f"Retrain ({rounds} rounds)"


def _seed(result: dict) -> int:
    return int(result.get("seed", (result.get("config") or {}).get("seed", 0)))


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as blob:
        return {key: blob[key] for key in blob.files}


def _split_of(blob: dict[str, np.ndarray], names: Sequence[str]) -> tuple:
    return tuple(blob[f"{name}_{part}"].tobytes() for name in names
                 for part in ("ids", "labels"))


def _stack(blob: dict[str, np.ndarray], prefix: str, names: Sequence[str]) -> np.ndarray:
    return np.concatenate([blob[f"{prefix}_{name}"] for name in names], axis=0)


def _loaded(group: Group, entries: dict[Path, dict], notes: list[str]) -> list[tuple]:
    """Per row, ``(row, [(seed, result, outputs blob)])`` of its results with outputs,
    one per seed."""
    rows = []
    for row in group.rows:
        jobs, seen = [], set()
        for path in row.files:
            npz = path.parent / OUTPUTS_FILE
            if not npz.is_file():
                continue
            result = entries[path]
            seed = _seed(result)
            if seed in seen:
                notes.append(f"{row.label}: seed {seed} appears twice; kept the first, "
                             f"left out {path}")
                continue
            seen.add(seed)
            jobs.append((seed, result, _load(npz)))
        rows.append((row, jobs))
    return rows


def _shared_sets(blobs: list[dict], notes: list[str]) -> tuple[str, ...]:
    """The point sets every blob carries; a note for each set only some carry."""
    have = [{name for name in POINT_SETS if f"{name}_ids" in blob} for blob in blobs]
    shared = tuple(name for name in POINT_SETS if all(name in h for h in have))
    for name in POINT_SETS:
        count = sum(name in h for h in have)
        if 0 < count < len(have):
            notes.append(f"{name} points: only {count} of the {len(have)} outputs.npz "
                         f"files carry them (jobs without a backdoor, or written before "
                         f"{name} points were recorded), so they are not audited; audited "
                         f"the point sets all files share: {', '.join(shared)}")
    return shared


def _row_sets(group: Group, entries: dict[Path, dict], notes: list[str]):
    """(model sets of the rows and the Original, one outputs blob, the data splits, the
    partition seeds, the point sets audited)."""
    rows = _loaded(group, entries, notes)
    blobs = [blob for _, jobs in rows for *_, blob in jobs]
    names = _shared_sets(blobs, notes) if blobs else ()
    sets, original, splits, partitions = [], {}, set(), set()
    for row, jobs in rows:
        seeds, logits, metrics, relearned = [], [], {k: [] for k in group.keys}, []
        for seed, result, blob in jobs:
            splits.add(_split_of(blob, names))
            partitions.add(int(result.get("partition_seed", blob["partition_seed"])))
            seeds.append(seed)
            logits.append(_stack(blob, "model", names))
            relearned.append(result.get("relearn"))
            for k in group.keys:
                metrics[k].append(float(result["unlearned"].get(k, math.nan)))
            if seed not in original:
                original[seed] = (_stack(blob, "original", names),
                                  result.get("original") or {})
        if seeds:
            label = reference_name(entries[row.files[0]]) if row.method in _REFERENCES \
                else row.label
            sets.append(ModelSet(row.method, label, seeds, np.stack(logits), metrics,
                                 relearned))
    if original:
        seeds = sorted(original)
        sets.insert(0, ModelSet(ORIGINAL, "Original", seeds,
                                np.stack([original[s][0] for s in seeds]),
                                {k: [float(original[s][1].get(k, math.nan)) for s in seeds]
                                 for k in group.keys}))
    return sets, (blobs[0] if blobs else None), splits, partitions, names


def _scalars(model_set: ModelSet) -> dict[str, dict]:
    out = {}
    for key, values in model_set.metrics.items():
        finite = [v for v in values if math.isfinite(v)]
        if len(finite) >= 2:
            out[key] = mean_ci(finite).to_dict()
        elif finite:
            out[key] = {"mean": finite[0], "n": 1}
    return out


def audit_setting(group: Group, entries: dict[Path, dict], *,
                  min_seeds: int = MIN_AUDIT_SEEDS, splits: int = 20,
                  seed: int = 0) -> SettingAudit | str | None:
    """The audit of one setting (``entries``: its results by path), the reason it cannot
    be computed (a sentence), or ``None`` when no result of it has outputs."""
    notes: list[str] = []
    sets, blob, data_splits, partitions, names = _row_sets(group, entries, notes)
    if blob is None:
        return None
    if len(data_splits) > 1:
        return (f"the outputs cover different data splits (partition seeds "
                f"{sorted(partitions)}): audit one split per directory")
    seeds = sorted({s for m in sets for s in m.seeds})
    if len(seeds) < min_seeds:
        return (f"outputs.npz from {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); the "
                f"audit needs at least {min_seeds} (KLOM's floor compares two halves of the "
                "Retrain seeds; bench/forgetting_audit.py --seeds 32 writes them)")
    references = [m for m in sets if m.key in _REFERENCES and m.k >= MIN_REFERENCE_MODELS]
    if not references:
        have = {m.label: m.k for m in sets if m.key in _REFERENCES}
        return (f"no Retrain with outputs from at least {MIN_REFERENCE_MODELS} seeds "
                f"(have {have or 'none'}): the audit's reference is Retrain")
    sizes = {name: int(blob[f"{name}_ids"].size) for name in names}
    bounds = np.cumsum([0] + [sizes[name] for name in names])
    positions = {name: np.arange(bounds[i], bounds[i + 1])
                 for i, name in enumerate(names) if sizes[name]}
    labels = np.concatenate([blob[f"{name}_labels"] for name in names])
    audits: dict[str, dict[str, ForgettingAudit]] = {}
    for ref in references:
        audits[ref.label] = {}
        for model_set in sets:
            if model_set is ref:
                continue
            if model_set.k < 2:
                notes.append(f"{model_set.label} against {ref.label}: outputs of "
                             f"{model_set.k} seed, the audit compares at least 2")
                continue
            audits[ref.label][model_set.label] = audit_forgetting(
                model_set.logits, ref.logits, labels, reference=ref.label,
                method=model_set.label, point_sets=positions, splits=splits, seed=seed)
    summaries = {m.label: relearn_summary(m.seeds, m.relearn) for m in sets}
    return SettingAudit(group=group, partition_seed=min(partitions) if partitions else None,
                        sizes=sizes, model_sets=sets, references=references, audits=audits,
                        scalars={m.label: _scalars(m) for m in sets}, notes=notes,
                        relearn={k: v for k, v in summaries.items() if v is not None})


def forgetting_report(results: Sequence[tuple[Path, dict]], out_dir: str | Path,
                      formats: str | Sequence[str] = FIGURE_FORMATS, *,
                      groups: Sequence[Group] | None = None,
                      min_seeds: int = MIN_AUDIT_SEEDS, splits: int = 20,
                      seed: int = 0) -> ForgettingReport | None:
    """The audit of already loaded ``results`` written to ``out_dir``; ``None`` when no
    result has ``outputs.npz`` beside it. ``groups``: the report's grouping of the same
    results (computed when not given), so folders match the rest of the report."""
    from .forgetting_figures import draw_klom, draw_roc
    from .forgetting_tables import audit_json, audit_markdown

    formats = check_formats(formats)
    entries = {Path(p): r for p, r in results}
    groups = list(groups) if groups is not None else group_results(results)
    audited, skipped = [], []
    for g in groups:
        outcome = audit_setting(g, entries, min_seeds=min_seeds, splits=splits, seed=seed)
        if isinstance(outcome, str):
            skipped.append((g.title, outcome))
        elif outcome is not None:
            audited.append(outcome)
    if not audited and not skipped:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    figures: dict[str, list[str]] = {}
    for setting in audited:
        names = []
        for draw, name in ((draw_klom, "forgetting_klom"), (draw_roc, "forgetting_roc")):
            files += draw(setting, out / setting.group.slug / f"{name}.png", formats)
            names.append(f"{setting.group.slug}/{name}.png")
        figures[setting.group.slug] = names
    markdown = audit_markdown(audited, skipped, figures, min_seeds)
    data = audit_json(audited, skipped, min_seeds)
    (out / AUDIT_MD).write_text(markdown)
    (out / AUDIT_JSON).write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    return ForgettingReport(out_dir=out, settings=audited, skipped=skipped, markdown=markdown,
                            data=data, files=[out / AUDIT_MD, out / AUDIT_JSON, *files],
                            section=audit_markdown(audited, skipped, figures, min_seeds, "##"))


def write_forgetting_audit(source: str | Path | Sequence[str | Path],
                           out_dir: str | Path | None = None,
                           formats: str | Sequence[str] = FIGURE_FORMATS, *,
                           min_seeds: int = MIN_AUDIT_SEEDS, splits: int = 20,
                           seed: int = 0) -> ForgettingReport:
    """The forgetting audit of a K-seed directory (``bench/forgetting_audit.py``'s
    ``<out>/<setting>``, or any folder of results) or of a list of result folders.

    Writes ``forgetting-audit.md``, ``forgetting-audit.json`` and the figures to
    ``out_dir`` (default ``<first source>/report``). A setting with outputs from fewer
    than ``min_seeds`` seeds is listed with the reason instead of audited. Raises
    ``ValueError`` when no ``results.json`` under ``source`` has ``outputs.npz`` beside it.
    """
    sources = [source] if isinstance(source, (str, Path)) else list(source)
    if not sources:
        raise ValueError("source must name a directory of results (or a list of them), "
                         "got an empty list")
    results, seen = [], set()
    for item in sources:
        if not Path(item).exists():
            raise ValueError(f"{item} does not exist: give a directory of results.json files")
        for path, r in load_results(item):
            if path.resolve() not in seen:
                seen.add(path.resolve())
                results.append((path, r))
    first = Path(sources[0])
    out = Path(out_dir) if out_dir else (first.parent if first.is_file() else first) / REPORT_DIR
    report = forgetting_report(results, out, formats, min_seeds=min_seeds, splits=splits,
                               seed=seed) if results else None
    if report is None:
        raise ValueError(f"no {OUTPUTS_FILE} beside any of the {len(results)} results.json "
                         f"under {', '.join(map(str, sources))}: run the jobs with "
                         "audit.outputs=true (bench/forgetting_audit.py does)")
    return report
