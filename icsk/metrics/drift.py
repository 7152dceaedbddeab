"""Distribution drift of recorded activation statistics, per unit and between steps.

Input is the Recorder's long frame ``step, layer, stat, unit, value`` (optionally ``arm``,
``seed``, ``mode`` ...). Every column other than ``step, stat, unit, value`` is a grouping id:
drift is measured within one id group (one layer of one arm of one seed ...), per unit.

Measures (``t`` = the step, ``r`` = its reference step, σ = sqrt(var)):

* ``mean_shift``: |μ_t − μ_r| / σ_r, the mean's move in units of the reference spread.
* ``kl``: KL(N(μ_t, σ_t²) ‖ N(μ_r, σ_r²)) of the Gaussian fits.
* ``sym_kl``: KL(a‖b) + KL(b‖a) (Jeffreys divergence: the *sum*, not the average).
* ``w2``: 2-Wasserstein distance of the Gaussian fits, sqrt((μ_t − μ_r)² + (σ_t − σ_r)²).
* ``w1``: empirical 1-Wasserstein distance approximated on the recorded quantile grid,
  mean over levels q of |Q_t(q) − Q_r(q)|. W1 = ∫₀¹ |Q_t(q) − Q_r(q)| dq, so this is a
  quadrature of that integral: with levels spread uniformly over (0, 1) (e.g. (i + ½)/n) it
  converges to W1 as n grows; with the default three levels (0.15, 0.5, 0.85) it is a coarse
  proxy (exact for a pure shift, where |Q_t − Q_r| is the same at every level).

A zero reference variance gives ``inf``/``nan`` for the σ-normalised measures, as the formulas do;
:func:`layer_drift` aggregates over the units with a finite drift and counts the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

MEASURES = ("mean_shift", "kl", "sym_kl", "w2", "w1")
REFS = ("previous", "first", "last")
_CORE = ("step", "stat", "unit", "value")


class DriftError(ValueError):
    """A frame that cannot give the requested drift: the message names the fix."""


# ---------------------------------------------------------------------- per-pair helpers
# Work elementwise on floats, NumPy arrays or torch tensors (broadcasting as usual).
def _sqrt(x: Any) -> Any:
    return torch.sqrt(x) if isinstance(x, torch.Tensor) else np.sqrt(x)


def _log(x: Any) -> Any:
    return torch.log(x) if isinstance(x, torch.Tensor) else np.log(x)


def _abs(x: Any) -> Any:
    return torch.abs(x) if isinstance(x, torch.Tensor) else np.abs(x)


def mean_shift(mu: Any, mu_ref: Any, var_ref: Any) -> Any:
    """|μ − μ_ref| / sqrt(var_ref): the mean's move in units of the reference standard deviation."""
    return _abs(mu - mu_ref) / _sqrt(var_ref)


def gaussian_kl(mu_p: Any, var_p: Any, mu_q: Any, var_q: Any) -> Any:
    """KL(N(mu_p, var_p) ‖ N(mu_q, var_q)) = ½[log(var_q/var_p) + (var_p + (mu_p − mu_q)²)/var_q − 1]."""
    return 0.5 * (_log(var_q / var_p) + (var_p + (mu_p - mu_q) ** 2) / var_q - 1.0)


def gaussian_sym_kl(mu_p: Any, var_p: Any, mu_q: Any, var_q: Any) -> Any:
    """Jeffreys divergence KL(p‖q) + KL(q‖p) of two Gaussians (the sum, not the average)."""
    d2 = (mu_p - mu_q) ** 2
    return 0.5 * ((var_p + d2) / var_q + (var_q + d2) / var_p) - 1.0


def gaussian_w2(mu_p: Any, var_p: Any, mu_q: Any, var_q: Any) -> Any:
    """2-Wasserstein distance of two 1-D Gaussians: sqrt((mu_p − mu_q)² + (σ_p − σ_q)²)."""
    return _sqrt((mu_p - mu_q) ** 2 + (_sqrt(var_p) - _sqrt(var_q)) ** 2)


def quantile_w1(q_p: Any, q_q: Any, axis: int = -1) -> Any:
    """W1 on a quantile grid: mean over the levels (``axis``) of |Q_p(q) − Q_q(q)|."""
    diff = _abs(q_p - q_q)
    return diff.mean(dim=axis) if isinstance(diff, torch.Tensor) else np.mean(diff, axis=axis)


# ---------------------------------------------------------------------- frame plumbing
def quantile_stats(present: set[str]) -> dict[float, str]:
    """Quantile statistics among ``present`` names: {level: name}, sorted by level."""
    out: dict[float, str] = {}
    for n in present:
        if n.startswith("q"):
            try:
                out[float(n[1:])] = n
            except ValueError:
                continue
    return dict(sorted(out.items()))


def _needed_stats(frame: pd.DataFrame, measure: str, levels: Sequence[float] | None) -> list[str]:
    """Statistic names ``measure`` needs, checked against the frame (DriftError if missing)."""
    if measure not in MEASURES:
        raise DriftError(f"unknown drift measure {measure!r}; choose from {list(MEASURES)}")
    present = {str(v) for v in pd.unique(frame["stat"])}
    if measure == "w1":
        qs = quantile_stats(present)
        if levels is not None:
            want = {float(q): f"q{float(q):g}" for q in levels}
            missing = [n for n in want.values() if n not in present]
            if missing:
                raise DriftError(
                    f"w1 needs quantile statistics {missing}; the frame has {sorted(qs.values())}; "
                    f"record with stats=['quantiles'], quantiles={sorted(want)}"
                )
            return list(want.values())
        if not qs:
            raise DriftError(
                "w1 needs quantile statistics q... (e.g. q0.15, q0.5, q0.85); the frame has "
                f"{sorted(present)}; record with stats=['quantiles']"
            )
        return list(qs.values())
    need = ["mean", "var"]
    missing = [s for s in need if s not in present]
    if missing:
        raise DriftError(
            f"{measure} needs statistics {need} but the frame lacks {missing} (it has {sorted(present)}); "
            "record with stats=['mean', 'var']"
        )
    return need


def _id_columns(frame: pd.DataFrame) -> list[str]:
    """Grouping ids of a stats frame: every column except step, stat, unit, value."""
    missing = [c for c in _CORE if c not in frame.columns]
    if missing:
        raise DriftError(
            f"not a recorded-statistics frame: missing column(s) {missing}; expected at least "
            "step, layer, stat, unit, value (Recorder.to_frame() or icsk.load_run())"
        )
    return [c for c in frame.columns if c not in _CORE]


def _wide(frame: pd.DataFrame, ids: list[str], stats: list[str]) -> pd.DataFrame:
    """One row per (ids, step, unit), one float64 column per needed statistic."""
    key = [*ids, "step", "unit"]
    sel = frame.loc[frame["stat"].isin(stats) & (frame["unit"] >= 0), [*key, "stat", "value"]]
    parts = []
    for s in stats:  # one indexed column per statistic, aligned by concat: much faster than pivot
        part = sel.loc[sel["stat"] == s, [*key, "value"]].set_index(key)["value"].astype(np.float64).rename(s)
        if not part.index.is_unique:
            raise DriftError(
                f"the frame has several rows per ({', '.join([*key, 'stat'])}); keep the column that "
                "tells them apart (arm, seed, mode ...) or filter the frame first"
            )
        parts.append(part)
    wide = pd.concat(parts, axis=1) if len(parts) > 1 else parts[0].to_frame()
    return wide.reset_index()


def _ref_steps(steps: pd.DataFrame, ids: list[str], ref: str | int) -> pd.Series:
    """Reference step of each (ids, step) row of ``steps`` (NaN where it has none)."""
    st = steps["step"]
    if isinstance(ref, (int, np.integer)) and not isinstance(ref, bool):
        ref = int(ref)
        has = (st == ref).groupby([steps[c] for c in ids], observed=True, dropna=False).transform("any") if ids else (
            pd.Series(bool((st == ref).any()), index=steps.index)
        )
        if not has.all():
            bad = steps.loc[~has, ids].drop_duplicates().head(5).to_dict("records") if ids else []
            raise DriftError(
                f"reference step {ref} was not recorded" + (f" for {bad}" if bad else "")
                + f"; recorded steps include {[int(v) for v in sorted(st.unique())[:10]]}"
            )
        return pd.Series(float(ref), index=steps.index)
    if ref not in REFS:
        raise DriftError(f"ref must be one of {list(REFS)} or an int step, got {ref!r}")
    grouped = st.groupby([steps[c] for c in ids], observed=True, dropna=False, sort=False) if ids else None
    if ref == "previous":
        return (grouped.shift(1) if ids else st.shift(1)).astype(np.float64)
    fn = "min" if ref == "first" else "max"
    return (grouped.transform(fn) if ids else pd.Series(getattr(st, fn)(), index=steps.index)).astype(np.float64)


def _compute(measure: str, cur: pd.DataFrame, ref: pd.DataFrame, stats: list[str]) -> np.ndarray:
    """The measure, vectorised over aligned current/reference rows."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if measure == "w1":
            return quantile_w1(cur[stats].to_numpy(), ref[stats].to_numpy(), axis=1)
        mu, var = cur["mean"].to_numpy(), cur["var"].to_numpy()
        mu_r, var_r = ref["mean"].to_numpy(), ref["var"].to_numpy()
        if measure == "mean_shift":
            return mean_shift(mu, mu_r, var_r)
        if measure == "kl":
            return gaussian_kl(mu, var, mu_r, var_r)
        if measure == "sym_kl":
            return gaussian_sym_kl(mu, var, mu_r, var_r)
        return gaussian_w2(mu, var, mu_r, var_r)


# ---------------------------------------------------------------------- public API
def drift(
    frame: pd.DataFrame,
    measure: str = "w2",
    ref: str | int = "previous",
    *,
    levels: Sequence[float] | None = None,
) -> pd.DataFrame:
    """Per-unit drift of each recorded step against its reference step.

    ``ref``: ``"previous"`` (the previous recorded step of the same id group), ``"first"``,
    ``"last"``, or an int step. ``levels`` restricts ``w1`` to some quantile levels (default:
    every ``q...`` statistic in the frame). Returns columns ``ids..., step, unit, value``, one row
    per unit and step; the reference step itself (and a group's first step for "previous") is
    left out."""
    ids = _id_columns(frame)
    stats = _needed_stats(frame, measure, levels)
    wide = _wide(frame, ids, stats)
    steps = wide[[*ids, "step"]].drop_duplicates().sort_values([*ids, "step"], kind="stable").reset_index(drop=True)
    steps["_ref"] = _ref_steps(steps, ids, ref).to_numpy()
    steps = steps[steps["_ref"].notna() & (steps["_ref"] != steps["step"])]
    steps = steps.assign(_ref=steps["_ref"].astype(np.int64))
    cur = wide.merge(steps, on=[*ids, "step"], how="inner", sort=False)
    refw = wide.rename(columns={"step": "_ref", **{s: f"_r_{s}" for s in stats}})
    both = cur.merge(refw, on=[*ids, "_ref", "unit"], how="inner", sort=False)
    value = _compute(measure, both[stats], both[[f"_r_{s}" for s in stats]].set_axis(stats, axis=1), stats)
    out = both[[*ids, "step", "unit"]].assign(value=value)
    return out.sort_values([*ids, "step", "unit"], kind="stable").reset_index(drop=True)


def layer_drift(
    frame: pd.DataFrame,
    measure: str = "w2",
    ref: str | int = "previous",
    agg: Sequence[str] = ("mean", "median"),
    *,
    levels: Sequence[float] | None = None,
) -> pd.DataFrame:
    """Per-layer (per id group) aggregate over units of :func:`drift`.

    Returns columns ``ids..., step, measure``, one column per ``agg`` (any pandas
    aggregation name: ``mean``, ``median``, ``max``, ``std`` ...), then ``units`` and ``nonfinite``.
    The aggregates cover the units whose drift is finite (``units`` of them); ``nonfinite``
    counts the units left out (NaN or ±inf). A dead unit (variance 0 at both steps) has no
    σ-normalised drift (0/0), and one whose reference variance is 0 an infinite one; one such
    unit would otherwise blank its whole layer. A layer-step with no finite unit aggregates to NaN."""
    agg = [agg] if isinstance(agg, str) else list(agg)
    d = drift(frame, measure, ref, levels=levels)
    ids = [c for c in d.columns if c not in ("step", "unit", "value")]
    keys = [*ids, "step"]
    finite = np.isfinite(d["value"].to_numpy(dtype=np.float64))
    d = d.assign(value=d["value"].where(finite), _nonfinite=~finite)
    grouped = d.groupby(keys, observed=True, dropna=False, sort=True)
    out = grouped["value"].agg(agg)
    out["units"] = grouped["value"].count()
    out["nonfinite"] = grouped["_nonfinite"].sum().astype(np.int64)
    out = out.reset_index()
    out.insert(len(keys), "measure", measure)
    return out


def drift_series(
    frame: pd.DataFrame,
    measure: str | Sequence[str] = "w2",
    ref: str | int = "previous",
    agg: str = "mean",
    *,
    levels: Sequence[float] | None = None,
) -> pd.DataFrame:
    """Tidy per-layer drift curves for seaborn: ``arm`` (if present), ``layer``, other ids,
    ``step``, ``measure``, ``value`` (the ``agg`` over units); several measures stack as rows."""
    measures = [measure] if isinstance(measure, str) else list(measure)
    parts = []
    for m in measures:
        ld = layer_drift(frame, m, ref, agg=(agg,), levels=levels if m == "w1" else None)
        parts.append(ld.drop(columns=["units", "nonfinite"]).rename(columns={agg: "value"}))
    out = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    ids = [c for c in out.columns if c not in ("step", "measure", "value")]
    front = [c for c in ("arm", "layer") if c in ids]
    cols = [*front, *[c for c in ids if c not in front], "step", "measure", "value"]
    return out[cols]
