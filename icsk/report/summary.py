"""Key numbers of a report, as pandas tables and as the markdown of ``summary.md``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .figures import CAPTIONS, band_kind, config_text, final_metrics
from .loading import RunSet
from .style import arm_label, order_arms


@dataclass
class BuiltFigure:
    """One saved figure: kind, run group label, files, and the band drawn around seed means."""

    kind: str
    files: list[Path]
    group: str = ""
    seeds: int = 1
    notes: list[str] = field(default_factory=list)


def _pm(mean: float, std: float, n: int) -> str:
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.4f} ± {std:.4f}" if n > 1 and np.isfinite(std) else f"{mean:.4f}"


def final_accuracy_table(runs: RunSet) -> pd.DataFrame:
    """Final test accuracy per setting and arm over the runs that ended (finished or diverged): mean,
    std, number of seeds and of runs (more runs than seeds: a seed was run again), diverged count,
    and the runs left out because they did not end (interrupted, failed, still running)."""
    fin = final_metrics(runs)
    if fin.empty:
        return pd.DataFrame()
    keys = runs.varying_keys()
    rows = []
    for vals, g in fin.groupby(keys, dropna=False, sort=True) if keys else [((), fin)]:
        setting = _setting(keys, vals if isinstance(vals, tuple) else (vals,))
        for arm in order_arms(g["arm"].unique()):
            a = g[g["arm"] == arm]
            ended = a[a["status"].isin(["finished", "diverged"]) | a["diverged"]]
            f = ended["final"].astype(float)
            rows.append({"setting": setting, "arm": arm, "mean": f.mean(), "std": f.std(ddof=1) if f.count() > 1
                         else math.nan, "seeds": int(ended["seed"].nunique()), "runs": int(ended["run"].nunique()),
                         "diverged": int(a["diverged"].sum()), "unfinished": len(a) - len(ended)})
    return pd.DataFrame(rows)


def _setting(keys: Sequence[str], vals: Sequence) -> str:
    """``k=v, ...`` of one setting (a missing value reads None)."""
    return ", ".join(f"{k}={config_text(v)}" for k, v in zip(keys, vals, strict=True))


def _md_table(header: Sequence[str], rows: list[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def sweep_failures(paths: Sequence[Path]) -> list[str]:
    """Jobs of ``sweep_summary.csv`` files that did not finish (as short lines). A job the summary
    calls ``diverged`` finished (an arm diverged): the Divergence section lists it."""
    out = []
    for p in paths:
        f = Path(p) / "sweep_summary.csv"
        if not f.is_file():
            continue
        try:
            df = pd.read_csv(f)
        except Exception:  # a malformed summary must not stop the report
            continue
        if "status" not in df.columns:
            continue
        bad = df[~df["status"].astype(str).isin(["finished", "diverged", "ok", "success", "completed"])]
        for _, r in bad.iterrows():
            out.append(f"{f.parent.name}: job {r.get('job', '?')} ({r.get('overrides', '')}): {r['status']}")
    return out


def summary_markdown(name: str, runs: RunSet, built: list[BuiltFigure], skipped: dict[str, str],
                     out_dir: Path, extra: dict[str, pd.DataFrame] | None = None,
                     inputs: Sequence[Path] = ()) -> str:
    """The text of summary.md: runs, figures with relative image links, and key numbers."""
    extra = extra or {}
    lines = [f"# {name}", ""]
    keys = runs.varying_keys()
    seeds = sorted({str(r.seed) for r in runs})
    lines.append(f"{len(runs)} run(s), arms: {', '.join(runs.arms) or '–'}; seeds: {', '.join(seeds)}"
                 + (f"; swept: {', '.join(keys)}" if keys else "") + ".")
    status = pd.Series([str(r.info.get("status", "unknown")) for r in runs]).value_counts()
    lines.append("Run status: " + ", ".join(f"{n} {s}" for s, n in status.items()) + ".")
    if runs.mode != "train":
        lines.append({"probe": "Activation statistics are those of the fixed probe batch (mode=probe): they "
                               "change only because the weights do (and by the noise of stochastic layers, "
                               "such as noisy BN's).",
                      "eval": "Activation statistics are those of eval-mode forwards (mode=eval)."}[runs.mode])
    lines.append("")
    lines.append("Curves are means over seeds; bands are a 95% t-interval of the mean with 3 or more seeds, "
                 "± one standard deviation with 2, none with 1.")
    lines += ["", "## Figures", ""]
    for b in built:
        png = next((f for f in b.files if f.suffix == ".png"), None)
        title = b.kind + (f" ({b.group})" if b.group else "")
        links = ", ".join(f"[{f.suffix[1:].upper()}]({f.relative_to(out_dir).as_posix()})" for f in b.files)
        lines.append(f"### {title}")
        lines.append("")
        lines.append(f"{CAPTIONS.get(b.kind, '')} {_seed_note(b)} {links}")
        lines.extend(b.notes)
        if png is not None:
            lines += ["", f"![{title}]({png.relative_to(out_dir).as_posix()})"]
        lines.append("")
    if skipped:
        lines += ["## Skipped figures", ""]
        lines += [f"- **{k}**: {v}" for k, v in skipped.items()]
        lines.append("")
    lines += ["## Key numbers", ""]
    acc = final_accuracy_table(runs)
    if not acc.empty and acc["mean"].notna().any():
        metric = final_metrics(runs)["final_metric"].dropna()
        what = "test accuracy" if len(metric) and metric.iloc[0] == "test_acc" else "train accuracy"
        lines += [f"### Final {what} (mean ± std over seeds)", ""]
        rows = [([r["setting"]] if keys else []) + [arm_label(r["arm"]), _pm(r["mean"], r["std"], r["runs"]),
                                                    r["seeds"] if r["runs"] == r["seeds"] else
                                                    f"{r['seeds']} ({r['runs']} runs)", r["diverged"]]
                + ([r["unfinished"]] if acc["unfinished"].any() else []) for _, r in acc.iterrows()]
        header = (["setting"] if keys else []) + ["arm", what, "seeds", "diverged"]
        lines += [_md_table(header + (["not ended (left out)"] if acc["unfinished"].any() else []), rows), ""]
    div = runs.divergence()
    dv = div[(div["status"] == "diverged") | div["diverged_step"].notna()]
    lines += ["### Divergence", ""]
    if dv.empty:
        lines += ["No arm diverged.", ""]
    else:
        rows = [[r["run"], arm_label(r["arm"]), r["seed"],
                 ", ".join(f"{k}={config_text(r[k])}" for k in keys),
                 "–" if pd.isna(r["diverged_step"]) else int(r["diverged_step"])] for _, r in dv.iterrows()]
        lines += [f"{len(dv)} of {len(div)} arm runs diverged.", "",
                  _md_table(["run", "arm", "seed", "setting", "diverged at step"], rows), ""]
    fails = sweep_failures(list(inputs))
    if fails:
        lines += ["### Sweep jobs not finished", ""] + [f"- {f}" for f in fails] + [""]
    for title, df in extra.items():
        if df is None or df.empty:
            continue
        lines += [f"### {title}", "", _md_table(list(df.columns), [[_cell(v) for v in r] for r in df.itertuples(
            index=False)]), ""]
    return "\n".join(lines).rstrip() + "\n"


def _seed_note(b: BuiltFigure) -> str:
    n = f"{b.seeds} seed(s)"
    if b.kind in ("drift_heatmap", "hist_evolution"):
        return f"Mean over seeds ({n})."
    if b.kind == "sweep":
        return f"Error bars: ± sd over seeds ({n} per setting); dots: single runs; x: diverged runs."
    return f"Band: {band_kind(b.seeds)} ({n})."


def sort_arms(df: pd.DataFrame, col: str = "arm") -> pd.DataFrame:
    """Rows ordered by the canonical arm order (none, bn, ...), stable within an arm."""
    order = {a: i for i, a in enumerate(order_arms(df[col].astype(str).unique()))}
    return df.sort_values(col, key=lambda s: s.astype(str).map(order), kind="stable").reset_index(drop=True)


def _cell(v) -> str:
    if isinstance(v, float):
        return "–" if not np.isfinite(v) else f"{v:.4g}"
    return str(v)
