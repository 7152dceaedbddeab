"""Drift measures: per-pair helpers against closed forms / numerical integrals, frame plumbing
against a slow per-row reference, ids (arm, seed, layer), reference steps, error messages."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import integrate, stats
from torch import nn
from torch.testing import assert_close

import icsk
from icsk.metrics import (
    MEASURES,
    DriftError,
    drift,
    drift_series,
    gaussian_kl,
    gaussian_sym_kl,
    gaussian_w2,
    layer_drift,
    mean_shift,
    quantile_w1,
)

def vec(x) -> torch.Tensor:
    """float64 tensor copy of array-like values (pandas may hand out read-only arrays)."""
    return torch.tensor(np.array(x, dtype=np.float64))


PAIRS = [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -1.2, 2.0), (2.0, 4.0, 1.0, 0.25), (-0.7, 1.3, 0.4, 1.3)]


def kl_integral(m1: float, v1: float, m2: float, v2: float) -> float:
    """KL(N1 ‖ N2) by numerical integration of p log(p/q)."""
    p, q = stats.norm(m1, math.sqrt(v1)), stats.norm(m2, math.sqrt(v2))
    f = lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x))  # noqa: E731
    return integrate.quad(f, -np.inf, np.inf, epsabs=1e-12, epsrel=1e-10)[0]


def w2_integral(m1: float, v1: float, m2: float, v2: float) -> float:
    """W2 of two 1-D laws = sqrt(∫₀¹ (Q1(u) − Q2(u))² du), integrated numerically."""
    p, q = stats.norm(m1, math.sqrt(v1)), stats.norm(m2, math.sqrt(v2))
    return math.sqrt(integrate.quad(lambda u: (p.ppf(u) - q.ppf(u)) ** 2, 0, 1, limit=200)[0])


@pytest.mark.parametrize("pair", PAIRS)
def test_gaussian_kl_matches_integral(pair):
    assert_close(float(gaussian_kl(*pair)), kl_integral(*pair), atol=1e-8, rtol=1e-7)
    m1, v1, m2, v2 = pair
    assert_close(float(gaussian_sym_kl(*pair)), kl_integral(*pair) + kl_integral(m2, v2, m1, v1), atol=1e-8, rtol=1e-7)


@pytest.mark.parametrize("pair", PAIRS)
def test_gaussian_w2_matches_quantile_integral(pair):
    assert_close(float(gaussian_w2(*pair)), w2_integral(*pair), atol=1e-6, rtol=1e-6)


def test_helpers_vectorise_over_numpy_and_torch():
    a = np.array(PAIRS, dtype=np.float64).T
    t = torch.tensor(a)
    for fn in (gaussian_kl, gaussian_sym_kl, gaussian_w2):
        out_np, out_t = fn(*a), fn(*t)
        assert isinstance(out_t, torch.Tensor) and out_np.shape == (len(PAIRS),)
        assert_close(torch.from_numpy(np.asarray(out_np)), out_t)
    assert_close(float(mean_shift(1.0, 0.5, 0.25)), 1.0)
    assert_close(mean_shift(t[0], t[2], t[3]), torch.from_numpy(np.abs(a[0] - a[2]) / np.sqrt(a[3])))
    assert float(gaussian_kl(0.1, 2.0, 0.1, 2.0)) == 0.0
    assert float(gaussian_w2(0.1, 2.0, 0.1, 2.0)) == 0.0


def test_quantile_w1_shift_and_convergence():
    n = 2000
    levels = (np.arange(n) + 0.5) / n
    base = stats.norm.ppf(levels)
    assert_close(float(quantile_w1(base + 0.37, base)), 0.37)  # a shift by δ: W1 = |δ| at any grid
    # N(0,1) vs N(0,4): W1 = ∫|Q1 − Q2| = E|Z| = sqrt(2/π); a uniform grid converges to it
    assert_close(float(quantile_w1(2 * base, base)), math.sqrt(2 / math.pi), rtol=2e-3, atol=0)


# ---------------------------------------------------------------------- frames
def make_frame(seed: int = 0, steps=(0, 10, 20, 40), units: int = 3, levels=(0.15, 0.5, 0.85)) -> pd.DataFrame:
    """Long frame with arm/layer/seed ids, Gaussian stats per unit and step, plus 'count' rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for arm in ("bn", "none"):
        for layer in ("block1.linear", "block2.linear"):
            for s in steps:
                for u in range(units):
                    mu, sd = rng.normal(), rng.uniform(0.5, 2.0)
                    rows += [(arm, s, layer, "mean", u, mu), (arm, s, layer, "var", u, sd**2)]
                    rows += [(arm, s, layer, f"q{q:g}", u, mu + sd * stats.norm.ppf(q)) for q in levels]
                rows.append((arm, s, layer, "count", -1, 64.0))
    df = pd.DataFrame(rows, columns=["arm", "step", "layer", "stat", "unit", "value"])
    df["value"] = df["value"].astype(np.float32)
    for c in ("arm", "layer", "stat"):
        df[c] = df[c].astype("category")
    return df.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # order must not matter


def slow_reference(df: pd.DataFrame, measure: str, ref) -> pd.DataFrame:
    """Row-by-row reference of drift()."""
    vals = {(r.arm, r.layer, r.step, r.unit, r.stat): float(r.value) for r in df.itertuples()}
    out = []
    for (arm, layer), g in df.groupby(["arm", "layer"], observed=True):
        steps = sorted(g.step.unique())
        for i, s in enumerate(steps):
            r = {"previous": steps[i - 1] if i else None, "first": steps[0], "last": steps[-1]}.get(ref, ref)
            if r is None or r == s:
                continue
            for u in sorted(g.unit[g.unit >= 0].unique()):
                def v(stat, step):
                    return vals[(arm, layer, step, u, stat)]
                if measure == "w1":
                    qs = sorted(st for st in g.stat.astype(str).unique() if st.startswith("q"))
                    val = np.mean([abs(v(q, s) - v(q, r)) for q in qs])
                elif measure == "mean_shift":
                    val = abs(v("mean", s) - v("mean", r)) / math.sqrt(v("var", r))
                else:
                    fn = {"kl": gaussian_kl, "sym_kl": gaussian_sym_kl, "w2": gaussian_w2}[measure]
                    val = fn(v("mean", s), v("var", s), v("mean", r), v("var", r))
                out.append((arm, layer, s, u, float(val)))
    return pd.DataFrame(out, columns=["arm", "layer", "step", "unit", "value"])


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("ref", ["previous", "first", "last", 20])
def test_drift_matches_slow_reference(measure, ref):
    df = make_frame()
    got = drift(df, measure, ref)
    assert list(got.columns) == ["arm", "layer", "step", "unit", "value"]
    want = slow_reference(df, measure, ref)
    got = got.assign(arm=got.arm.astype(str), layer=got.layer.astype(str)).sort_values(["arm", "layer", "step", "unit"])
    want = want.sort_values(["arm", "layer", "step", "unit"])
    assert len(got) == len(want) == 2 * 2 * 3 * 3  # arms x layers x (4 steps - ref) x units
    np.testing.assert_array_equal(got[["step", "unit"]].to_numpy(), want[["step", "unit"]].to_numpy())
    assert_close(vec(got.value), vec(want.value), rtol=1e-12, atol=1e-12)
    if isinstance(ref, int):
        assert ref not in set(got.step)


def test_shift_by_delta_gives_w1_delta_and_mean_shift():
    df = make_frame(steps=(0, 1), units=2)
    sel = (df.step == 1) & df.stat.astype(str).str.startswith("q") | (df.step == 1) & (df.stat == "mean")
    # make step 1 exactly step 0 shifted by δ = 0.25 (same spread)
    base = df[df.step == 0].set_index(["arm", "layer", "stat", "unit"]).value
    key = pd.MultiIndex.from_frame(df.loc[df.step == 1, ["arm", "layer", "stat", "unit"]])
    df.loc[df.step == 1, "value"] = base.reindex(key).to_numpy()
    df.loc[sel, "value"] += np.float32(0.25)
    w1 = drift(df, "w1")
    assert_close(vec(w1.value), torch.full((len(w1),), 0.25, dtype=torch.float64), atol=1e-6, rtol=0)
    w2 = drift(df, "w2")
    assert_close(vec(w2.value), torch.full((len(w2),), 0.25, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (drift(df, "kl").value > 0).all()


def test_w1_levels_subset_and_missing_level_message():
    df = make_frame()
    got = drift(df, "w1", "first", levels=[0.5])
    wide = df[df.stat == "q0.5"].pivot(index=["arm", "layer", "step", "unit"], columns="stat", values="value")
    first = wide.xs(0, level="step")
    cur = wide.drop(0, level="step")
    want = (cur - first.reindex(cur.index.droplevel("step")).to_numpy()).abs()["q0.5"].astype(np.float64)
    assert_close(vec(np.sort(got.value.to_numpy())), vec(np.sort(want.to_numpy())))
    with pytest.raises(DriftError, match=r"q0\.9"):
        drift(df, "w1", levels=[0.5, 0.9])


def test_layer_drift_and_series_shapes():
    df = make_frame()
    ld = layer_drift(df, "kl", "previous")
    assert list(ld.columns) == ["arm", "layer", "step", "measure", "mean", "median", "units", "nonfinite"]
    assert (ld.nonfinite == 0).all() and (ld.units == 3).all()  # 3 units; unit -1 is a layer statistic
    assert (ld.measure == "kl").all() and len(ld) == 2 * 2 * 3
    d = drift(df, "kl", "previous")
    g = d.groupby(["arm", "layer", "step"], observed=True).value
    assert_close(vec(ld["mean"]), vec(g.mean()))
    assert_close(vec(ld["median"]), vec(g.median()))
    ser = drift_series(df, ["w2", "mean_shift"], ref="first")
    assert list(ser.columns) == ["arm", "layer", "step", "measure", "value"]
    assert set(ser.measure) == {"w2", "mean_shift"} and len(ser) == 2 * 2 * 2 * 3
    assert not ser.value.isna().any()


@pytest.mark.parametrize("measure", ["mean_shift", "kl", "sym_kl", "w2"])
def test_layer_drift_leaves_out_units_without_a_finite_drift_and_counts_them(measure):
    """A dead unit (var 0 at both steps: 0/0) and one whose reference var is 0 (inf) must not blank the layer."""
    mu = {0: [0.0, 0.5, 1.0, 0.0, 2.0], 1: [0.0, 0.7, 1.2, 0.3, np.nan]}
    var = {0: [0.0, 1.0, 2.0, 0.0, 1.0], 1: [0.0, 1.1, 1.5, 0.4, np.nan]}
    rows = [(s, "L", st, u, v) for s in (0, 1) for st, table in (("mean", mu), ("var", var))
            for u, v in enumerate(table[s])]
    df = pd.DataFrame(rows, columns=["step", "layer", "stat", "unit", "value"])
    per_unit = drift(df, measure, "previous").set_index("unit").value.to_numpy()
    ok = np.isfinite(per_unit)
    ld = layer_drift(df, measure, "previous", agg=("mean", "max"))
    assert len(ld) == 1
    assert int(ld.units[0]) == ok.sum() and int(ld.nonfinite[0]) == (~ok).sum() and ok.sum() >= 2
    assert (~ok).sum() >= (1 if measure == "w2" else 2)  # w2 needs no division: only the NaN unit
    assert_close(float(ld["mean"][0]), float(per_unit[ok].mean()))
    assert_close(float(ld["max"][0]), float(per_unit[ok].max()))
    all_bad = df[df.unit.isin(np.flatnonzero(~ok))]
    out = layer_drift(all_bad, measure, "previous")
    assert np.isnan(out["mean"][0]) and int(out.units[0]) == 0


def test_extra_ids_are_kept_apart():
    a, b = make_frame(seed=1), make_frame(seed=2)
    both = pd.concat([a.assign(seed=1), b.assign(seed=2)], ignore_index=True)
    got = drift(both, "w2")
    assert list(got.columns) == ["arm", "layer", "seed", "step", "unit", "value"]
    one = drift(a, "w2")
    assert_close(vec(got[got.seed == 1].value), vec(one.value))
    ser = drift_series(both, "w2")
    assert list(ser.columns) == ["arm", "layer", "seed", "step", "measure", "value"]
    # frame without ids beyond step/unit works too
    single = a[(a.arm == "bn") & (a.layer == "block1.linear")].drop(columns=["arm", "layer"])
    assert list(drift(single, "kl").columns) == ["step", "unit", "value"]


def test_errors_name_the_fix():
    df = make_frame()
    with pytest.raises(DriftError, match=r"w1 needs quantile statistics q.*stats=\['quantiles'\]"):
        drift(df[~df.stat.astype(str).str.startswith("q")], "w1")
    with pytest.raises(DriftError, match=r"kl needs statistics \['mean', 'var'\].*lacks \['var'\]"):
        drift(df[df.stat != "var"], "kl")
    with pytest.raises(DriftError, match="unknown drift measure"):
        drift(df, "hellinger")
    with pytest.raises(DriftError, match=r"reference step 5 was not recorded.*recorded steps include \[0, 1"):
        drift(df, "w2", ref=5)  # plain numbers, not [np.int64(0), ...]
    with pytest.raises(DriftError, match="ref must be"):
        drift(df, "w2", ref="middle")
    with pytest.raises(DriftError, match="missing column"):
        drift(df.drop(columns="unit"), "w2")
    with pytest.raises(DriftError, match="several rows"):
        drift(df.drop(columns="arm"), "w2")


def test_drift_on_a_recorder_frame():
    """End to end on the Recorder's own frame (categorical columns, count rows, float32)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    acts = []
    model[0].register_forward_hook(lambda m, i, o: acts.append(o.detach().double().numpy()))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with icsk.Recorder(model, layers=["0"], stats=["mean", "var", "quantiles"], quantiles=[0.25, 0.5, 0.75]) as rec:
        for _ in range(3):
            loss = model(torch.randn(50, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step()
    df = rec.to_frame()
    got = drift(df, "w2", "first")
    a0, a2 = acts[0], acts[2]
    want = np.sqrt((a2.mean(0) - a0.mean(0)) ** 2 + (a2.std(0, ddof=1) - a0.std(0, ddof=1)) ** 2)
    assert_close(vec(got[got.step == 2].value), vec(want), rtol=1e-5, atol=1e-6)
    w1 = drift(df, "w1", "first")
    qs = [0.25, 0.5, 0.75]
    want1 = np.abs(np.quantile(a2, qs, axis=0) - np.quantile(a0, qs, axis=0)).mean(0)
    assert_close(vec(w1[w1.step == 2].value), vec(want1), rtol=1e-5, atol=1e-6)
