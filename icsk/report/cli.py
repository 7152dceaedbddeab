"""Command line: ``icsk-report PATH... --out DIR [--name NAME] [--figures ...] ...``."""

from __future__ import annotations

import argparse
import sys

import matplotlib

matplotlib.use("Agg")  # the command line only writes files; never needs a display

from ..metrics.drift import MEASURES, REFS  # noqa: E402
from .figures import FIGURE_NAMES  # noqa: E402
from .loading import NoRunsError  # noqa: E402
from .style import paper_bundles  # noqa: E402

EPILOG = f"""figures: {', '.join(FIGURE_NAMES)} (default: every figure whose data exists).
Runs that differ in a config key other than the seed get one time-series figure per setting;
--where optim.lr=0.1 keeps one. Exit codes: 0 ok, 1 no figure built or a figure failed,
2 bad arguments or no runs found."""


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


def make_parser() -> argparse.ArgumentParser:
    """The argument parser of icsk-report."""
    p = argparse.ArgumentParser(
        prog="icsk-report",
        description="Turn icsk run folders or Hydra sweep folders into paper figures (PDF + PNG) and summary.md.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="run folder(s) or sweep folder(s)")
    p.add_argument("--out", default="reports", help="output root; figures go to OUT/NAME/ (default: reports)")
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

    def log(msg: str) -> None:
        if args.quiet and ("wrote" in msg):
            return
        print(msg, file=sys.stderr)

    try:
        report = build_report(args.paths, out=args.out, name=args.name, figures=figures, layer=args.layer,
                              unit=args.unit, measure=args.measure, ref=ref, paper=args.paper, formats=args.formats,
                              where=where, arms=args.arms, log=log, debug=args.debug)
    except NoRunsError as e:
        print(f"icsk-report: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
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
