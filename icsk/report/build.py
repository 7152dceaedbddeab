"""Build a report: run folders, sweep folders or wandb projects -> figures (PDF + PNG) + summary.md
in ``<out>/<name>/``."""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .figures import (FIGURE_NAMES, FIGURES, RECORDER_FIGURES, MissingDataError, config_text, drift_frame,
                      hist_density, ioffe_spread, seeds_per_arm)
from .loading import NoRunsError, RunSet, collect_runs
from .style import arm_label, paper_bundles, report_style
from .summary import BuiltFigure, sort_arms, summary_markdown
from .wandb_source import WandbQuery, WandbRun, is_wandb_path

PER_GROUP = {"ioffe", "drift_heatmap", "drift_curves", "ics", "smoothness", "hist_evolution"}
DEFAULT_FORMATS = ("pdf", "png")
PNG_DPI = 200


@dataclass
class Report:
    """What a build produced: folder, saved figures, skipped/failed figure kinds, summary path."""

    out_dir: Path
    name: str
    figures: list[BuiltFigure] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    summary: Path | None = None

    @property
    def files(self) -> list[Path]:
        """Every figure file written."""
        return [f for b in self.figures for f in b.files]


def slug(text: str) -> str:
    """A file-name-safe version of ``text``."""
    s = re.sub(r"[^A-Za-z0-9._=+-]+", "_", str(text)).strip("_")
    return s or "report"


def check_figures(names: Iterable[str] | None) -> list[str]:
    """Validate figure names (ValueError listing the valid ones); None -> all."""
    if names is None:
        return list(FIGURE_NAMES)
    names = [n.strip() for n in names if n.strip()]
    bad = [n for n in names if n not in FIGURES]
    if bad:
        raise ValueError(f"unknown figure(s) {bad}; valid names: {', '.join(FIGURE_NAMES)}")
    return list(dict.fromkeys(names))


def check_formats(formats: Iterable[str]) -> list[str]:
    """Validate output formats against what matplotlib can write."""
    formats = [f.strip().lower().lstrip(".") for f in formats if f.strip()]
    ok = set(Figure().canvas.get_supported_filetypes())
    bad = [f for f in formats if f not in ok]
    if bad or not formats:
        raise ValueError(f"unknown format(s) {bad or formats}; choose from {', '.join(sorted(ok))}")
    return formats


def save_figure(fig: Figure, stem: Path, formats: Sequence[str] = DEFAULT_FORMATS) -> list[Path]:
    """Save ``fig`` as ``stem.<fmt>`` for each format (PDF stays vector; PNG at 200 dpi)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        p = stem.with_name(f"{stem.name}.{fmt}")
        fig.savefig(p, format=fmt, dpi=PNG_DPI if fmt not in ("pdf", "svg", "eps", "ps") else "figure")
        out.append(p)
    return out


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def build_report(
    inputs: RunSet | str | Path | Iterable[str | Path],
    out: str | Path = "my_reports",
    name: str | None = None,
    figures: Iterable[str] | None = None,
    *,
    layer: str | None = None,
    unit: int | None = None,
    measure: str = "w2",
    ref: str | int = "previous",
    paper: str | None = None,
    formats: Iterable[str] = DEFAULT_FORMATS,
    where: dict[str, str] | None = None,
    arms: Sequence[str] | None = None,
    mode: str = "train",
    max_groups: int = 8,
    wandb_query: WandbQuery | None = None,
    log: Callable[[str], None] = _stderr,
    debug: bool = False,
) -> Report:
    """Turn run/sweep folders or ``wandb:ENTITY/PROJECT`` inputs into ``<out>/<name>/`` figures and
    ``summary.md`` (``wandb_query`` selects a project's runs, see :mod:`.wandb_source`). ``mode``
    picks the Recorder rows of the activation figures: 'train', 'probe' (the fixed probe batch) or 'eval'.

    ``figures=None`` builds every kind whose data exists; kinds whose data is missing are
    skipped with a message (via ``log``) naming what is missing. Runs differing in a config key
    other than the seed are drawn as separate time-series figures per setting (``--where`` picks
    one); the ``sweep`` figure uses all runs. Raises NoRunsError (no runs), ValueError (bad
    figure names, formats, paper bundle or wandb path) and WandbSourceError (wandb unreadable)."""
    kinds = check_figures(figures)
    explicit = figures is not None
    formats = check_formats(formats)
    if paper and paper not in paper_bundles():
        raise ValueError(f"unknown paper bundle {paper!r}; choose from {', '.join(paper_bundles()) or '(install tueplots)'}")
    if isinstance(inputs, RunSet):
        runs, sources = inputs, [str(r.path) for r in inputs if r.path is not None]
    else:
        sources = [str(inputs)] if isinstance(inputs, (str, Path)) else [str(p) for p in inputs]
        runs = collect_runs(sources, wandb_query)
    folders = [Path(p) for p in sources if not is_wandb_path(p)]
    if where:
        known = sorted({k for r in runs for k in r.config})
        missing = [k for k in where if k not in known]
        if missing:
            near = {k: difflib.get_close_matches(k, known, n=3, cutoff=0.5) for k in missing}
            raise NoRunsError(f"--where key(s) {missing} are in no run's config (closest: {near}); "
                              f"keys look like {known[:8]}")
        every = runs
        runs = runs.where(where)
        if not len(runs):
            have = {k: sorted({config_text(r.config.get(k)) for r in every}) for k in where}
            raise NoRunsError(f"no run matches {' '.join(f'{k}={v}' for k, v in where.items())} in "
                              f"{', '.join(sources)}; the runs have " + "; ".join(f"{k}: {', '.join(v)}"
                                                                                for k, v in have.items()))
    if arms:
        known = sorted({a for r in runs for a in r.arms})
        unknown = [a for a in arms if a not in known]
        if unknown:
            raise NoRunsError(f"--arms {','.join(unknown)}: no such arm in these runs; their arms: {', '.join(known)}")
        runs = runs.only_arms(list(arms))
    runs = runs.in_mode(mode)
    if mode != "train" and runs.stats(stats=["count"]).empty:
        how = {"probe": "record a fixed probe batch with recorder.probe_schedule=N (and data.probe_size), or "
                        "Recorder.probe() around its forward",
               "eval": "record eval-mode forwards with Recorder(..., modes=('train', 'eval'))"}[mode]
        raise NoRunsError(f"--mode {mode}: no run has {mode} rows in its statistics; {how}")
    name = name or runs.name or (Path(sources[0]).name if sources else "report")
    out_dir = Path(out) / slug(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = Report(out_dir=out_dir, name=name)

    groups = runs.groups()
    if len(groups) > max_groups:
        log(f"icsk-report: {len(groups)} settings ({', '.join(runs.swept_keys())}) vary across runs; drawing "
            f"time-series figures for the first {max_groups} only (use --where KEY=VALUE to choose)")
        groups = groups[:max_groups]
    multi = len(groups) > 1
    drift_cache: dict[int, pd.DataFrame | MissingDataError] = {}
    extra: dict[str, pd.DataFrame] = {}

    def drift_of(rs: RunSet) -> pd.DataFrame:
        key = id(rs)
        if key not in drift_cache:
            try:
                drift_cache[key] = drift_frame(rs, measure, ref)
            except MissingDataError as e:
                drift_cache[key] = e
        d = drift_cache[key]
        if isinstance(d, MissingDataError):
            raise d
        return d

    for kind in kinds:
        targets = [(runs, "")] if kind not in PER_GROUP or not multi else [(g, g.label) for g in groups]
        reasons: list[str] = []
        for rs, label in targets:
            try:
                with report_style(paper):
                    fig = _make(kind, rs, layer=layer, unit=unit, measure=measure, ref=ref, drift_of=drift_of)
                    stem = out_dir / (kind if not label else f"{kind}--{slug(label)}")
                    files = save_figure(fig, stem, formats)
                seeds = _seeds_of(kind, rs)
                built = BuiltFigure(kind=kind, files=files, group=label, seeds=seeds)
                _key_numbers(kind, rs, fig, label, extra, measure, drift_of)
                plt.close(fig)
                report.figures.append(built)
                log(f"icsk-report: wrote {', '.join(str(f) for f in files)}")
            except MissingDataError as e:
                plt.close("all")
                msg = str(e)
                if kind in RECORDER_FIGURES and any(isinstance(r, WandbRun) for r in rs):
                    msg += ("; runs read from wandb carry scalar metrics only: pass their run folders for "
                            "Recorder statistics")
                if msg not in reasons:
                    reasons.append(msg)
            except Exception as e:
                plt.close("all")
                if debug:
                    raise
                report.failed[kind] = f"{type(e).__name__}: {e}"
                log(f"icsk-report: figure '{kind}' failed{f' ({label})' if label else ''}: {type(e).__name__}: {e} "
                    "(run with --debug for the traceback)")
        if reasons and not any(b.kind == kind for b in report.figures):
            report.skipped[kind] = "; ".join(reasons)
            if explicit:
                log(f"icsk-report: figure '{kind}' skipped: {report.skipped[kind]}")
            else:
                log(f"icsk-report: figure '{kind}' skipped (no data): {report.skipped[kind]}")
        elif reasons:
            log(f"icsk-report: figure '{kind}' skipped for some settings: {'; '.join(reasons)}")

    text = summary_markdown(name, runs, report.figures, report.skipped | {k: f"failed: {v}" for k, v in
                                                                          report.failed.items()},
                            out_dir, extra=extra, inputs=folders)
    report.summary = out_dir / "summary.md"
    report.summary.write_text(text)
    log(f"icsk-report: wrote {report.summary}")
    return report


def _make(kind: str, rs: RunSet, *, layer, unit, measure, ref, drift_of) -> Figure:
    fn = FIGURES[kind]
    if kind == "ioffe":
        return fn(rs, layer=layer, unit=unit)
    if kind == "hist_evolution":
        return fn(rs, layer=layer, unit=unit)
    if kind in ("drift_heatmap", "drift_curves"):
        return fn(rs, measure=measure, ref=ref, drift=drift_of(rs))
    return fn(rs)


def _seeds_of(kind: str, rs: RunSet) -> int:
    """Fewest runs behind a curve: per arm, and per setting in the sweep figure (its error bars)."""
    div = rs.divergence()
    keys = rs.varying_keys() if kind == "sweep" else []
    if not len(div) or not keys:
        return seeds_per_arm(div) if len(div) else len(rs)
    # dropna=False: a key that is None for some runs (model.depth of a CNN) is a setting too
    return int(div.groupby([*keys, "arm"], dropna=False)["run"].nunique().min())


def _with_setting(df: pd.DataFrame, label: str) -> pd.DataFrame:
    if label and not df.empty:
        df = df.copy()
        df.insert(0, "setting", label)
    return df


def _key_numbers(kind: str, rs: RunSet, fig: Figure, label: str, extra: dict[str, pd.DataFrame], measure: str,
                 drift_of) -> None:
    """Add a figure's key numbers to ``extra`` (title -> table) for summary.md."""
    div = rs.divergence()
    diverged = div.loc[div["status"] == "diverged", "arm"].unique()

    def add(title: str, df: pd.DataFrame) -> None:
        if df.empty:
            return
        gone = [a for a in diverged if a not in set(df["arm"])]
        if gone:  # a diverged arm without numbers keeps its row ("–"), not silently left out
            df = pd.concat([df, pd.DataFrame({"arm": gone})], ignore_index=True)
        df = sort_arms(df)
        df["arm"] = df["arm"].map(arm_label)
        df = _with_setting(df, label)
        extra[title] = pd.concat([extra[title], df], ignore_index=True) if title in extra else df

    if kind == "ioffe":
        layer, unit = getattr(fig, "ioffe_layer", None), getattr(fig, "ioffe_unit", 0)
        if layer:
            sp = ioffe_spread(rs, layer, unit)
            if not sp.empty:
                add(f"Percentile spread of {layer} unit {unit} (ioffe; q0.85 − q0.15, first vs last recorded step)",
                    sp.rename(columns={"spread_start": "spread first", "spread_end": "spread last",
                                       "spread_ratio": "last / first", "median_shift": "median shift"}))
    elif kind == "drift_curves":
        d = drift_of(rs)
        d = d[np.isfinite(d["mean"].to_numpy(dtype=float))]
        t = d.groupby(["arm"], observed=True)["mean"].agg(["mean", "median", "max"]).reset_index()
        add(f"Drift {measure} (mean over units; over layers, steps and seeds)", t)
    elif kind == "hist_evolution":
        layer, unit = getattr(fig, "hist_layer", None), getattr(fig, "hist_unit", None)
        if layer:
            rows = []
            for arm, hd in hist_density(rs, layer, unit).items():
                out = hd.outside
                rows.append({"arm": arm, "outside first": float(out.iloc[0]), "outside last": float(out.iloc[-1]),
                             "outside max": float(out.max())})
            add(f"Fraction of {layer} values outside the histogram range (a fixed recorder.hist_range keeps "
                "drifting activations in range)", pd.DataFrame(rows))
    elif kind == "smoothness":
        m = rs.metrics(["smooth_beta"])
        if not m.empty:
            half = m["step"] >= m["step"].max() / 2
            t = m[half].groupby("arm")["value"].agg(["mean", "max"]).reset_index()
            add("Effective β-smoothness (second half of training)", t)
    elif kind == "ics":
        m = rs.metrics(["ics_cos", "ics_l2"])
        # a layer with no moving layer before it (the first, or one behind frozen layers) has
        # G' = G: cos 1 and l2 0 by construction, which would pull every arm towards "no ICS"
        l2 = m[m["metric"] == "ics_l2"].groupby(["run", "arm", "layer"], observed=True)["value"].max()
        trivial = l2[l2 == 0].index
        m = m[~m.set_index(["run", "arm", "layer"]).index.isin(trivial)]
        if not m.empty:
            t = m.pivot_table(index="arm", columns="metric", values="value", aggfunc="mean").reset_index()
            t.columns.name = None
            add("Gradient ICS (mean over steps, seeds and layers, leaving out layers where G' = G by "
                "construction, such as the first)", t)
