"""Figures and summaries from icsk run folders: ``build_report(paths, out=...)`` or ``icsk-report``.

``report`` reads run folders through :mod:`icsk.store` (and the metrics of wandb runs,
``wandb:ENTITY/PROJECT``, through :mod:`.wandb_source`), computes drift with
:mod:`icsk.metrics.drift`, and never trains. The library does not pick a matplotlib backend
(figures show inline in notebooks); the command line uses Agg.
"""

from .build import Report, build_report, save_figure
from .figures import (
    FIGURE_NAMES,
    FIGURES,
    MissingDataError,
    drift_frame,
    fig_drift_curves,
    fig_drift_heatmap,
    fig_hist_evolution,
    fig_ics,
    fig_ioffe,
    fig_smoothness,
    fig_sweep,
    final_metrics,
)
from .loading import NoRunsError, Run, RunSet, collect_runs, find_run_dirs, is_run_dir
from .style import ARM_PALETTE, arm_color, report_style, style_context
from .wandb_source import WandbQuery, WandbRun, WandbSourceError, history_to_metrics

__all__ = [
    "ARM_PALETTE",
    "FIGURES",
    "FIGURE_NAMES",
    "MissingDataError",
    "NoRunsError",
    "Report",
    "Run",
    "RunSet",
    "WandbQuery",
    "WandbRun",
    "WandbSourceError",
    "arm_color",
    "build_report",
    "collect_runs",
    "drift_frame",
    "fig_drift_curves",
    "fig_drift_heatmap",
    "fig_hist_evolution",
    "fig_ics",
    "fig_ioffe",
    "fig_smoothness",
    "fig_sweep",
    "final_metrics",
    "find_run_dirs",
    "history_to_metrics",
    "is_run_dir",
    "report_style",
    "save_figure",
    "style_context",
]
