"""Results files and comparison tables.

Schema of ``results.json`` (one per method, ``<out>/<method>/results.json``)::

    {
      "method": "not",
      "request": [{"scope": "client", "partition_id": 0, "node_id": ...}, ...],
      "rejected": [{"node_id": ..., "reason": "..."}],
      "original":  {"retain": %, "forget": %, "test": %, "mia": %},
      "unlearned": {"retain": %, "forget": %, "test": %, "mia": %},
      "params": {...},            # the method's parameters, typed
      "cost": {"rounds", "comm_bytes", "bytes_down", "bytes_up", "messages_down",
               "messages_up", "flops", "train_samples", "forward_samples",
               "server_flops", "wall_s", "storage_bytes",
               "phases": {"unlearning": {...same keys}, "recovery": {...}}},
      "config": {...}, "pretrain": {...}, "notes": {...},
      "relearn": {"rounds_max", "rounds", "metric", "target", "tolerance", "curve",
                  "cost"}    # only with audit.relearn-rounds > 0 (.relearn)
    }

A method that cannot serve the job's requests writes ``skipped.json`` (``method``,
``skipped``: the reason, ``request``) instead.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

from ..metrics import METRIC_KEYS, average_gap, deltas
from ..files import FAILED_FILE, write_json  # noqa: F401  (results are written with them)

RESULTS_FILE = "results.json"
SKIPPED_FILE = "skipped.json"
COMPARISON_FILE = "comparison.md"


def result_record(strategy, context, rejected: list[dict], original: dict, unlearned: dict,
                  pretrain_info: dict) -> dict:
    """The ``results.json`` payload of one method."""
    return {
        "method": strategy.name,
        "request": [dict(r.describe(), node_id=n)
                    for n, r in sorted(context.requests.items())],
        "rejected": rejected,
        "original": original,
        "unlearned": unlearned,
        "params": strategy.params.as_dict(),
        "cost": strategy.cost_dict(),
        "pretrain": pretrain_info,
        "notes": strategy.notes,
        "config": context.cfg.to_dict(),
    }


def results_path(output_dir: Path, method: str) -> Path:
    """``<out>/<method>/results.json``: one folder per method, for one method as for a
    list (its ``model.pt``, ``outputs.npz``, ``skipped.json`` or ``failed.json`` beside
    it; ``<out>/comparison.md`` the table of all)."""
    return Path(output_dir) / method / RESULTS_FILE


def metric_keys(results: Sequence[dict]) -> tuple[str, ...]:
    """The accuracy/privacy keys present in every result (``asr`` only when configured)."""
    keys = list(METRIC_KEYS)
    if results and all("asr" in r["unlearned"] for r in results):
        keys.append("asr")
    return tuple(keys)


def _fmt(value: float, digits: int = 2) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def comparison_rows(results: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: each metric (Δ to Retrain when Retrain is present), Avg. Gap, costs."""
    keys = metric_keys(results)
    ref = next((r["unlearned"] for r in results if r["method"] == "retrain"), None)
    header = ["Method"] + [k.capitalize() if k != "mia" else "MIA" for k in keys]
    header = [h if h != "Asr" else "ASR" for h in header]
    if ref is not None:
        header.append("Avg. Gap")
    relearned = any("relearn" in r for r in results)
    if relearned:  # audit.relearn-rounds > 0
        header.append("Relearn")
    header += ["Comm. (B)", "FLOPs", "Rounds", "Wall (s)"]
    stores = any(r["cost"].get("storage_bytes", 0) for r in results)
    if stores:  # a method keeps state between rounds (e.g. MoDE's degradation model)
        header.append("Storage (B)")
    rows = []
    original = results[0]["original"] if results else {}
    rows.append(["original (pretrained)"] + [_fmt(original.get(k)) for k in keys]
                + ([""] if ref is not None else []) + ([""] if relearned else [])
                + [""] * (5 if stores else 4))
    for r in results:
        m = r["unlearned"]
        d = deltas(m, ref, keys) if ref is not None else {}
        cells = []
        for k in keys:
            cell = _fmt(m.get(k))
            if ref is not None and not math.isnan(d.get(k, float("nan"))):
                cell += f" ({abs(d[k]):.2f})"
            cells.append(cell)
        if ref is not None:
            cells.append(_fmt(average_gap(m, ref)))
        if relearned:
            cells.append(relearn_cell(r.get("relearn")))
        c = r["cost"]
        cells += [f"{c['comm_bytes']:.3g}", f"{c['flops']:.3g}", str(c["rounds"]),
                  f"{c['wall_s']:.1f}"]
        if stores:
            cells.append(f"{c.get('storage_bytes', 0):.3g}")
        rows.append([r["method"]] + cells)
    return header, rows


def relearn_cell(record: dict | None) -> str:
    """The comparison's Relearn cell: the rounds until the original's forget accuracy
    (or ASR) came back, ``>N`` when N rounds did not bring it back, ``—`` unmeasured."""
    if not record or record.get("unmeasured"):
        return "—"
    rounds = record.get("rounds")
    return f">{record['rounds_max']}" if rounds is None else str(rounds)


def is_centralized(results: Sequence[dict]) -> bool:
    """Whether the results come from a federation of one client holding all training
    data: the centralized setting (the NoT paper's Table 2)."""
    return bool(results) and all(int((r.get("config") or {}).get("num_clients", 0)) == 1
                                 for r in results)


CENTRALIZED_NOTE = ("Centralized setting: one client holds all training data; Comm. is the "
                    "measured traffic of that client (the model down and up each round).")


def _skipped_lines(skipped: dict[str, str] | None) -> list[str]:
    return [f"{method}: refused ({reason})" for method, reason in (skipped or {}).items()]


def comparison_markdown(results: Sequence[dict], skipped: dict[str, str] | None = None) -> str:
    header, rows = comparison_rows(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    ref = any(r["method"] == "retrain" for r in results)
    note = ("Values in %; (x) = |Δ| to Retrain; Avg. Gap = mean |Δ| over Retain, Forget, "
            "Test, MIA." if ref else
            "Values in %. Add `retrain` to the method list to get Δ and Avg. Gap.")
    relearn = next((r["relearn"] for r in results if "relearn" in r), None)
    if relearn is not None:
        metric = "ASR" if relearn["metric"] == "asr" else "forget accuracy"
        tolerance = relearn["tolerance"]
        within = (f" within {tolerance:g} point{'' if tolerance == 1 else 's'}"
                  if tolerance else "")
        note += (f" Relearn = rounds of federated training with the forget data until "
                 f"{metric} is back at the original's{within} (>N: not within N rounds"
                 + ("; Retrain's is the reference)." if ref else ")."))
    if is_centralized(results):
        note += " " + CENTRALIZED_NOTE
    extra = "".join(f"\n- {line}" for line in _skipped_lines(skipped))
    return "\n".join(lines) + "\n\n" + note + "\n" + (extra[1:] + "\n" if extra else "")


#: The console's narrower names for the comparison's headers and its first row (the
#: numbers are the same); a legend under the table spells them out.
SHORT_HEADERS = {"Avg. Gap": "Gap", "Comm. (B)": "Comm. B", "Wall (s)": "Wall s",
                 "Storage (B)": "Stored B", "original (pretrained)": "original"}
#: The console's closing table fits this many columns (wider: the costs go below).
TEXT_WIDTH = 100


def comparison_text(results: Sequence[dict], title: str = "fedunlearn results",
                    skipped: dict[str, str] | None = None) -> str:
    """The comparison as plain-text tables for logs and terminals, each at most
    :data:`TEXT_WIDTH` columns: the metrics and the costs side by side when they fit,
    else the costs in a second table; the centralized setting says so in the title."""
    if is_centralized(results):
        title += " (centralized: one client holds all training data)"
    header, rows = comparison_rows(results)
    header = [SHORT_HEADERS.get(h, h) for h in header]
    rows = [[SHORT_HEADERS.get(row[0], row[0])] + row[1:] for row in rows]
    tables = [_text_table(header, rows)]
    if max(map(len, tables[0].splitlines())) > TEXT_WIDTH:
        split = header.index("Comm. B")
        tables = [_text_table(header[:split], [r[:split] for r in rows]),
                  _text_table(header[:1] + header[split:],
                              [r[:1] + r[split:] for r in rows[1:]])]  # no costs: original
    legend = ("(x): |Δ| to Retrain; Gap: Avg. Gap, the mean |Δ| over Retain, Forget, Test, "
              "MIA; original: the pretrained model" if "Gap" in header else
              "original: the pretrained model; add retrain for Δ and Avg. Gap")
    if "Relearn" in header:
        legend += ("; Relearn: rounds of training with the forget data until the "
                   "original's forget accuracy (ASR) is back (>N: not within N)")
    lines = [title[:TEXT_WIDTH]] + [line for t in tables for line in t.splitlines()]
    lines += [w for line in [legend, *_skipped_lines(skipped)] for w in _wrap(line)]
    return "\n".join(lines) + "\n"


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for h in header:
        table.add_column(h, justify="left" if h == "Method" else "right")
    for row in rows:
        table.add_row(*row)
    buf = io.StringIO()
    Console(file=buf, width=240, force_terminal=False, color_system=None).print(table)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines() if line.strip())


def _wrap(text: str) -> list[str]:
    import textwrap

    return textwrap.wrap(text, TEXT_WIDTH)
