"""Command line: ``icsk-report PATH... --out DIR [--name NAME] [--figures ...] ...``.

A PATH is a run folder, a sweep folder, or ``wandb:ENTITY/PROJECT[/RUN_ID]`` (runs read through
the wandb API, selected with ``--wandb-group`` / ``--wandb-filters``; metrics only).
"""

from __future__ import annotations

import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")  # the command line only writes files; never needs a display

from ..metrics.drift import MEASURES, REFS  # noqa: E402
from ..store import ROW_MODES  # noqa: E402
from .figures import FIGURE_NAMES  # noqa: E402
from .loading import NoRunsError  # noqa: E402
from .style import paper_bundles  # noqa: E402
from .wandb_source import WandbPath, WandbQuery, WandbSourceError, is_wandb_path  # noqa: E402

EPILOG = f"""figures: {', '.join(FIGURE_NAMES)} (default: every figure whose data exists).
Runs that differ in a config key other than the seed get one time-series figure per setting;
--where optim.lr=0.1 keeps one.

wandb: PATH wandb:ENTITY/PROJECT reads the project's runs through the wandb API (after
`wandb login`), wandb:ENTITY/PROJECT/RUN_ID one run, wandb:PROJECT uses your default entity.
  icsk-report wandb:me/icsk --wandb-group lr_sweep-2026-01-01_10-00-00-000001 --out my_reports
  icsk-report wandb:me/icsk --wandb-filters '{{"config.name": "lr_sweep", "state": "finished"}}'
wandb holds the scalar metrics only: ics, smoothness and sweep work; ioffe, drift_* and
hist_evolution need Recorder statistics, so pass the run folders for those.

Exit codes: 0 ok, 1 no figure built or a figure failed, 2 bad arguments, no runs found, or
wandb unreadable (not logged in, no network, unknown project)."""


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ref(text: str) -> str | int:
    if text.lstrip("-").isdigit():
        return int(text)
    if text not in REFS:
        raise argparse.ArgumentTypeError(f"--ref must be one of {', '.join(REFS)} or a step number, got {text!r}")
    return text


def _where(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise argparse.ArgumentTypeError(f"--where expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _filters(text: str) -> dict:
    try:
        f = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--wandb-filters expects a JSON object, e.g. "
                                         f"'{{\"config.optim.lr\": 0.1}}'; got {text!r} ({e})") from None
    if not isinstance(f, dict):
        raise argparse.ArgumentTypeError(f"--wandb-filters expects a JSON object, got {text!r}")
    return f


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def make_parser() -> argparse.ArgumentParser:
    """The argument parser of icsk-report."""
    p = argparse.ArgumentParser(
        prog="icsk-report",
        description="Turn icsk run folders, Hydra sweep folders or a wandb project into paper figures (PDF + PNG) "
                    "and summary.md.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="run folder(s), sweep folder(s), or wandb:ENTITY/PROJECT[/RUN_ID]")
    p.add_argument("--out", default="my_reports",
                   help="output root; figures go to OUT/NAME/ (default: my_reports; the repository's reports/ holds "
                        "the figures README shows)")
    p.add_argument("--name", default=None, help="report name (default: the runs' config 'name')")
    p.add_argument("--figures", type=_csv, default=None, help=f"comma-separated subset of: {', '.join(FIGURE_NAMES)}")
    p.add_argument("--layer", default=None, help="layer for ioffe/hist_evolution (default: last block*.pre_act)")
    p.add_argument("--unit", type=int, default=None,
                   help="unit for ioffe (default 0) and hist_evolution (default: all units pooled)")
    p.add_argument("--measure", default="w2", choices=MEASURES, help="drift measure (default w2)")
    p.add_argument("--ref", default="previous", type=_ref,
                   help="drift reference: previous, first, last, or a step number (default previous)")
    p.add_argument("--paper", default=None, metavar="BUNDLE",
                   help="tueplots bundle for sizes/fonts, e.g. neurips2024, icml2024 (fonts stay DejaVu, no LaTeX)")
    p.add_argument("--formats", type=_csv, default=["pdf", "png"], help="comma-separated formats (default pdf,png)")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="keep runs whose config KEY equals VALUE (repeatable), e.g. optim.lr=0.1")
    p.add_argument("--arms", type=_csv, default=None, help="comma-separated arms to draw (default all)")
    p.add_argument("--mode", default="train", choices=ROW_MODES,
                   help="which Recorder rows the activation figures use: train (training batches, default), "
                        "probe (the fixed probe batch of recorder.probe_schedule: drift without batch noise) "
                        "or eval")
    w = p.add_argument_group("wandb inputs (PATH wandb:ENTITY/PROJECT)")
    w.add_argument("--wandb-group", default=None, metavar="GROUP",
                   help="only runs of this wandb group (a sweep's group is <name>-<sweep folder name>)")
    w.add_argument("--wandb-filters", type=_filters, default=None, metavar="JSON",
                   help="MongoDB-style filter of wandb.Api().runs, e.g. '{\"config.optim.lr\": 0.1}'")
    w.add_argument("--wandb-max-runs", type=_positive, default=None, metavar="N", help="read at most N runs")
    w.add_argument("--wandb-timeout", type=_positive, default=30, metavar="SECONDS",
                   help="timeout of each wandb API request (default 30)")
    p.add_argument("--quiet", action="store_true", help="print only problems")
    p.add_argument("--debug", action="store_true", help="raise on figure errors (tracebacks)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``icsk-report``; returns the exit code."""
    parser = make_parser()
    args = parser.parse_args(argv)
    from .build import build_report, check_figures

    try:
        figures = check_figures(args.figures) if args.figures is not None else None
    except ValueError as e:
        parser.error(str(e))
    if args.paper and args.paper not in paper_bundles():
        parser.error(f"unknown --paper bundle {args.paper!r}; choose from {', '.join(paper_bundles()) or '(install tueplots)'}")
    try:
        where = _where(args.where)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    ref: str | int = args.ref
    remote = [p for p in args.paths if is_wandb_path(p)]
    try:
        for p in remote:
            WandbPath.parse(p)
    except ValueError as e:
        parser.error(str(e))
    query = WandbQuery(group=args.wandb_group, filters=args.wandb_filters, max_runs=args.wandb_max_runs,
                       timeout=args.wandb_timeout)
    if not remote and (query.api_filters() or query.max_runs):
        parser.error("--wandb-group, --wandb-filters and --wandb-max-runs select runs of a wandb:ENTITY/PROJECT "
                     "input; no PATH starts with wandb:")

    def log(msg: str) -> None:
        if args.quiet and ("wrote" in msg):
            return
        print(msg, file=sys.stderr)

    try:
        report = build_report(args.paths, out=args.out, name=args.name, figures=figures, layer=args.layer,
                              unit=args.unit, measure=args.measure, ref=ref, paper=args.paper, formats=args.formats,
                              where=where, arms=args.arms, mode=args.mode, wandb_query=query, log=log, debug=args.debug)
    except NoRunsError as e:
        print(f"icsk-report: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, WandbSourceError) as e:
        if args.debug:
            raise
        print(f"icsk-report: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"report: {report.out_dir} ({len(report.figures)} figure(s); summary: {report.summary})")
    if report.failed or not report.figures:
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
