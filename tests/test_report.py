"""Tests of icsk.report: every figure kind from tiny run folders written by the real writers."""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch import nn  # noqa: E402

import icsk  # noqa: E402
from icsk.report import build_report, collect_runs, figures  # noqa: E402
from icsk.report.cli import main  # noqa: E402
from icsk.report.figures import FIGURE_NAMES, MissingDataError  # noqa: E402
from icsk.report.loading import Run, RunSet  # noqa: E402
from icsk.store import MetricsWriter, write_json_atomic  # noqa: E402

STEPS = 24
LAYERS = ["block1.pre_act", "block2.pre_act", "block1.linear", "block2.linear"]


# ---------------------------------------------------------------------- tiny run folders
class Block(nn.Module):
    def __init__(self, d_in: int, d_out: int, norm: str):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=norm != "bn")
        self.norm = nn.BatchNorm1d(d_out) if norm == "bn" else nn.Identity()
        self.pre_act = nn.Identity()
        self.act = nn.Sigmoid()

    def forward(self, x):
        return self.act(self.pre_act(self.norm(self.linear(x))))


def tiny_net(norm: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(block1=Block(6, 8, norm), block2=Block(8, 8, norm), head=nn.Linear(8, 3)))


def make_run(run_dir: Path, *, seed: int = 0, lr: float = 0.5, arms=("bn", "none"), diverge: dict | None = None,
             hist: bool = True, metrics: bool = True, extra_metrics: bool = True, stats=None,
             config: dict | None = None, quantiles=(0.15, 0.5, 0.85)) -> Path:
    """A paired run folder: config.yaml (``config`` merged in), run.json, arms/<arm>/stats (Recorder), metrics/."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: thread start-up and contention cost more than the maths
    try:
        return _make_run(run_dir, seed=seed, lr=lr, arms=arms, diverge=diverge or {}, hist=hist, metrics=metrics,
                         extra_metrics=extra_metrics, stats=stats, config=config or {}, quantiles=quantiles)
    finally:
        torch.set_num_threads(threads)


def _make_run(run_dir: Path, *, seed, lr, arms, diverge, hist, metrics, extra_metrics, stats, config, quantiles) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = {"name": "tiny", "seed": seed, "model": {"name": "mlp", "arms": list(arms), "init_scale": 1.0},
           "data": {"name": "synthetic", "batch_size": 32}, "optim": {"name": "sgd", "lr": lr},
           "train": {"steps": STEPS}}
    OmegaConf.save(OmegaConf.merge(cfg, config), run_dir / "config.yaml")
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(STEPS, 32, 6, generator=g) * 2 + 1
    w_true = torch.randn(6, 3, generator=g)
    mw = MetricsWriter(run_dir) if metrics else None
    state = {}
    stats = stats or (["mean", "var", "quantiles", "hist"] if hist else ["mean", "var", "quantiles"])
    for arm in arms:
        net = tiny_net(arm)
        last = STEPS - 1
        with icsk.Recorder(net, layers=LAYERS, stats=stats, hist_bins=12, quantiles=quantiles,
                           path=run_dir / "arms" / arm) as rec:
            for t in range(STEPS):
                if arm in diverge and t > diverge[arm]:
                    break
                x = xs[t]
                y = (x @ w_true).argmax(1)
                if diverge.get(arm) == t:  # the blow-up step: non-finite activations reach the stats
                    with torch.no_grad():
                        net.block1.linear.weight.mul_(float("inf"))
                out = net(x)
                loss = nn.functional.cross_entropy(out, y)
                net.zero_grad()
                loss.backward()
                with torch.no_grad():  # plain SGD (torch.optim imports torch._dynamo: seconds)
                    for p in net.parameters():
                        p -= lr * p.grad
                loss = float(loss.detach())
                rec.step()
                last = t
                if mw is None:
                    continue
                acc = float((out.argmax(1) == y).float().mean())
                mw.log(t, arm, {"loss": loss, "acc": acc, "lr": lr})
                if t % 4 == 0 or t == STEPS - 1:
                    mw.log(t, arm, {"test_loss": loss * 1.1, "test_acc": min(1.0, acc * 0.9 + 0.05 * seed)})
                if extra_metrics and t % 3 == 0:
                    mw.log(t, arm, {"ics_l2": 0.0, "ics_cos": 1.0, "ics_grad_norm": 2.0}, layer="block1.linear")
                    mw.log(t, arm, {"ics_l2": 1.0 / (t + 2), "ics_cos": 0.9 - 0.01 * t, "ics_grad_norm": 2.0},
                           layer="block2.linear")  # the first layer's G' is G: l2 0, cos 1, as the probe gives
                    mw.log(t, arm, {"smooth_loss_min": loss * 0.9, "smooth_loss_max": loss * 1.3,
                                    "smooth_grad_change_min": 0.1, "smooth_grad_change_max": 0.5 + 0.01 * t,
                                    "smooth_beta": 3.0 + (arm == "none") * 2, "smooth_loss": loss})
                    if arm == "bn":
                        mw.log(t, arm, {"bngap_mean_shift": 0.1, "bngap_var_ratio": 1.0, "bngap_w2": 0.05},
                               layer="block1.norm")
        if mw is not None and arm in diverge:
            mw.log(diverge[arm], arm, {"diverged": 1.0})
        state[arm] = {"status": "diverged" if arm in diverge else "finished",
                      "diverged_step": diverge.get(arm), "last_step": last}
    if mw is not None:
        mw.flush()
    write_json_atomic(run_dir / "run.json", {"status": "finished", "arms": state})
    return run_dir


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """Hydra-like multirun folder: 2 lrs x 2 seeds; the no-norm arm of one high-lr run diverged."""
    root = tmp_path_factory.mktemp("sweep") / "multirun" / "2025-01-01" / "12-00-00"
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    job = 0
    for lr in (0.05, 0.5):
        for seed in (0, 1):
            div = {"none": 15} if (lr == 0.5 and seed == 1) else None
            make_run(root / str(job), seed=seed, lr=lr, diverge=div)
            job += 1
    (root / "sweep_summary.csv").write_text("job,overrides,status\n0,optim.lr=0.05 seed=0,finished\n")
    return root


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("single") / "run")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def runs(sweep_dir):
    return collect_runs([sweep_dir])


# ---------------------------------------------------------------------- loading
def test_bookkeeping_keys_are_not_swept_parameters():
    """A resumed run, or one that downloaded its data or checkpointed more often, is a sibling of
    the others, not a point of a sweep; a real difference still is."""
    base = {"name": "x", "seed": 0, "optim.lr": 0.1, "resume": False, "data.download": False,
            "train.checkpoint_every": 1000, "train.eval_batch_size": 1000}
    other = {**base, "seed": 1, "resume": True, "data.download": True, "train.checkpoint_every": 0,
             "train.eval_batch_size": 500}
    assert RunSet([Run(None, "0", base), Run(None, "1", other)]).varying_keys() == []
    assert RunSet([Run(None, "0", base), Run(None, "1", {**other, "optim.lr": 0.5})]).varying_keys() == ["optim.lr"]


def test_keys_that_follow_from_a_swept_key_are_not_swept_on_their_own():
    """model=mlp,vgg changes the model's other keys with its name; a key crossed with it stays."""
    mlp = {"model.name": "mlp", "model.depth": 3, "model.width": 100}
    vgg = {"model.name": "vgg", "model.variant": "vgg_small"}
    grid = [Run(None, str(i), {**m, "optim.lr": lr, "seed": s})
            for i, (m, lr, s) in enumerate((m, lr, s) for m in (mlp, vgg) for lr in (0.1, 1.0) for s in (0, 1))]
    rs = RunSet(grid)
    assert rs.varying_keys() == ["model.depth", "model.name", "model.variant", "model.width", "optim.lr"]
    assert rs.swept_keys() == ["model.name", "optim.lr"]
    # lr set per model (a tuned lr each): it follows from the model too
    assert RunSet([r for r in grid if (r.config["model.name"] == "mlp") == (r.config["optim.lr"] == 0.1)]
                  ).swept_keys() == ["model.name"]
    # without a name key, the key with more values is kept: width 50/100/200 sets depth 2/2/3
    widths = [Run(None, str(i), {"model.width": w, "model.depth": 2 + (w > 100)}) for i, w in enumerate((50, 100, 200))]
    assert RunSet(widths).swept_keys() == ["model.width"]


def test_collect_sweep_runs_and_config_columns(sweep_dir, runs):
    assert [r.run_id for r in runs] == ["0", "1", "2", "3"]
    assert runs.arms == ["none", "bn"]
    assert runs.varying_keys() == ["optim.lr"]
    assert [g.label for g in runs.groups()] == ["optim.lr=0.05", "optim.lr=0.5"]
    m = runs.metrics(["test_acc"])
    assert {"run", "seed", "arm", "optim.lr", "step", "value"} <= set(m.columns)
    assert sorted(m["optim.lr"].unique()) == [0.05, 0.5]
    div = runs.divergence()
    bad = div[div["status"] == "diverged"]
    assert bad[["run", "arm", "diverged_step"]].values.tolist() == [["3", "none", 15]]
    # the sweep is found from two levels above it too
    assert len(collect_runs([sweep_dir.parent.parent])) == 4
    assert len(runs.where({"optim.lr": "0.5"})) == 2


def test_single_recorder_folder_is_a_run(tmp_path):
    net = tiny_net("none")
    with icsk.Recorder(net, layers=["block2.pre_act"], stats=["mean", "var", "quantiles"], path=tmp_path / "r") as rec:
        for _ in range(3):
            net(torch.randn(16, 6))
            rec.step()
    rs = collect_runs([tmp_path / "r"])
    assert rs.arms == ["run"]
    fig = figures.fig_ioffe(rs)  # no metrics: percentile panel only
    assert [ax.get_title() for ax in fig.axes] == ["(a) arm run"]


# ---------------------------------------------------------------------- aggregation numbers
def test_aggregate_band_is_t_interval_or_sd():
    import pandas as pd

    vals = {"a": [1.0, 2.0, 4.0], "b": [1.0, 3.0]}
    rows = [{"arm": "x", "run": f"r{i}", "step": 0, "value": v} for i, v in enumerate(vals["a"])]
    agg = figures.aggregate(pd.DataFrame(rows), [])
    sd = np.std(vals["a"], ddof=1)
    half = 4.303 * sd / math.sqrt(3)  # t_{0.975, 2}
    assert agg["mean"].item() == pytest.approx(7 / 3)
    assert (agg["hi"] - agg["mean"]).item() == pytest.approx(half, rel=1e-3)
    rows = [{"arm": "x", "run": f"r{i}", "step": 0, "value": v} for i, v in enumerate(vals["b"])]
    agg = figures.aggregate(pd.DataFrame(rows), [])
    assert (agg["hi"] - agg["lo"]).item() == pytest.approx(2 * np.std(vals["b"], ddof=1))
    assert figures.band_kind(1) == "none" and figures.band_kind(2) == "± sd" and figures.band_kind(5) == "95% CI"


def test_final_metrics_and_divergence(runs, sweep_dir):
    fin = figures.final_metrics(runs)
    assert len(fin) == 8
    for r in runs:
        m = icsk.load_run(r.path, table="metrics")
        for arm in ("bn", "none"):
            t = m[(m.arm == arm) & (m.metric == "test_acc")].sort_values("step")
            got = fin[(fin.run == r.run_id) & (fin.arm == arm)]["final"].item()
            assert got == pytest.approx(t["value"].iloc[-1])
    assert fin["diverged"].sum() == 1
    assert fin.loc[fin["diverged"], "run"].item() == "3"


def test_ioffe_spread_matches_recorded_quantiles(runs):
    g = runs.where({"optim.lr": "0.05"})
    sp = figures.ioffe_spread(g, "block2.pre_act", 1).set_index("arm")
    per = []
    for r in g:
        st = icsk.load_run(r.path, layers=["block2.pre_act"], stats=["q0.15", "q0.85"])
        st = st[(st.unit == 1) & (st.arm == "bn")]
        w = st.pivot_table(index="step", columns="stat", values="value", observed=True)
        per.append((w["q0.85"] - w["q0.15"]).iloc[[0, -1]].to_numpy())
    start, end = np.mean(per, axis=0)
    assert sp.loc["bn", "spread_start"] == pytest.approx(start, rel=1e-5)
    assert sp.loc["bn", "spread_end"] == pytest.approx(end, rel=1e-5)


def test_ioffe_spread_of_an_arm_that_diverged_at_once_is_nan_not_stable(tmp_path):
    """One finite step (the arm blew up at step 1): first and last step are the same row, which
    read as 'spread ratio 1, no median shift', the opposite of what happened."""
    make_run(tmp_path / "r", diverge={"none": 1})
    sp = figures.ioffe_spread(collect_runs([tmp_path / "r"]), "block2.pre_act", 1).set_index("arm")
    assert sp.loc["none", "seeds"] == 0
    assert sp.loc["none", ["spread_start", "spread_end", "spread_ratio", "median_shift"]].isna().all()
    assert sp.loc["bn", "seeds"] == 1 and np.isfinite(sp.loc["bn", "spread_ratio"])


def test_w1_drift_uses_the_quantile_levels_the_run_recorded(tmp_path):
    """A run recorded with quantiles=(0.1, 0.5, 0.9): the report's w1 is icsk.metrics.drift's on
    those levels (it said no run had quantiles, looking for q0.15/q0.85 only)."""
    make_run(tmp_path / "r", quantiles=(0.1, 0.5, 0.9), hist=False)
    rs = collect_runs([tmp_path / "r"])
    d = figures.drift_frame(rs, "w1")
    st = icsk.load_run(tmp_path / "r", layers=["block2.pre_act"])
    want = icsk.metrics.drift(st[st.stat.isin(["q0.1", "q0.5", "q0.9"])], "w1")
    want = want.groupby(["arm", "step"], observed=True)["value"].mean()
    got = d[d.layer == "block2.pre_act"].set_index(["arm", "step"])["mean"]
    np.testing.assert_allclose(got.sort_index().to_numpy(), want.sort_index().to_numpy(), rtol=1e-6)


def test_hist_density_mass_matches_inside_fraction(runs):
    per_arm = figures.hist_density(runs.where({"optim.lr": "0.5"}), "block2.pre_act")
    for _arm, hd in per_arm.items():
        mass = (hd.density.to_numpy() * np.diff(hd.grid)[None, :]).sum(axis=1)
        np.testing.assert_allclose(mass + hd.under.to_numpy() + hd.over.to_numpy(), 1.0, atol=1e-6)


# ---------------------------------------------------------------------- figure functions
def _titles(fig):
    return [ax.get_title() for ax in fig.axes if ax.get_visible()]


def test_fig_ioffe_panels(runs):
    g = runs.where({"optim.lr": "0.5"})
    fig = figures.fig_ioffe(g)
    assert _titles(fig) == ["(a) test accuracy", "(b) without BN", "(c) with BN"]
    assert [ax.get_xlabel() for ax in fig.axes] == ["step"] * 3
    assert fig.axes[0].get_ylabel() == "test accuracy"
    assert fig.axes[1].get_ylabel() == "block2.pre_act[0]"  # default: last block*.pre_act
    # band between q0.15 and q0.85 shaded; median line drawn
    assert len(fig.axes[1].collections) >= 1 and len(fig.axes[1].lines) == 3
    fig = figures.fig_ioffe(g, layer="block1.pre_act", unit=3)
    assert fig.axes[1].get_ylabel() == "block1.pre_act[3]"
    with pytest.raises(MissingDataError, match="unit 99"):
        figures.fig_ioffe(g, unit=99)
    with pytest.raises(MissingDataError, match="layers with them"):
        figures.fig_ioffe(g, layer="head")


def test_fig_drift(runs):
    g = runs.where({"optim.lr": "0.05"})
    d = figures.drift_frame(g, "w2")
    assert set(d["layer"]) == set(LAYERS) and set(d["arm"]) == {"bn", "none"}
    fig = figures.fig_drift_heatmap(g, "w2", drift=d)
    assert _titles(fig)[:2] == ["without BN", "with BN"]
    assert len(fig.axes) == 3  # two panels + colour bar
    assert "W2" in fig.axes[2].get_ylabel()
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == sorted(LAYERS, key=lambda s: (s[5], s))
    fig = figures.fig_drift_curves(g, "w1")
    assert sorted(_titles(fig)) == sorted(LAYERS)
    assert fig.axes[0].get_ylabel() == "W1 drift"


def test_fig_ics_smoothness(runs):
    fig = figures.fig_ics(runs)
    assert len(fig.axes) == 4
    assert _titles(fig)[:2] == ["block1.linear", "block2.linear"]
    assert fig.axes[0].get_ylabel().startswith("‖G") and fig.axes[2].get_ylabel().startswith("cos")
    fig = figures.fig_smoothness(runs)
    assert _titles(fig) == ["(a) loss landscape", "(b) gradient predictiveness", "(c) effective β-smoothness"]


def test_fig_sweep_marks_divergence(runs):
    fig = figures.fig_sweep(runs)
    top, bottom = fig.axes[:2]
    assert top.get_ylabel() == "final test accuracy" and bottom.get_ylabel() == "fraction diverged"
    assert "optim.lr" in bottom.get_xlabel() and top.get_xscale() == "log" and bottom.get_xscale() == "log"
    assert [t.get_text() for t in top.get_xticklabels()] == ["0.05", "0.5"]
    from matplotlib.collections import PathCollection

    from icsk.report.style import arm_color

    fracs = {line.get_color(): line.get_ydata().tolist() for line in bottom.lines}
    assert fracs[arm_color("none")] == [0.0, 0.5] and fracs[arm_color("bn")] == [0.0, 0.0]
    markers = [c for c in top.collections if isinstance(c, PathCollection) and len(c.get_offsets())
               and c.get_sizes()[0] == 28]
    assert len(markers) == 1  # the one diverged run, as an x


@pytest.fixture(scope="module")
def model_grid(tmp_path_factory) -> Path:
    """Multirun over two models (2 seeds each): model.depth and model.width are the MLP's keys, None for
    the CNN; model.variant is the CNN's, None for the MLP. The no-norm arm of the last CNN run diverged."""
    root = tmp_path_factory.mktemp("models") / "multirun"
    root.mkdir()
    models = [{"name": "mlp", "depth": 3, "width": 8}] * 2 + [{"name": "vgg", "variant": "vgg_tiny"}] * 2
    for job, model in enumerate(models):
        make_run(root / str(job), seed=job, hist=False, extra_metrics=False, config={"model": model},
                 diverge={"none": 15} if job == 3 else None)
    return root


def test_sweep_over_two_models_keeps_the_keys_one_model_lacks(model_grid, tmp_path):
    """A key that is None for some runs is a setting: figure, seed count and summary keep those runs.
    The figure draws one row, for model.name, unless asked for the keys that follow from it."""
    from icsk.report.style import arm_color

    runs = collect_runs([model_grid])
    keys = ["model.depth", "model.name", "model.variant", "model.width"]
    assert runs.varying_keys() == keys
    assert [g.label for g in runs.groups()] == ["model.name=mlp", "model.name=vgg"]
    assert [ax.get_xlabel() for ax in figures.fig_sweep(runs).axes] == [figures.KEY_LABELS.get("model.name",
                                                                                               "model.name")] * 2
    final = {}  # (model, arm) -> final test accuracies, read from the metrics files
    for r in runs:
        m = icsk.load_run(r.path, table="metrics")
        for arm in ("bn", "none"):
            t = m[(m.arm == arm) & (m.metric == "test_acc")].sort_values("step")
            final.setdefault((r.config["model.name"], arm), []).append(t["value"].iloc[-1])
    fig = figures.fig_sweep(runs, keys)
    assert [fig.axes[2 * j].get_xlabel() for j in range(4)] == [figures.KEY_LABELS.get(k, k) for k in keys]
    for j, ticks in enumerate([["3", "None"], ["mlp", "vgg"], ["None", "vgg_tiny"], ["8", "None"]]):
        ax, axd = fig.axes[2 * j], fig.axes[2 * j + 1]
        assert [t.get_text() for t in ax.get_xticklabels()] == ticks
        means = {line.get_color(): line.get_ydata().tolist() for line in ax.lines if line.get_marker() == "o"}
        for arm in ("bn", "none"):  # each row: the MLP's runs at x = 0, the CNN's at x = 1
            assert means[arm_color(arm)] == pytest.approx([np.mean(final[(m, arm)]) for m in ("mlp", "vgg")])
        fracs = {line.get_color(): line.get_ydata().tolist() for line in axd.lines}
        assert fracs[arm_color("none")] == [0.0, 0.5] and fracs[arm_color("bn")] == [0.0, 0.0]
    rep = build_report(model_grid, out=tmp_path, figures=["sweep"], formats=["png"], log=lambda m: None)
    assert not rep.failed and [(b.kind, b.seeds) for b in rep.figures] == [("sweep", 2)]
    summary = rep.summary.read_text()
    assert "nan" not in summary and "(2 seed(s) per setting)" in summary
    vgg = "model.depth=None, model.name=vgg, model.variant=vgg_tiny, model.width=None"
    mlp = "model.depth=3, model.name=mlp, model.variant=None, model.width=8"
    for setting, model in ((mlp, "mlp"), (vgg, "vgg")):
        mean = float(re.search(rf"\| {setting} \| BN \| ([\d.]+) ± [\d.]+ \| 2 \| 0 \|", summary).group(1))
        assert mean == pytest.approx(np.mean(final[(model, "bn")]), abs=1e-4)
    assert f"| 3 | no norm | 3 | {vgg} | 15 |" in summary


def test_sweep_seed_count_is_per_setting_and_arm(tmp_path):
    """`-m model=mlp,cnn model.norm=bn,none`: one arm per run, so one seed behind each error bar
    (two runs per setting, one per arm)."""
    root = tmp_path / "multirun"
    job = 0
    for model in ({"name": "mlp", "depth": 3, "width": 8}, {"name": "vgg", "variant": "vgg_tiny"}):
        for norm in ("bn", "none"):
            make_run(root / str(job), arms=(norm,), hist=False, extra_metrics=False,
                     config={"model": {**model, "norm": norm}})
            job += 1
    rep = build_report(root, out=tmp_path / "out", figures=["sweep"], formats=["png"], log=lambda m: None)
    assert not rep.failed and [(b.kind, b.seeds) for b in rep.figures] == [("sweep", 1)]
    assert "(1 seed(s) per setting)" in rep.summary.read_text()


def test_fig_hist_evolution(runs):
    g = runs.where({"optim.lr": "0.5"})
    fig = figures.fig_hist_evolution(g)
    assert _titles(fig)[:2] == ["without BN", "with BN"]
    assert fig.axes[0].get_ylabel() == "block2.pre_act (all units)"
    assert "density" in fig.axes[-1].get_ylabel()
    fig = figures.fig_hist_evolution(g, layer="block1.pre_act", unit=2)
    assert fig.axes[0].get_ylabel() == "block1.pre_act (unit 2)"


def test_paper_style_sets_width_and_fonts(runs):
    from icsk.report.style import report_style

    before = dict(matplotlib.rcParams)
    with report_style("neurips2024"):
        assert matplotlib.rcParams["text.usetex"] is False
        assert matplotlib.rcParams["font.serif"][0].startswith("DejaVu")
        fig = figures.fig_smoothness(runs)
        assert fig.get_figwidth() == pytest.approx(5.5, abs=0.01)
    assert matplotlib.rcParams["font.family"] == before["font.family"]
    with pytest.raises(ValueError, match="unknown paper bundle"):
        with report_style("nope2099"):
            pass


# ---------------------------------------------------------------------- whole reports
def _check_png(p: Path):
    from PIL import Image

    assert p.stat().st_size > 5_000, p
    with Image.open(p) as im:
        im.load()
        assert im.width > 300 and im.height > 150
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 50  # not a blank image


def _check_pdf(p: Path):
    from pypdf import PdfReader

    r = PdfReader(str(p))
    assert len(r.pages) == 1 and p.stat().st_size > 2_000
    fonts = [f.get_object() for f in r.pages[0]["/Resources"]["/Font"].values()]
    assert fonts and all("DejaVu" in f["/BaseFont"] and f["/Subtype"] != "/Type3" for f in fonts)


def test_build_report_every_figure(sweep_dir, tmp_path, capsys):
    out = tmp_path / "reports"
    kinds = [k for k in FIGURE_NAMES if k != "sweep"]
    rep = build_report([sweep_dir], out=out, figures=kinds, where={"optim.lr": "0.5"})
    assert rep.out_dir == out / "tiny"  # name from config.yaml
    assert [b.kind for b in rep.figures] == kinds and not rep.skipped and not rep.failed
    code = main([str(sweep_dir), "--out", str(out), "--figures", "sweep", "--name", "lrsweep"])
    assert code == 0
    files = rep.files + [out / "lrsweep" / "sweep.pdf", out / "lrsweep" / "sweep.png"]
    for f in files:
        assert f.exists(), f
        (_check_png if f.suffix == ".png" else _check_pdf)(f)
    summary = (out / "tiny" / "summary.md").read_text()
    for k in kinds:
        assert f"![{k}]({k}.png)" in summary and f"({k}.pdf)" in summary
    assert "Final test accuracy" in summary and "diverged at step" in summary and "| 15 |" in summary
    assert "Percentile spread of block2.pre_act unit 0" in summary
    # gradient ICS: the first layer (G' = G, cos 1, l2 0) is left out of the means
    ics = summary[summary.index("Gradient ICS"):]
    cos, l2 = (float(v) for v in re.search(r"\| BN \| ([\d.]+) \| ([\d.]+) \|", ics).groups())
    ts = np.arange(0, STEPS, 3)
    assert cos == pytest.approx(0.9 - 0.01 * ts.mean(), abs=1e-3)
    assert l2 == pytest.approx(np.mean(1.0 / (ts + 2)), abs=1e-3)
    s2 = (out / "lrsweep" / "summary.md").read_text()
    assert "![sweep](sweep.png)" in s2 and "optim.lr=0.05" in s2
    err = capsys.readouterr().err
    assert "Traceback" not in err


def test_key_number_tables_keep_an_arm_that_diverged_at_once(tmp_path):
    """An arm without numbers because it blew up at step 1 keeps a row of dashes in the drift and
    spread tables of summary.md (it vanished from them, while the other arms stood there alone)."""
    from icsk.report.style import arm_label

    make_run(tmp_path / "r", diverge={"none": 1})
    build_report([tmp_path / "r"], out=tmp_path / "o", figures=["ioffe", "drift_curves"], formats=("png",))
    summary = (tmp_path / "o" / "tiny" / "summary.md").read_text()
    for title in ("### Drift", "### Percentile spread"):
        table = summary[summary.index(title):].split("\n\n")[1]
        rows = {line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:]}
        assert rows == {arm_label("bn"), arm_label("none")}, table
        assert re.search(rf"^\| {re.escape(arm_label('none'))} \| – \| – \|", table, re.M), table


def test_missing_data_messages(tmp_path, capsys):
    run = make_run(tmp_path / "bare", hist=False, extra_metrics=False, arms=("none",))
    code = main([str(run), "--out", str(tmp_path / "o"), "--figures", "ioffe,ics,smoothness,hist_evolution,sweep",
                 "--formats", "png"])
    err = capsys.readouterr().err
    assert code == 0  # ioffe was built
    assert "Traceback" not in err
    assert re.search(r"figure 'ics' skipped: .*ics_l2.*gradient_ics", err)
    assert re.search(r"figure 'smoothness' skipped: .*smooth_loss_min.*loss_smoothness", err)
    assert re.search(r"figure 'hist_evolution' skipped: .*'hist'", err)
    assert re.search(r"figure 'sweep' skipped: no config key varies", err)
    summary = (tmp_path / "o" / "tiny" / "summary.md").read_text()
    assert "## Skipped figures" in summary and "**ics**" in summary
    assert (tmp_path / "o" / "tiny" / "ioffe.png").exists() and not (tmp_path / "o" / "tiny" / "ioffe.pdf").exists()
    # default mode: builds what exists, says what it skipped, never a traceback
    code = main([str(run), "--out", str(tmp_path / "o2"), "--figures", "ics", "--layer", "nope"])
    assert code == 1  # nothing could be built
    assert "Traceback" not in capsys.readouterr().err


def test_unknown_figure_and_bad_inputs(tmp_path, capsys, sweep_dir):
    with pytest.raises(SystemExit) as e:
        main([str(sweep_dir), "--figures", "ioffe,bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "bogus" in err and all(k in err for k in FIGURE_NAMES)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    assert main([str(empty), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "no run folders" in err and "Traceback" not in err
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no such" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(sweep_dir), "--paper", "nope2099"])
    assert "unknown --paper" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(sweep_dir), "--ref", "sideways"])
    assert "--ref must be one of" in capsys.readouterr().err
    assert main([str(sweep_dir), "--out", str(tmp_path / "o"), "--where", "optim.lr=7"]) == 2
    assert "no run matches optim.lr=7 in" in (err := capsys.readouterr().err) and "the runs have optim.lr: 0.05, 0.5" in err
    assert main([str(sweep_dir), "--out", str(tmp_path / "o"), "--where", "optim.lrr=0.5"]) == 2
    assert "['optim.lrr'] are in no run's config (closest: {'optim.lrr': ['optim.lr'" in capsys.readouterr().err
    assert main([str(sweep_dir), "--out", str(tmp_path / "o"), "--arms", "bn,BN", "--figures", "ioffe"]) == 2
    assert "--arms BN: no such arm in these runs; their arms: bn, none" in capsys.readouterr().err


def test_arm_filter_and_unit_choice(runs):
    fig = figures.fig_ioffe(runs.where({"optim.lr": "0.05"}).only_arms(["bn"]), unit=2)
    assert _titles(fig) == ["(a) test accuracy", "(b) with BN"]
    assert [line.get_label() for line in fig.axes[0].lines] == ["BN"]


@pytest.mark.slow
def test_default_report_of_a_sweep_draws_each_setting(sweep_dir, tmp_path):
    rep = build_report(sweep_dir, out=tmp_path, paper="icml2024", log=lambda m: None)
    names = {f.name for f in rep.files}
    assert {"ioffe--optim.lr=0.05.pdf", "ioffe--optim.lr=0.5.png", "sweep.pdf"} <= names
    assert {b.kind for b in rep.figures} == set(FIGURE_NAMES)
    text = rep.summary.read_text()
    for f in rep.files:
        assert f.name in text


def test_lp_spellings_get_their_own_colours_and_labels():
    """Arms named by the lp aliases (lp1, lp2, lpinf) are told apart in every figure."""
    from icsk.report.style import arm_color, arm_label, order_arms

    arms = ["lpinf", "lp1", "none", "lp2", "bn"]
    assert len({arm_color(a) for a in arms}) == len(arms)
    assert [arm_label(a) for a in order_arms(arms)] == ["no norm", "BN", "L1 norm", "L2 norm", "L∞ norm"]


def test_a_diverged_sweep_job_is_not_listed_as_unfinished(tmp_path):
    """The sweep summary calls a finished job with a diverged arm "diverged": summary.md listed it
    under "Sweep jobs not finished" while saying every run finished."""
    from icsk.report.summary import sweep_failures

    (tmp_path / "sweep_summary.csv").write_text("job,overrides,status\n0,optim.lr=0.1,finished\n"
                                                 "1,optim.lr=10,diverged\n2,optim.lr=1,failed\n3,optim.lr=3,interrupted\n")
    lines = sweep_failures([tmp_path])
    assert [line.split("job ")[1].split(" ")[0] for line in lines] == ["2", "3"]


def test_final_accuracy_leaves_out_unended_runs_and_counts_seeds_not_runs(tmp_path):
    """An interrupted run was averaged with a finished one of the same seed as '2 seeds'."""
    from icsk.report.summary import final_accuracy_table

    make_run(tmp_path / "a", seed=0)
    make_run(tmp_path / "b", seed=0)  # the same seed again
    make_run(tmp_path / "c", seed=1)
    info = json.loads((tmp_path / "c" / "run.json").read_text())
    info["status"] = "interrupted"
    info["arms"] = {a: {**d, "status": "interrupted"} for a, d in info["arms"].items()}
    write_json_atomic(tmp_path / "c" / "run.json", info)
    t = final_accuracy_table(collect_runs([tmp_path / d for d in "abc"])).set_index("arm")
    fin = figures.final_metrics(collect_runs([tmp_path / d for d in "ab"])).set_index(["run", "arm"])["final"]
    assert t.loc["bn", "mean"] == pytest.approx(fin.xs("bn", level="arm").mean())
    assert (t.loc["bn", "seeds"], t.loc["bn", "runs"], t.loc["bn", "unfinished"]) == (1, 2, 1)
    build_report([tmp_path / d for d in "abc"], out=tmp_path / "o", figures=["ioffe"], formats=("png",))
    summary = next((tmp_path / "o").glob("*/summary.md")).read_text()
    assert "| 1 (2 runs) |" in summary and "not ended (left out)" in summary
