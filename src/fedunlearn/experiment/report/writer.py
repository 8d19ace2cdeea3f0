"""The report: every results file under a directory -> ``summary.md``/``.csv``, plots,
gap figures and the CKA figure per setting, and the forget-ratio figures."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .aggregation import Group, group_results
from .cka import CKA_FILE, draw_cka
from .constants import REPORT_DIR
from .figure_style import FIGURE_FORMATS, check_formats
from .forgetting import forgetting_report
from .forget_ratio import plot_forget_ratio, ratio_families, ratio_table
from .gap_figures import draw_gap_figures, gap_markdown
from .loading import _key, load_results, setting_of
from .plots import plot_metrics
from .tables import group_markdown, write_csv
from .trajectories import gap_trajectories

@dataclass
class Report:
    out_dir: Path
    groups: list[Group]
    markdown: str
    files: list[Path]


def write_report(root: str | Path, out_dir: str | Path | None = None,
                 formats: str | Sequence[str] = FIGURE_FORMATS) -> Report | None:
    """Write the report for every results file under ``root``; None if there are none.
    Every figure is saved in each of ``formats`` (PNG and PDF by default; SVG allowed)."""
    formats = check_formats(formats)
    root = Path(root)
    results = load_results(root)
    if not results:
        return None
    out = Path(out_dir) if out_dir else (root.parent if root.is_file() else root) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    groups = group_results(results)
    files: list[Path] = []
    sections = [f"# fedunlearn report\n\n{len(results)} results file(s) under `{root}`, "
                f"{len(groups)} setting(s).\n"]
    by_setting: dict[tuple, list[tuple[Path, dict]]] = {}
    for path, r in results:
        by_setting.setdefault(_key(setting_of(r)), []).append((path, r))
    for g in groups:
        gdir = out / g.slug
        gdir.mkdir(parents=True, exist_ok=True)
        pngs = plot_metrics(g, gdir / "metrics.png", formats)
        group_md = group_markdown(g, "#", images=["metrics.png"])
        write_csv(gdir / "summary.csv", [g])
        files += [gdir / "summary.md", gdir / "summary.csv", *pngs]
        sections.append(group_markdown(g, "##", images=[f"{g.slug}/metrics.png"]))
        # Per-round trajectories (eval.trajectory=true): the NoT paper's Figures 4 and 5.
        traj = gap_trajectories(by_setting.get(_key(g.setting), []))
        if traj.lines or traj.notes:
            figures, gap_files = draw_gap_figures(g, traj, gdir, formats)
            group_md += "\n" + gap_markdown(g, traj, figures, "##")
            files += gap_files
            sections.append(gap_markdown(g, traj, figures, "###", prefix=f"{g.slug}/"))
        cka_text, cka_files = draw_cka(g, by_setting.get(_key(g.setting), []), gdir)
        if cka_text:
            image = f"![cka](cka/{CKA_FILE})\n" if cka_files else ""
            group_md += f"\n## CKA to the original model\n\n{cka_text}{image}"
            sections.append(f"### CKA to the original model\n\n{cka_text}"
                            + (f"![cka]({g.slug}/cka/{CKA_FILE})\n" if cka_files else ""))
            files += cka_files
        (gdir / "summary.md").write_text(group_md)
    families = ratio_families(groups)
    for name, members in families:
        fname = "forget_ratio.png" if len(families) == 1 else f"forget_ratio-{name}.png"
        files += plot_forget_ratio(name, members, out / fname, formats)
        sections.append(f"## {name}: forget ratio\n\n{ratio_table(members)}\n![{name}]({fname})\n")
    # The per-example audit over seeds, where the results have outputs.npz beside them.
    audit = forgetting_report(results, out, formats, groups=groups)
    if audit is not None:
        sections.append(audit.section)
        files += audit.files
    markdown = "\n".join(sections)
    (out / "summary.md").write_text(markdown)
    write_csv(out / "summary.csv", groups)
    files = [out / "summary.md", out / "summary.csv"] + files
    return Report(out_dir=out, groups=groups, markdown=markdown, files=files)
