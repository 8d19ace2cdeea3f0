"""``fedunlearn-report <dir>``: the NoT paper's tables and plots from results files.

Reads every ``results.json`` under a directory (recursively: a sweep dir, a job dir, or
several sweeps), groups them by setting and writes to ``<dir>/report`` (or ``--out``):

* ``summary.md`` / ``summary.csv``: all settings; and per setting
  ``<setting>/summary.md``, ``<setting>/summary.csv``: one row per method with Retain,
  Forget, Test, MIA (and ASR when every result of the setting has it) as mean ± std over
  seeds with ``(|Δ|)`` to Retrain, the Average Gap, communication bytes and FLOPs, the
  lowest Average Gap among non-Retrain methods marked with ★ (the layout of the paper's
  Table 1);
* ``<setting>/metrics.png`` (and ``.pdf``): the metrics as method − Retrain in percentage
  points (absolute, on zoomed axes, without Retrain), the Avg. Gap, communication and
  computation with units (MB, GFLOPs), error bars = std over seeds, the seed count in the
  title (the paper's Figure 1); every figure is saved as PNG and PDF (``--formats``
  adds SVG);
* ``forget_ratio.png`` when settings differ only in the forget ratio (number of target
  clients): Average Gap and communication per method against the ratio (Figure 6);
* when NoT results carry per-round trajectories (``eval.trajectory=true``):
  ``<setting>/gap_by_perturbation.png`` (Figure 4: Avg. Gap to Retrain against rounds,
  one line per perturbation at the layer selection with the most perturbations) and
  ``<setting>/gap_by_layer.png`` (Figure 5: one line per perturbed layer selection at
  the perturbation with the most selections, negate on ties), mean ± std over seeds
  (shaded), their numbers (round 0, a few rounds, the end) in the summaries and per
  round in ``<setting>/gap_trajectory.csv``.
* ``forgetting-audit.md`` / ``.json``, ``<setting>/forgetting_klom.png`` and
  ``<setting>/forgetting_roc.png`` when results carry per-example outputs
  (``audit.outputs=true``) from at least 4 seeds (fewer: the reason, in the summary). A point without ``gap`` (Retrain ran in
  another job, as in a sweep) gets it here from the Retrain result of the same setting
  and seed; a trajectory with neither is skipped with a note.

Definitions (every number is recomputed from the results files):

* mean and std over the results files of a row (normally one per seed); std is the
  *sample* standard deviation (ddof=1), 0 for a single file; NaN values are skipped;
* Δ = |mean(method) − mean(Retrain)| per metric, Retrain of the same setting;
* Avg. Gap = :func:`fedunlearn.metrics.average_gap` of the method's means against
  Retrain's means: the mean of |Δ| over Retain, Forget, Test and MIA (not ASR);
* Comm. = total bytes sent to and from clients in the unlearning step, recovery and
  recovery's validation
  (``cost.comm_bytes``), Comp. = its FLOPs (``cost.flops``), both means over seeds.

A setting without Retrain results gets empty Δ and Avg. Gap columns and a note.

A setting is: dataset, model, forget scope, target clients (their number gives the forget
ratio), forgotten classes (class-wise), forgotten fraction (instance-wise),
partitioning, a planted backdoor, and the pretraining protocol (rounds, lr, batch size,
...), since all of these change the Retrain reference. Within a setting a row is a method; results of the
same method that differ in method settings (``unlearn_*``, ``negate_*``) get one row
each, labelled with the differing values.

The package, by concern (every name is re-exported here):

* :mod:`.constants`: the report's folder, display names, the fields of a setting and of a
  row, the table notes;
* :mod:`.loading`: :func:`load_results`, :func:`setting_of`;
* :mod:`.aggregation`: :class:`Row`, :class:`Group`, :func:`build_rows`,
  :func:`group_results` (mean ± std, Δ, Avg. Gap, ★; titles and folder names);
* :mod:`.tables`: ``summary.md`` tables and ``summary.csv``;
* :mod:`.figure_style`: figure formats and saving, units, seed captions, zoomed limits;
* :mod:`.plots`: ``metrics.png``;
* :mod:`.forget_ratio`: ``forget_ratio.png`` and its table;
* :mod:`.trajectories`: NoT's Avg. Gap to Retrain per round (:func:`gap_trajectories`);
* :mod:`.gap_figures`: ``gap_by_perturbation.png``, ``gap_by_layer.png``,
  ``gap_trajectory.csv`` and their markdown;
* :mod:`.cka`: the CKA figure;
* :mod:`.forgetting`: :func:`write_forgetting_audit`, the per-example audit over seeds
  (KLOM and the attack against each Retrain reference, with floors; scalars as mean ±
  95% CI) where results have ``outputs.npz``; :mod:`.forgetting_tables` and
  :mod:`.forgetting_figures` its markdown/JSON and figures;
* :mod:`.writer`: :func:`write_report`, the whole report;
* :mod:`.cli`: :func:`main`, ``fedunlearn-report`` (``python -m fedunlearn.experiment.report``).
"""

from .aggregation import Group, Row, build_rows, display_name, group_results, mean_std, method_order
from .cka import CKA_FILE, cka_models, draw_cka
from .cli import main
from .constants import (BEST_MARK, COST_KEYS, DISPLAY, LABELS, METHOD_FIELDS, NO_RETRAIN_NOTE,
                        PROTOCOL_FIELDS, REFERENCE, REPORT_DIR, STD_NOTE)
from .figure_style import (ALLOWED_FORMATS, FIGURE_FORMATS, check_formats, save_figure,
                           seed_caption, unit_scale, zoom_limits)
from .forgetting import (AUDIT_JSON, AUDIT_MD, MIN_AUDIT_SEEDS, ForgettingReport,
                         forgetting_report, reference_name, write_forgetting_audit)
from .forget_ratio import forget_ratio_figure, plot_forget_ratio, ratio_families, ratio_table
from .gap_figures import (GAP_FIGURES, draw_gap_figures, gap_figure_lines, gap_markdown, gap_table,
                          plot_gap, write_gap_csv)
from .loading import load_results, setting_of
from .plots import metrics_figure, plot_metrics
from .tables import CSV_SETTING, csv_header, csv_rows, group_markdown, table_markdown, write_csv
from .trajectories import (GAP_NOTE, PERTURBATION_ORDER, TRAJECTORY_METHOD, GapLine,
                           GapTrajectories, gap_trajectories, layers_of, perturbation_of)
from .writer import Report, write_report

__all__ = [
    "ALLOWED_FORMATS", "FIGURE_FORMATS", "check_formats", "forget_ratio_figure",
    "metrics_figure", "save_figure", "seed_caption", "unit_scale", "zoom_limits",
    "BEST_MARK", "CKA_FILE", "COST_KEYS", "CSV_SETTING", "DISPLAY", "GAP_FIGURES", "GAP_NOTE",
    "LABELS", "METHOD_FIELDS", "NO_RETRAIN_NOTE", "PERTURBATION_ORDER", "PROTOCOL_FIELDS",
    "REFERENCE", "REPORT_DIR", "STD_NOTE", "TRAJECTORY_METHOD",
    "GapLine", "GapTrajectories", "Group", "Report", "Row",
    "build_rows", "cka_models", "csv_header", "csv_rows", "display_name", "draw_cka",
    "draw_gap_figures", "gap_figure_lines", "gap_markdown", "gap_table", "gap_trajectories",
    "group_markdown", "group_results", "layers_of", "load_results", "main", "mean_std",
    "method_order", "perturbation_of", "plot_forget_ratio", "plot_gap", "plot_metrics",
    "ratio_families", "ratio_table", "setting_of", "table_markdown", "write_csv",
    "write_gap_csv", "write_report",
    "AUDIT_JSON", "AUDIT_MD", "MIN_AUDIT_SEEDS", "ForgettingReport", "forgetting_report",
    "reference_name", "write_forgetting_audit",
]
