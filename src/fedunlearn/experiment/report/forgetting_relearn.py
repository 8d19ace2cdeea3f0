"""Relearn time over seeds: each model set's ``results.json`` ``relearn`` records
(``audit.relearn-rounds``), summarised for the forgetting audit's report.

A seed whose relearn rounds did not bring the metric back is *censored* at the rounds
played (``>N``): its time is unknown beyond "more than N". So the summary gives the share
of seeds relearned within ``N``, the median (itself ``>N`` when half the seeds or more
are censored), the range, and a mean ± 95% CI only when every seed relearned (a mean
over the relearned seeds alone would favour the methods that hide their forgetting
worst). Retrain's row is the reference: a method that relearns as slowly as Retrain
forgot as well as retraining, by this measure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...metrics.intervals import mean_ci

__all__ = ["RelearnSummary", "relearn_rows", "relearn_summary", "relearn_table"]

METRIC_NAMES = {"forget": "forget accuracy", "asr": "ASR"}


@dataclass(frozen=True)
class RelearnSummary:
    """One model set's relearn time over the seeds where it was measured."""

    metric: str
    seeds: list[int]
    rounds: list[int | None]
    """Per seed, the rounds until relearned; ``None``: not within ``rounds_max``."""
    rounds_max: int

    @property
    def k(self) -> int:
        return len(self.seeds)

    @property
    def relearned(self) -> int:
        return sum(r is not None for r in self.rounds)

    @property
    def median(self) -> float:
        """The median over seeds, censored seeds counted as infinite (``inf``: half the
        seeds or more did not relearn within ``rounds_max``)."""
        return float(np.median([math.inf if r is None else r for r in self.rounds]))

    def mean(self) -> dict | None:
        """Mean ± 95% CI over seeds, only when every seed relearned (2 seeds or more)."""
        if self.relearned < self.k or self.k < 2:
            return None
        return mean_ci([float(r) for r in self.rounds]).to_dict()

    def to_dict(self) -> dict:
        return {"metric": self.metric, "seeds": self.seeds, "rounds": self.rounds,
                "rounds_max": self.rounds_max, "relearned": self.relearned,
                "median": None if math.isinf(self.median) else self.median,
                "mean": self.mean()}


def relearn_summary(seeds: Sequence[int], records: Sequence[dict | None]
                    ) -> RelearnSummary | None:
    """The summary of one model set's ``relearn`` records (one per seed, ``None`` where
    the job did not measure it); ``None`` when no seed has a measured record."""
    kept = [(s, r) for s, r in zip(seeds, records) if r and not r.get("unmeasured")]
    if not kept:
        return None
    metrics = {r["metric"] for _, r in kept}
    if len(metrics) > 1:
        raise ValueError(f"relearn records measure different metrics {sorted(metrics)}: "
                         "one setting's seeds must relearn the same metric")
    return RelearnSummary(metric=metrics.pop(), seeds=[int(s) for s, _ in kept],
                          rounds=[None if r.get("rounds") is None else int(r["rounds"])
                                  for _, r in kept],
                          rounds_max=max(int(r["rounds_max"]) for _, r in kept))


def _median_cell(s: RelearnSummary) -> str:
    m = s.median
    return f">{s.rounds_max}" if math.isinf(m) else f"{m:g}"


def _range_cell(s: RelearnSummary) -> str:
    values = [r for r in s.rounds if r is not None]
    top = f">{s.rounds_max}" if s.relearned < s.k else str(max(values))
    return f"{min(values)}–{top}" if values else top


def relearn_rows(summaries: dict[str, RelearnSummary]) -> list[list[str]]:
    """Per model set: label, K, relearned within N, median, range, mean ± 95% CI."""
    rows = []
    for label, s in summaries.items():
        mean = s.mean()
        rows.append([label, str(s.k), f"{s.relearned}/{s.k} within {s.rounds_max}",
                     _median_cell(s), _range_cell(s),
                     f"{mean['mean']:.2f} ± {mean['half_width']:.2f}" if mean else "—"])
    return rows


def relearn_table(summaries: dict[str, RelearnSummary]) -> str:
    """The Markdown table of :func:`relearn_rows` under a header naming the metric."""
    metric = next(iter(summaries.values())).metric
    lines = ["| Models | K | relearned | median rounds | range | mean ± 95% CI |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(row) + " |" for row in relearn_rows(summaries)]
    return (f"Rounds of federated training, the forget data included, until "
            f"{METRIC_NAMES.get(metric, metric)} is back at the original model's (per "
            f"seed: that seed's original):\n\n" + "\n".join(lines)
            + "\n\n`>N`: not within the N rounds played (censored); the mean is given only "
              "when every seed relearned. Retrain's row is the reference.")
