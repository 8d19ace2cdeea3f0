"""What every report figure shares: the file formats it is saved in, units for bytes and
FLOPs, the seed-count caption, y-limits zoomed to the data, readable setting titles."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

FIGURE_FORMATS = ("png", "pdf")
"""The formats a report figure is saved in by default: PNG (shown by ``summary.md``) and
PDF beside it (vector, for a paper)."""
ALLOWED_FORMATS = ("png", "pdf", "svg")
PNG_DPI = 200

_PREFIXES = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""))
UNITS = {"bytes": "B", "flops": "FLOPs"}


def check_formats(formats: str | Iterable[str]) -> tuple[str, ...]:
    """The figure formats as a tuple (``"png,pdf"`` or a sequence); ``ValueError`` naming
    a format that is not one of :data:`ALLOWED_FORMATS`, or a list without ``png``."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    out: list[str] = []
    for item in items:
        fmt = str(item).strip().lower().lstrip(".")
        if fmt not in ALLOWED_FORMATS:
            raise ValueError(f"figure format {item!r} is not supported; allowed: "
                             f"{', '.join(ALLOWED_FORMATS)}")
        if fmt not in out:
            out.append(fmt)
    if "png" not in out:
        raise ValueError(f"figure formats {','.join(out) or '(none)'} lack png: the report's "
                         "summary.md shows the PNG (add png, e.g. png,pdf)")
    return tuple(out)


def save_figure(fig: Any, path: Path, formats: Sequence[str] = FIGURE_FORMATS) -> list[Path]:
    """Save ``fig`` as ``path`` with each format's suffix (PNG first); the files written.
    No creation date is embedded, so the same report gives the same PDF and SVG."""
    formats = check_formats(formats)
    path.parent.mkdir(parents=True, exist_ok=True)
    files = []
    for fmt in sorted(formats, key=lambda f: f != "png"):
        out = path.with_suffix(f".{fmt}")
        metadata = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}.get(fmt)
        fig.savefig(out, format=fmt, dpi=PNG_DPI, metadata=metadata)
        files.append(out)
    return files


def unit_scale(values: Iterable[float], kind: str) -> tuple[float, str]:
    """``(scale, unit)`` for an axis of ``kind`` ``"bytes"`` or ``"flops"``: the largest
    SI prefix (powers of 1000: kB, MB, GB; MFLOPs, GFLOPs, TFLOPs) under the largest
    value, so the tick labels are plain numbers (no ``1e8`` offset)."""
    base = UNITS[kind]
    finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
    top = max(finite, default=0.0)
    for scale, prefix in _PREFIXES:
        if top >= scale:
            return scale, prefix + base
    return 1.0, base


def seed_caption(counts: Iterable[int]) -> str:
    """``"mean ± std over 3 seeds"``; one seed says that it has no error bars."""
    ns = sorted({n for n in counts if n > 0})
    if not ns:
        return "no complete seed"
    text = str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
    if ns[-1] <= 1:
        return "1 seed (no error bars)"
    return f"mean ± std over {text} seeds"


def zoom_limits(lows: Iterable[float], highs: Iterable[float],
                min_span: float = 0.5, pad: float = 0.15) -> tuple[float, float]:
    """y-limits around the data (``lows``/``highs``: the ends of every bar or error bar),
    padded by ``pad`` of the span, at least ``min_span`` wide; ``(0, 1)`` without data."""
    lo = [v for v in lows if math.isfinite(v)]
    hi = [v for v in highs if math.isfinite(v)]
    if not lo or not hi:
        return 0.0, 1.0
    bottom, top = min(lo), max(hi)
    span = max(top - bottom, min_span)
    middle = (top + bottom) / 2
    return middle - span * (0.5 + pad), middle + span * (0.5 + pad)


def plain_numbers(ax: Any) -> None:
    """Plain tick labels on the y axis: no offset (``+9.5e1``), no ``1e8`` multiplier."""
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)


def family_title(setting: dict) -> str:
    """A readable title for settings that differ only in the forget ratio."""
    s = setting
    title = f"{s['dataset']} / {s['model']} / {s['scope']}-wise"
    if s.get("classes"):
        title += f", classes {s['classes']}"
    if s["partitioning"] == "iid":
        return title + ", IID"
    alpha = s.get("alpha")
    return title + f", {s['partitioning']}" + (f" α={alpha}" if alpha is not None else "")
