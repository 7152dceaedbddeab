"""One function per figure kind: RunSet in, matplotlib Figure out.

Seeds are aggregated as a mean line with a band: a 95% t-interval of the mean with 3 or more
seeds, ± one standard deviation with 2, none with 1 (see :func:`band_kind`). A figure whose data
is missing raises :class:`MissingDataError` with a message naming the missing metric/statistic
and what produces it; the report builder prints it and goes on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.patheffects import withStroke
from matplotlib.ticker import NullFormatter
from matplotlib.transforms import blended_transform_factory

from .loading import RunSet, natural_key
from .style import arm_color, arm_label, arm_title, grid_size, order_arms

QUANTILES = ("q0.15", "q0.5", "q0.85")
MEASURE_LABELS = {
    "mean_shift": "mean shift (σ)",
    "kl": "KL drift",
    "sym_kl": "symmetric KL drift",
    "w2": "W2 drift",
    "w1": "W1 drift",
}
KEY_LABELS = {
    "optim.lr": "learning rate (optim.lr)",
    "model.init_scale": "init scale (model.init_scale)",
    "data.batch_size": "batch size (data.batch_size)",
    "model.depth": "depth (model.depth)",
    "model.width": "width (model.width)",
}
MAX_POINTS = 600  # curves with more steps are averaged into this many step bins per run


class MissingDataError(LookupError):
    """The runs lack the data a figure needs; the message says what is missing and what makes it."""


# ---------------------------------------------------------------------- helpers
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045]


def _t975(dof: np.ndarray) -> np.ndarray:
    """97.5% quantile of Student's t with ``dof`` degrees of freedom (table up to 29, then the
    Cornish-Fisher term z + (z³ + z)/(4·dof); NaN below 1)."""
    d = np.atleast_1d(np.asarray(dof, dtype=np.int64))
    z = 1.959964
    t = z + (z**3 + z) / (4 * np.maximum(d, 1))
    small = (d >= 1) & (d <= len(_T975))
    t[small] = np.asarray(_T975)[d[small] - 1]
    t[d < 1] = np.nan
    return t


def band_kind(n_seeds: int) -> str:
    """Band drawn around a mean of ``n_seeds`` runs: '95% CI', '± sd' or 'none'."""
    return "95% CI" if n_seeds >= 3 else ("± sd" if n_seeds == 2 else "none")


def seeds_per_arm(df: pd.DataFrame) -> int:
    """Smallest number of runs behind any arm of a frame (drives the band kind)."""
    if df.empty:
        return 0
    return int(df.groupby("arm")["run"].nunique().min())


def thin_steps(df: pd.DataFrame, by: Sequence[str], value: str = "value", x: str = "step",
               max_points: int = MAX_POINTS) -> pd.DataFrame:
    """Average ``value`` into at most ``max_points`` step bins per group (keeps long curves light).
    Every group shares the bins and each bin's x (the mean of the steps it holds), so runs stay aligned."""
    if df.empty or df[x].nunique() <= max_points:
        return df
    steps = np.sort(df[x].unique())
    edges = np.linspace(steps[0], steps[-1] + 1, max_points + 1)
    which = lambda v: np.clip(np.searchsorted(edges, v, side="right") - 1, 0, max_points - 1)  # noqa: E731
    centers = pd.Series(steps, dtype=float).groupby(which(steps)).mean()
    b = which(df[x].to_numpy())
    out = df.assign(_bin=b).groupby([*by, "_bin"], observed=True, sort=True)[value].mean().reset_index()
    out[x] = out["_bin"].map(centers)
    return out.drop(columns="_bin")


def aggregate(df: pd.DataFrame, by: Sequence[str], value: str = "value", x: str = "step") -> pd.DataFrame:
    """Mean over runs (seeds) per (by, x) with band edges ``lo``/``hi`` (see :func:`band_kind`)."""
    by = list(by)
    df = df[np.isfinite(df[value].to_numpy(dtype=float))]
    per_run = df.groupby([*by, "run", x], observed=True, sort=False)[value].mean().reset_index()
    per_run = thin_steps(per_run, [*by, "run"], value=value, x=x)
    g = per_run.groupby([*by, x], observed=True, sort=True)[value]
    agg = g.agg(["mean", "std", "count", "min"]).reset_index()
    n = agg["count"].to_numpy()
    sd = agg["std"].fillna(0.0).to_numpy()
    half = np.where(n >= 3, _t975(n - 1) * sd / np.sqrt(np.maximum(n, 1)), np.where(n == 2, sd, 0.0))
    agg["lo"] = agg["mean"] - half
    agg["hi"] = agg["mean"] + half
    return agg


def _plot_band(ax, agg: pd.DataFrame, color: str, label: str | None, x: str = "step", **kw) -> None:
    ax.plot(agg[x], agg["mean"], color=color, label=label, lw=kw.pop("lw", 1.2), **kw)
    if (agg["hi"] > agg["lo"]).any():
        lo = agg["lo"]
        if ax.get_yscale() == "log":  # a band reaching <= 0 stops at the smallest run's value instead
            lo = lo.where(lo > 0, agg["min"])
        ax.fill_between(agg[x], lo, agg["hi"], color=color, alpha=0.2, lw=0)


def plot_arms(ax, df: pd.DataFrame, value: str = "value", x: str = "step", arms: Sequence[str] | None = None,
              **kw) -> list[str]:
    """Mean-and-band curve of ``value`` over ``x`` per arm, in the arm's colour; returns arms drawn."""
    drawn = []
    for arm in arms or order_arms(df["arm"].unique()):
        sub = df[df["arm"] == arm]
        if sub.empty:
            continue
        agg = aggregate(sub, [], value=value, x=x)
        if agg.empty:
            continue
        _plot_band(ax, agg, arm_color(arm), arm_label(arm), x=x, **kw)
        drawn.append(arm)
    return drawn


def default_layer(layers: Sequence[str]) -> str:
    """The last ``block*.pre_act`` layer (natural order), else the last ``*pre_act``, else the last."""
    layers = sorted(layers, key=natural_key)
    for pat in (r"^block\d+\.pre_act$", r"pre_act"):
        hits = [x for x in layers if re.search(pat, x)]
        if hits:
            return hits[-1]
    return layers[-1]


def _letters(i: int) -> str:
    return f"({chr(ord('a') + i)})"


def _log_if_wide(ax, values: np.ndarray, axis: str = "y", ratio: float = 100.0) -> None:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size and (v > 0).all() and np.nanmax(v) / np.nanmin(v) > ratio:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def _legend(fig: Figure, arms: Sequence[str], **kw) -> None:
    handles = [Line2D([], [], color=arm_color(a), lw=1.5, label=arm_label(a)) for a in arms]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), **kw)


def _subplots(nrows: int, ncols: int, **kw) -> tuple[Figure, np.ndarray]:
    fig, axes = plt.subplots(nrows, ncols, figsize=grid_size(ncols, nrows), squeeze=False, layout="constrained", **kw)
    return fig, axes


def _stats_arms(df: pd.DataFrame) -> list[str]:
    return order_arms(df["arm"].unique()) if not df.empty else []


# ---------------------------------------------------------------------- 1. ioffe
def fig_ioffe(runs: RunSet, layer: str | None = None, unit: int | None = None) -> Figure:
    """Ioffe & Szegedy Fig. 1: (a) test accuracy per arm; then one panel per arm with the
    15/50/85th percentiles of one unit of ``layer`` over steps (band between q0.15 and q0.85)."""
    candidates = runs.layers_with(*QUANTILES)
    if not candidates:
        raise MissingDataError(
            "no percentile statistics (q0.15, q0.5, q0.85) recorded in any run; record them with "
            "Recorder(..., stats=[..., 'quantiles'], quantiles=(0.15, 0.5, 0.85)) — in training configs "
            "recorder.enabled=true with 'quantiles' in recorder.stats (the default recorder)"
        )
    layer = layer or default_layer(candidates)
    if layer not in candidates:
        raise MissingDataError(f"layer {layer!r} has no percentile statistics; layers with them: {candidates}")
    unit = 0 if unit is None else int(unit)
    st = runs.stats(layers=[layer], stats=list(QUANTILES))
    if st.empty:
        raise MissingDataError(f"layer {layer!r}: no percentile rows in the stats tables")
    units = sorted(st["unit"].unique())
    st = st[st["unit"] == unit]
    if st.empty:
        raise MissingDataError(f"layer {layer!r} has units {units[0]}..{units[-1]}; unit {unit} was not recorded")
    acc_metric = "test_acc" if runs.has_metric("test_acc") else ("acc" if runs.has_metric("acc") else None)
    arms = _stats_arms(st)
    ncols = len(arms) + (acc_metric is not None)
    fig, axes = _subplots(1, ncols)
    axes = list(axes[0])
    i = 0
    if acc_metric is not None:
        ax = axes[0]
        m = runs.metrics([acc_metric])
        plot_arms(ax, m)
        ax.set_title(f"(a) {'test' if acc_metric == 'test_acc' else 'train'} accuracy")
        ax.set_xlabel("step")
        ax.set_ylabel("test accuracy" if acc_metric == "test_acc" else "train accuracy")
        i = 1
    first = None
    for arm in arms:
        ax = axes[i]
        sub = st[st["arm"] == arm]
        aggs = {q: aggregate(sub[sub["stat"] == q], []) for q in QUANTILES}
        c = arm_color(arm)
        lo, mid, hi = aggs["q0.15"], aggs["q0.5"], aggs["q0.85"]
        both = lo[["step", "mean"]].merge(hi[["step", "mean"]], on="step", suffixes=("_lo", "_hi"))
        ax.fill_between(both["step"], both["mean_lo"], both["mean_hi"], color=c, alpha=0.25, lw=0)
        ax.plot(mid["step"], mid["mean"], color=c, lw=1.4)
        ax.plot(lo["step"], lo["mean"], color=c, lw=0.7, ls="--")
        ax.plot(hi["step"], hi["mean"], color=c, lw=0.7, ls="--")
        ax.set_title(f"{_letters(i)} {arm_title(arm)}")
        ax.set_xlabel("step")
        if first is None:
            first = ax
            ax.set_ylabel(f"{layer}[{unit}]")
        else:
            ax.sharey(first)
        i += 1
    handles = [Line2D([], [], color=arm_color(a), lw=1.5, label=arm_label(a)) for a in arms]
    handles += [Line2D([], [], color="0.35", lw=1.4, label="median"),
                Line2D([], [], color="0.35", lw=0.7, ls="--", label="15th / 85th pct"),
                Patch(facecolor="0.35", alpha=0.25, label="15–85th band")]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles))
    fig.ioffe_layer, fig.ioffe_unit = layer, unit  # for the summary
    return fig


def ioffe_spread(runs: RunSet, layer: str, unit: int) -> pd.DataFrame:
    """Key numbers of the ioffe panels per arm (mean over seeds): 15–85th percentile spread at
    the first and last recorded step, their ratio, and the median's move. An arm with fewer
    than two finite steps in every seed (diverged at once) gets NaN and ``seeds`` 0."""
    st = runs.stats(layers=[layer], stats=list(QUANTILES))
    st = st[st["unit"] == unit]
    rows = []
    for arm in _stats_arms(st):
        per = []
        for _run, g in st[st["arm"] == arm].groupby("run"):
            w = g.pivot_table(index="step", columns="stat", values="value")
            w = w[np.isfinite(w.to_numpy(dtype=float)).all(axis=1)]  # a blown-up step has no percentiles
            if len(w) < 2:  # one step: nothing moved yet, which is no evidence of stability
                continue
            a, b = w.iloc[0], w.iloc[-1]
            per.append((b["q0.85"] - b["q0.15"], a["q0.85"] - a["q0.15"], b["q0.5"] - a["q0.5"]))
        end, start, shift = np.mean(per, axis=0) if per else (math.nan,) * 3
        rows.append({"arm": arm, "spread_start": start, "spread_end": end,
                     "spread_ratio": end / start if start else math.nan, "median_shift": shift, "seeds": len(per)})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------- 2./3. drift
def drift_frame(runs: RunSet, measure: str = "w2", ref: str | int = "previous") -> pd.DataFrame:
    """Per-layer drift (icsk.metrics.drift.layer_drift, mean over units) of every run and arm:
    ``arm, layer, step, measure, mean, median, run, seed, ...``."""
    try:
        from ..metrics.drift import MEASURES, DriftError, layer_drift, quantile_stats
    except ImportError as e:  # pragma: no cover - the module ships with icsk
        raise MissingDataError(f"drift figures need icsk.metrics.drift ({e})") from None
    if measure not in MEASURES:
        raise MissingDataError(f"unknown drift measure {measure!r}; choose from {list(MEASURES)}")
    # w1 takes whichever quantile levels a layer was recorded with
    if measure == "w1":
        need = {layer: list(quantile_stats(have).values()) for layer, have in runs.recorded().items()}
    else:
        need = {layer: ["mean", "var"] for layer in runs.layers_with("mean", "var")}
    layers = [layer for layer in runs.layers_with() if need.get(layer)]
    if not layers:
        what = "quantiles (e.g. q0.15, q0.5, q0.85)" if measure == "w1" else "mean and var"
        raise MissingDataError(
            f"drift measure {measure!r} needs the statistics {what} of recorded layers, but no run has them; "
            "record them with Recorder(..., stats=[...]) — in training configs recorder.enabled=true and "
            "recorder.stats"
        )
    frames = []
    for r in runs:
        parts = []
        for layer in layers:  # one layer at a time keeps memory bounded on big networks
            st = r.stats(layers=[layer], stats=need[layer], mode=runs.mode)
            if st.empty:
                continue
            try:
                d = layer_drift(st[["arm", "layer", "step", "stat", "unit", "value"]], measure=measure, ref=ref)
            except DriftError as e:
                raise MissingDataError(f"run {r.run_id}, layer {layer}: {e}") from None
            if not d.empty:
                parts.append(d)
        if parts:
            frames.append((r, pd.concat(parts, ignore_index=True)))
    out = runs.attach(frames)
    if out.empty:
        raise MissingDataError(f"drift {measure!r}: fewer than two recorded steps per layer; nothing to compare")
    return out


def _step_edges(steps: np.ndarray) -> np.ndarray:
    steps = np.asarray(steps, dtype=float)
    if steps.size == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[steps[0] - (mid[0] - steps[0])], mid, [steps[-1] + (steps[-1] - mid[-1])]])


def _color_norm(values: np.ndarray) -> Normalize:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Normalize(0, 1)
    pos = v[v > 0]
    hi = float(np.percentile(v, 99.5))
    if pos.size == v.size and pos.size and hi / max(float(np.percentile(pos, 1)), 1e-300) > 100:
        return LogNorm(vmin=float(np.percentile(pos, 1)), vmax=max(hi, float(np.percentile(pos, 1)) * 10))
    return Normalize(vmin=min(0.0, float(v.min())), vmax=hi if hi > 0 else float(v.max()) or 1.0)


def fig_drift_heatmap(runs: RunSet, measure: str = "w2", ref: str | int = "previous",
                      drift: pd.DataFrame | None = None) -> Figure:
    """Layer x step heat map of a drift measure (mean over units, then over seeds), one panel per arm."""
    d = drift if drift is not None else drift_frame(runs, measure, ref)
    arms = _stats_arms(d)
    layers = sorted(d["layer"].unique(), key=natural_key)
    fin = d[np.isfinite(d["mean"].to_numpy(dtype=float))]
    mean = fin.groupby(["arm", "layer", "step"], observed=True)["mean"].mean().reset_index()
    norm = _color_norm(mean["mean"].to_numpy())
    w, h = grid_size(len(arms), 1)
    fig, axes = plt.subplots(1, len(arms), figsize=(w, max(h, 0.25 * len(layers) + 1.2)), squeeze=False,
                             sharey=True, layout="constrained")
    mesh = None
    for i, arm in enumerate(arms):
        ax = axes[0, i]
        piv = mean[mean["arm"] == arm].pivot(index="layer", columns="step", values="mean").reindex(layers)
        steps = piv.columns.to_numpy()
        z = np.ma.masked_invalid(piv.to_numpy(dtype=float))
        mesh = ax.pcolormesh(_step_edges(steps), np.arange(len(layers) + 1), z, cmap="viridis", norm=norm,
                             shading="flat", rasterized=z.size > 5000)
        ax.set_yticks(np.arange(len(layers)) + 0.5, layers)
        ax.set_ylim(len(layers), 0)
        ax.grid(False)
        ax.set_title(arm_title(arm))
        ax.set_xlabel("step")
    axes[0, 0].set_ylabel("layer")
    ref_txt = f"vs {ref} step" if isinstance(ref, str) else f"vs step {ref}"
    if mesh is not None:
        fig.colorbar(mesh, ax=list(axes[0]), label=f"{MEASURE_LABELS.get(measure, measure)} ({ref_txt})",
                     shrink=0.9)
    return fig


def fig_drift_curves(runs: RunSet, measure: str = "w2", ref: str | int = "previous",
                     drift: pd.DataFrame | None = None, max_cols: int = 4) -> Figure:
    """Per-layer drift curves over steps (one panel per layer), arms overlaid, seeds as bands."""
    d = drift if drift is not None else drift_frame(runs, measure, ref)
    layers = sorted(d["layer"].unique(), key=natural_key)
    arms = _stats_arms(d)
    ncols = min(max_cols, len(layers))
    nrows = math.ceil(len(layers) / ncols)
    fig, axes = _subplots(nrows, ncols, sharex=True)
    ylabel = MEASURE_LABELS.get(measure, measure)
    for k, layer in enumerate(layers):
        ax = axes[k // ncols, k % ncols]
        sub = d[d["layer"] == layer]
        _log_if_wide(ax, d["mean"].to_numpy())  # one decision for all panels, so they compare
        plot_arms(ax, sub, value="mean", arms=arms)
        ax.set_title(layer)
        if k % ncols == 0:
            ax.set_ylabel(ylabel)
        if k // ncols == nrows - 1 or k + ncols >= len(layers):
            ax.set_xlabel("step")
    for k in range(len(layers), nrows * ncols):
        axes[k // ncols, k % ncols].set_visible(False)
    _legend(fig, arms)
    return fig


# ---------------------------------------------------------------------- 4. ics
def _pick_layers(layers: Sequence[str], k: int) -> list[str]:
    layers = sorted(layers, key=natural_key)
    if len(layers) <= k:
        return list(layers)
    idx = np.unique(np.round(np.linspace(0, len(layers) - 1, k)).astype(int))
    return [layers[i] for i in idx]


def fig_ics(runs: RunSet, layers: Sequence[str] | None = None, max_layers: int = 6) -> Figure:
    """Gradient ICS (Santurkar Fig. 3 style): per layer, ||G − G'||₂ (top) and cos(G, G') (bottom)
    over steps, arms overlaid."""
    m = runs.metrics(["ics_l2", "ics_cos"])
    if m.empty:
        raise MissingDataError(
            "metrics ics_l2 / ics_cos not found in any run's metrics/; they come from the online "
            "gradient-ICS probe (icsk.metrics.gradient_ics): train with metrics=santurkar or "
            "metrics.ics.enabled=true"
        )
    have = sorted(m["layer"].unique(), key=natural_key)
    if layers:
        bad = [x for x in layers if x not in have]
        if bad:
            raise MissingDataError(f"no gradient-ICS metrics for layer(s) {bad}; layers with them: {have}")
    chosen = list(layers) if layers else _pick_layers(have, max_layers)
    arms = _stats_arms(m)
    fig, axes = _subplots(2, len(chosen), sharex=True)
    for j, layer in enumerate(chosen):
        for i, (metric, label) in enumerate((("ics_l2", "‖G − G′‖₂"), ("ics_cos", "cos(G, G′)"))):
            ax = axes[i, j]
            plot_arms(ax, m[(m["layer"] == layer) & (m["metric"] == metric)], arms=arms)
            if i == 0:
                ax.set_title(layer)
            else:
                ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel(label)
    _legend(fig, arms)
    return fig


# ---------------------------------------------------------------------- 5. smoothness
def _range_band(ax, m: pd.DataFrame, lo_name: str, hi_name: str, arms: Sequence[str]) -> list[str]:
    drawn = []
    for arm in arms:
        sub = m[m["arm"] == arm]
        lo = aggregate(sub[sub["metric"] == lo_name], [])
        hi = aggregate(sub[sub["metric"] == hi_name], [])
        if lo.empty or hi.empty:
            continue
        both = lo[["step", "mean"]].merge(hi[["step", "mean"]], on="step", suffixes=("_lo", "_hi"))
        c = arm_color(arm)
        ax.fill_between(both["step"], both["mean_lo"], both["mean_hi"], color=c, alpha=0.35, lw=0)
        ax.plot(both["step"], both["mean_lo"], color=c, lw=0.6)
        ax.plot(both["step"], both["mean_hi"], color=c, lw=0.6)
        drawn.append(arm)
    return drawn


SMOOTH_METRICS = ("smooth_loss_min", "smooth_loss_max", "smooth_grad_change_min", "smooth_grad_change_max",
                  "smooth_beta")


def fig_smoothness(runs: RunSet) -> Figure:
    """Loss landscape along the gradient (Santurkar Fig. 4 style): (a) loss variation band,
    (b) gradient predictiveness band, (c) effective β-smoothness; arms overlaid."""
    m = runs.metrics(SMOOTH_METRICS)
    if m.empty:
        raise MissingDataError(
            "metrics smooth_loss_min/max, smooth_grad_change_min/max, smooth_beta not found in any run's "
            "metrics/; they come from the online loss-smoothness probe (icsk.metrics.loss_smoothness): "
            "train with metrics=santurkar or metrics.smoothness.enabled=true"
        )
    arms = _stats_arms(m)
    have = set(m["metric"].unique())
    panels = []
    if {"smooth_loss_min", "smooth_loss_max"} <= have:
        panels.append(("loss landscape", "loss variation", "band", ("smooth_loss_min", "smooth_loss_max")))
    if {"smooth_grad_change_min", "smooth_grad_change_max"} <= have:
        panels.append(("gradient predictiveness", "‖∇L(w) − ∇L(w − ηg)‖₂", "band",
                       ("smooth_grad_change_min", "smooth_grad_change_max")))
    if "smooth_beta" in have:
        panels.append(("effective β-smoothness", "β", "line", ("smooth_beta",)))
    if not panels:
        raise MissingDataError(f"incomplete smoothness metrics: found only {sorted(have)}")
    fig, axes = _subplots(1, len(panels))
    for i, (title, ylabel, kind, names) in enumerate(panels):
        ax = axes[0, i]
        _log_if_wide(ax, m.loc[m["metric"].isin(names), "value"].to_numpy(), ratio=20)
        if kind == "band":
            _range_band(ax, m, names[0], names[1], arms)
        else:
            plot_arms(ax, m[m["metric"] == names[0]], arms=arms)
        ax.set_title(f"{_letters(i)} {title}")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
    _legend(fig, arms)
    return fig


# ---------------------------------------------------------------------- 6. sweep
def final_metrics(runs: RunSet) -> pd.DataFrame:
    """One row per (run, arm): final test accuracy (``final``; last logged value, NaN if never
    logged), which metric it is, divergence status/step, seed and swept keys."""
    metric = "test_acc" if runs.has_metric("test_acc") else ("acc" if runs.has_metric("acc") else None)
    div = runs.divergence()
    div["diverged"] = div["status"].eq("diverged") | div["diverged_step"].notna()
    if metric is None:
        div["final"] = np.nan
        div["final_metric"] = None
        return div
    m = runs.metrics([metric])
    m = m[np.isfinite(m["value"])]
    last = m.sort_values("step").groupby(["run", "arm"], observed=True).tail(1)[["run", "arm", "value"]]
    out = div.merge(last.rename(columns={"value": "final"}), on=["run", "arm"], how="left")
    out["final_metric"] = metric
    return out


def is_missing(v) -> bool:
    """Whether a config value is missing from a run's config: None, or the NaN pandas makes of it."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def config_text(v) -> str:
    """A config value as text (a missing one reads None)."""
    return "None" if is_missing(v) else f"{v:g}" if isinstance(v, float) else str(v)


def _is_numeric(vals: Sequence) -> bool:
    try:
        [float(v) for v in vals]
        return not any(isinstance(v, (bool, tuple, str)) for v in vals)
    except (TypeError, ValueError):
        return False


def fig_sweep(runs: RunSet, keys: Sequence[str] | None = None) -> Figure:
    """Final test accuracy (left) and fraction of diverged runs (right) vs each swept config key
    (one row per key, :meth:`RunSet.swept_keys` unless ``keys`` are given), per arm; diverged
    runs are x markers (at the bottom when they have no final accuracy)."""
    keys = list(keys) if keys else runs.swept_keys()
    if not keys:
        raise MissingDataError(
            "no config key varies across the runs (only seeds, a single run, or a --where that keeps one setting); "
            "pass a sweep folder, e.g. from `icsk-train -m optim.lr=0.01,0.1,1`, or runs of different settings"
        )
    fin = final_metrics(runs)
    metric = fin["final_metric"].dropna().iloc[0] if fin["final_metric"].notna().any() else None
    if metric is None:
        raise MissingDataError("metric test_acc (or acc) not found in any run's metrics/; the training loop logs "
                               "test_acc every train.eval_every steps (set it > 0)")
    arms = order_arms(fin["arm"].unique())
    w, h = grid_size(2, len(keys))
    fig, axes = plt.subplots(len(keys), 2, figsize=(w, h), squeeze=False, sharex="row", layout="constrained")
    for j, key in enumerate(keys):
        ax, axd = axes[j, 0], axes[j, 1]
        f = fin.copy()
        # a key some runs lack (model.depth of a CNN) is None there: a category of its own
        numeric = f[key].notna().all() and _is_numeric(list(pd.unique(f[key])))
        if numeric:
            f["_x"] = f[key].astype(float)
        else:
            text = f[key].map(config_text)
            order = sorted(text.unique(), key=natural_key)
            f["_x"] = text.map({v: i for i, v in enumerate(order)}).astype(float)
        for arm in arms:
            a = f[f["arm"] == arm]
            if a.empty:
                continue
            c = arm_color(arm)
            ok = a[~a["diverged"]]
            ax.scatter(ok["_x"], ok["final"], color=c, s=10, alpha=0.5, lw=0)
            g = a.groupby("_x")["final"].agg(["mean", "std"]).reset_index().dropna(subset=["mean"])
            ax.errorbar(g["_x"], g["mean"], yerr=g["std"].fillna(0), color=c, marker="o", ms=3.5, lw=1.2,
                        capsize=2, label=arm_label(arm))
            dv = a[a["diverged"]]
            if len(dv):
                fy = dv["final"].to_numpy(dtype=float)
                has = np.isfinite(fy)
                ax.scatter(dv["_x"][has], fy[has], color=c, marker="x", s=28, lw=1.2, zorder=3)
                if (~has).any():
                    tr = blended_transform_factory(ax.transData, ax.transAxes)
                    ax.scatter(dv["_x"][~has], np.full((~has).sum(), 0.03), color=c, marker="x", s=28, lw=1.2,
                               transform=tr, clip_on=False, zorder=3)
            frac = a.groupby("_x")["diverged"].mean().reset_index()
            axd.plot(frac["_x"], frac["diverged"], color=c, marker="o", ms=3.5, lw=1.2)
        if numeric:
            xs = np.unique(f["_x"].to_numpy())
            if (xs > 0).all() and (key.split(".")[-1] in ("lr", "learning_rate", "weight_decay")
                                   or xs.max() / xs.min() >= 20):
                ax.set_xscale("log")
            if len(xs) <= 8:  # label the swept values themselves
                ax.set_xticks(xs, [f"{v:g}" for v in xs])
                ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            ax.set_xticks(range(len(order)), order)
        for a_ in (ax, axd):
            a_.set_xlabel(KEY_LABELS.get(key, key))
        axd.set_ylim(-0.05, 1.05)
        ax.set_ylabel("final test accuracy" if metric == "test_acc" else "final train accuracy")
        axd.set_ylabel("fraction diverged")
        if j == 0:
            ax.set_title(f"(a) final {'test' if metric == 'test_acc' else 'train'} accuracy")
            axd.set_title("(b) diverged runs")
    handles = [Line2D([], [], color=arm_color(a), marker="o", ms=3.5, label=arm_label(a)) for a in arms]
    if fin["diverged"].any():
        handles.append(Line2D([], [], color="0.3", marker="x", ls="none", label="diverged run"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6))
    return fig


# ---------------------------------------------------------------------- 7. hist evolution
class HistDensity(NamedTuple):
    """Histogram of one arm on a common grid, averaged over seeds: ``density`` [step x bin],
    and the fractions of values below (``under``) and above (``over``) the recorded range."""

    grid: np.ndarray
    density: pd.DataFrame
    under: pd.Series
    over: pd.Series

    @property
    def outside(self) -> pd.Series:
        """Fraction of values outside the recorded range, per step."""
        return self.under + self.over


def _rebin(g: pd.DataFrame, grid: np.ndarray, unit: int | None) -> tuple[pd.DataFrame, pd.Series, pd.Series]:
    """Densities of one run/arm on ``grid`` per step (CDF interpolation; uniform within bins) and
    the fractions of values in the underflow and overflow bins."""
    if unit is not None:
        g = g[g["unit"] == unit]
    c = g.groupby(["step", "bin"], observed=True)["count"].sum().unstack("bin").sort_index(axis=1).fillna(0.0)
    edges_tab = g.drop_duplicates("bin").set_index("bin").sort_index()
    last = int(c.columns.max())
    inner = [b for b in c.columns if 0 < b < last]
    edges = np.concatenate([[edges_tab.loc[inner[0], "left"]], edges_tab.loc[inner, "right"].to_numpy()])
    counts = c[inner].to_numpy(dtype=float)
    total = c.to_numpy(dtype=float).sum(axis=1)
    total = np.where(total > 0, total, np.nan)  # no finite value at this step (blow-up): no histogram
    cdf = np.concatenate([np.zeros((len(c), 1)), np.cumsum(counts, axis=1)], axis=1)
    on_grid = np.stack([np.interp(grid, edges, row) for row in cdf])
    dens = np.diff(on_grid, axis=1) / total[:, None] / np.diff(grid)[None, :]
    under = c[0].to_numpy(dtype=float) / total if 0 in c.columns else np.zeros(len(c))
    over = c[last].to_numpy(dtype=float) / total if last not in inner and last > 0 else np.zeros(len(c))
    idx = c.index
    return pd.DataFrame(dens, index=idx), pd.Series(under, index=idx), pd.Series(over, index=idx)


def hist_density(runs: RunSet, layer: str, unit: int | None = None, bins: int | None = None
                 ) -> dict[str, HistDensity]:
    """Per arm: the layer's histogram over steps on one grid spanning every seed's recorded
    range (``bins`` bins, default the recorded count), averaged over seeds."""
    h = runs.hist([layer])
    if h.empty:
        raise MissingDataError(f"layer {layer!r}: no histogram rows")
    if unit is not None and unit not in set(h["unit"].unique()):
        raise MissingDataError(f"layer {layer!r}: unit {unit} has no histogram (units 0..{int(h['unit'].max())})")
    out = {}
    for arm in order_arms(h["arm"].unique()):
        a = h[h["arm"] == arm]
        fin = a[np.isfinite(a["left"]) & np.isfinite(a["right"])]
        lo, hi = float(fin["left"].min()), float(fin["right"].max())
        grid = np.linspace(lo, hi, (bins or int(fin["bin"].max())) + 1)
        parts = [_rebin(g, grid, unit) for _run, g in a.groupby("run")]

        def mean(i: int, parts=parts):
            return pd.concat([p[i] for p in parts]).groupby(level=0).mean().sort_index()

        out[arm] = HistDensity(grid, mean(0), mean(1), mean(2))
    return out


def fig_hist_evolution(runs: RunSet, layer: str | None = None, unit: int | None = None) -> Figure:
    """Activation histogram of ``layer`` over steps ("colourful dimension"): bin (y) x step (x),
    colour = density on a log scale, one panel per arm; one unit or (default) all units pooled.
    Values outside the recorded range (under/overflow bins) appear as edge rows beyond the
    dashed lines, coloured by their fraction spread over the row's height."""
    candidates = runs.layers_with("hist")
    if not candidates:
        raise MissingDataError(
            "no histograms recorded in any run; record them with Recorder(..., stats=[..., 'hist']) — in "
            "training configs recorder=hist (or 'hist' in recorder.stats)"
        )
    layer = layer or default_layer(candidates)
    if layer not in candidates:
        raise MissingDataError(f"layer {layer!r} has no histograms; layers with them: {candidates}")
    per_arm = hist_density(runs, layer, unit)
    arms = list(per_arm)
    pos = np.concatenate([hd.density.to_numpy().ravel() for hd in per_arm.values()])
    pos = pos[np.isfinite(pos) & (pos > 0)]
    vmax = float(pos.max()) if pos.size else 1.0
    norm = LogNorm(vmin=max(float(pos.min()) if pos.size else 1e-4, vmax * 1e-4), vmax=vmax)
    base = matplotlib.colormaps["magma"]
    cmap = base.with_extremes(bad=base(0.0), under=base(0.0))
    fig, axes = _subplots(1, len(arms), sharey=True)
    mesh = None
    for i, arm in enumerate(arms):
        ax = axes[0, i]
        hd = per_arm[arm]
        grid, d = hd.grid, hd.density
        xe = _step_edges(d.index.to_numpy())
        z = np.ma.masked_less_equal(d.to_numpy().T, 0)
        mesh = ax.pcolormesh(xe, grid, z, cmap=cmap, norm=norm, shading="flat", rasterized=True)
        ax.set_facecolor(cmap(0.0))
        ax.grid(False)
        if float(hd.outside.max()) > 0.001:  # edge rows: under/overflow mass
            h = max(2 * (grid[1] - grid[0]), 0.25 * (grid[-1] - grid[0]))
            for frac, y0, name in ((hd.under, grid[0] - h, "underflow"), (hd.over, grid[-1], "overflow")):
                zz = np.ma.masked_less_equal(frac.reindex(d.index).fillna(0).to_numpy()[None, :] / h, 0)
                ax.pcolormesh(xe, [y0, y0 + h], zz, cmap=cmap, norm=norm, shading="flat", rasterized=True)
                ax.text(0.01, y0 + h / 2, name, transform=ax.get_yaxis_transform(), va="center", ha="left",
                        color="white", fontsize="x-small", path_effects=[withStroke(linewidth=1.5, foreground="black")])
            for y in (grid[0], grid[-1]):
                ax.axhline(y, color="white", lw=0.6, ls="--", alpha=0.8)
            ax.set_title(f"{arm_title(arm)} (up to {float(hd.outside.max()):.0%} out of range)")
        else:
            ax.set_title(arm_title(arm))
        ax.set_xlabel("step")
    who = f"unit {unit}" if unit is not None else "all units"
    axes[0, 0].set_ylabel(f"{layer} ({who})")
    if mesh is not None:
        fig.colorbar(mesh, ax=list(axes[0]), label="density (log)", shrink=0.9)
    fig.hist_layer, fig.hist_unit = layer, unit
    return fig


# ---------------------------------------------------------------------- registry
FIGURES: dict[str, Callable[..., Figure]] = {
    "ioffe": fig_ioffe,
    "drift_heatmap": fig_drift_heatmap,
    "drift_curves": fig_drift_curves,
    "ics": fig_ics,
    "smoothness": fig_smoothness,
    "sweep": fig_sweep,
    "hist_evolution": fig_hist_evolution,
}
FIGURE_NAMES = tuple(FIGURES)
RECORDER_FIGURES = frozenset({"ioffe", "drift_heatmap", "drift_curves", "hist_evolution"})  # need Recorder statistics
CAPTIONS = {
    "ioffe": "Ioffe & Szegedy Fig. 1: (a) test accuracy per arm; then the 15th/50th/85th percentiles of one "
             "unit's input over training, per arm.",
    "drift_heatmap": "Drift of activation statistics per layer and step (mean over units), per arm.",
    "drift_curves": "Drift of activation statistics over training, per layer; arms overlaid.",
    "ics": "Gradient internal covariate shift per layer: ‖G − G′‖₂ and cos(G, G′) (Santurkar et al. Fig. 3).",
    "smoothness": "Loss landscape along the gradient: loss variation, gradient predictiveness, effective "
                  "β-smoothness (Santurkar et al. Fig. 4).",
    "sweep": "Final test accuracy and divergence vs the swept parameter(s), per arm.",
    "hist_evolution": "Activation histogram of one layer over training; colour = density (log scale).",
}
