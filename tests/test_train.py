"""The paired training job end to end on the offline data (tiny sizes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import icsk
from icsk.config import compose
from icsk.experiment import ConfigError, run


def tiny(tmp_path, *extra: str, steps: int = 40):
    cfg = compose(["experiment=demo", f"train.steps={steps}", "train.eval_every=20", "train.log_every=10",
                   "train.checkpoint_every=0", "logger=none", "train.progress=false", *extra])
    return run(cfg, tmp_path), tmp_path


def test_demo_job_writes_a_run_folder_load_run_reads(tmp_path):
    info, run_dir = tiny(tmp_path)
    assert info["status"] == "finished"
    assert {a: s["status"] for a, s in info["arms"].items()} == {"bn": "finished", "none": "finished"}
    df = icsk.load_run(run_dir)
    assert set(df.arm.unique()) == {"bn", "none"}
    assert set(df.layer.unique()) == {"block1.pre_act", "block2.pre_act", "block3.pre_act"}
    q = df[(df.layer == "block3.pre_act") & df.stat.isin(["q0.15", "q0.5", "q0.85"])]
    # every step of both arms has the three percentiles of all 100 units
    assert q.groupby(["arm", "step"], observed=True).size().eq(300).all()
    assert sorted(q.step.unique()) == list(range(40))
    m = icsk.load_run(run_dir, table="metrics")
    acc = m[m.metric == "test_acc"]
    assert sorted(acc.step.unique()) == [0, 20, 40]
    assert set(acc.arm) == {"bn", "none"}
    cfg = (run_dir / "config.yaml").read_text()
    assert "name: demo" in cfg
    assert json.loads((run_dir / "run.json").read_text())["final"]["bn"]["test_acc"] > 0


def test_recorded_stats_are_those_of_the_arm_models(tmp_path):
    """The first recorded step equals a direct computation on the first batch at init."""
    info, run_dir = tiny(tmp_path, steps=2)
    cfg = compose(["experiment=demo"])
    from icsk.data import BatchStream
    from icsk.experiment import build_arms_models, load_data

    bundle = load_data(cfg)
    models = build_arms_models(cfg, bundle)
    x, _ = next(BatchStream(bundle.train, 60, seed=0))
    df = icsk.load_run(run_dir, stats=["mean", "q0.5"], steps=[0])
    for arm, model in models.items():
        model.train()
        acts = {}
        h = model.block3.pre_act.register_forward_hook(lambda m, i, o: acts.update(a=o.detach().double()))
        model(x)
        h.remove()
        got = df[(df.arm == arm) & (df.layer == "block3.pre_act") & (df.stat == "mean")].sort_values("unit").value
        np.testing.assert_allclose(got.to_numpy(), acts["a"].mean(0).numpy(), rtol=1e-4, atol=1e-5)
        got = df[(df.arm == arm) & (df.layer == "block3.pre_act") & (df.stat == "q0.5")].sort_values("unit").value
        np.testing.assert_allclose(got.to_numpy(), np.quantile(acts["a"].numpy(), 0.5, axis=0), rtol=1e-4, atol=1e-5)


def test_single_arm_via_model_norm(tmp_path):
    info, run_dir = tiny(tmp_path, "model.norm=noisy_bn", steps=5)
    assert list(info["arms"]) == ["noisy_bn"]
    assert set(icsk.load_run(run_dir).arm.unique()) == {"noisy_bn"}


def test_refuses_to_overwrite_an_existing_run(tmp_path):
    tiny(tmp_path, steps=2)
    with pytest.raises(ConfigError, match="resume=true"):
        tiny(tmp_path, steps=2)


def test_cuda_request_without_cuda_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ConfigError, match="device=auto"):
        tiny(tmp_path, "device=cuda", steps=1)


def test_online_probes_do_not_change_training(tmp_path):
    """Gradient ICS, smoothness and BN-gap probes at every 5th step leave the run bit-identical."""
    arms = "model.arms=[bn,noisy_bn,none]"
    tiny(tmp_path / "plain", arms, steps=12)
    tiny(tmp_path / "probed", arms, "metrics=santurkar", "metrics.ics.schedule=5", "metrics.smoothness.schedule=5",
         "metrics.bn_gap.schedule=5", steps=12)
    a, b = icsk.load_run(tmp_path / "plain"), icsk.load_run(tmp_path / "probed")
    import pandas as pd

    pd.testing.assert_frame_equal(a, b, check_exact=True)
    m = icsk.load_run(tmp_path / "probed", table="metrics")
    ics = m[m.metric == "ics_cos"]
    assert sorted(ics.step.unique()) == [0, 5, 10]
    assert set(ics.layer) == {"block1.linear", "block2.linear", "block3.linear", "head"}
    first = ics[ics.layer == "block1.linear"].value
    assert np.allclose(first, 1.0)  # G' = G for the first layer
    sm = m[m.metric == "smooth_beta"]
    assert len(sm) == 9 and np.isfinite(sm.value).all()
    gap = m[m.metric == "bngap_w2"]
    assert set(gap.arm) == {"bn", "noisy_bn"}
    plain_m = icsk.load_run(tmp_path / "plain", table="metrics")
    keep = ["loss", "test_acc"]
    pd.testing.assert_frame_equal(
        plain_m[plain_m.metric.isin(keep)].reset_index(drop=True), m[m.metric.isin(keep)].reset_index(drop=True))


def test_gradient_ics_of_the_job_moves_whole_earlier_blocks(tmp_path):
    """The job's G' moves each earlier block whole (BN's gamma/beta too), as DESIGN's W_1..W_{i-1}."""
    probes = ["metrics=santurkar", "metrics.ics.schedule=5", "metrics.smoothness.enabled=false",
              "metrics.bn_gap.enabled=false"]
    tiny(tmp_path, *probes, steps=1)
    m = icsk.load_run(tmp_path, table="metrics")
    got = m[(m.metric == "ics_l2") & (m.arm == "bn") & (m.step == 0)].set_index("layer").value
    # probing some layers (metrics.ics.layers) gives their rows of the full list: blocks not
    # probed still move in G' (they stayed at w_t, and the first probed layer's G' was G)
    tiny(tmp_path / "some", *probes, "metrics.ics.layers=[block2.linear,head]", steps=1)
    m2 = icsk.load_run(tmp_path / "some", table="metrics")
    some = m2[(m2.metric == "ics_l2") & (m2.arm == "bn")].set_index("layer").value
    assert sorted(some.index) == ["block2.linear", "head"]
    np.testing.assert_allclose(some[["block2.linear", "head"]].to_numpy(), got[["block2.linear", "head"]].to_numpy(),
                               rtol=1e-6)
    with pytest.raises(ConfigError, match=r"metrics.ics.layers: \['block2'\] are not weight layers"):
        tiny(tmp_path / "bad", *probes, "metrics.ics.layers=[block2]", steps=1)
    cfg = compose(["experiment=demo"])
    from icsk.data import BatchStream
    from icsk.experiment import build_arms_models, build_optimizer, load_data
    from icsk.metrics import gradient_ics

    bundle = load_data(cfg)
    model = build_arms_models(cfg, bundle)["bn"]
    batch = next(BatchStream(bundle.train, 60, seed=0))
    opt = build_optimizer(cfg.optim, model.parameters())

    def loss(mod, b):
        return torch.nn.functional.cross_entropy(mod(b[0]), b[1])

    layers = model.weight_layer_names()
    want = gradient_ics(model, loss, batch, opt, layers, groups=model.weight_group_names()).set_index("layer").l2
    np.testing.assert_allclose(got[layers].to_numpy(), want[layers].to_numpy(), rtol=1e-6)
    linear_only = gradient_ics(model, loss, batch, opt, layers).set_index("layer").l2
    # at init (gamma = 1, beta = 0) the normalizer's update moves G' by about 5e-5 of l2
    gap = np.abs(got[layers[1:]].to_numpy() / linear_only[layers[1:]].to_numpy() - 1)
    assert (gap > 1e-5).all(), gap


def test_fixed_probe_batch_is_recorded_without_changing_training(tmp_path):
    """recorder.probe_schedule=5: the probe batch (data.probe_size training examples) goes through
    every arm at steps 0, 5, 10 as mode 'probe', in training mode, and BN running statistics,
    noisy BN's noise and the batches are as without it (the training rows stay bit-identical)."""
    import pandas as pd

    from icsk.data import probe_batch
    from icsk.experiment import build_arms_models, load_data

    arms = "model.arms=[bn,noisy_bn,none]"
    tiny(tmp_path / "plain", arms, steps=12)
    tiny(tmp_path / "probed", arms, "recorder.probe_schedule=5", "data.probe_size=200", steps=12)
    a, b = icsk.load_run(tmp_path / "plain"), icsk.load_run(tmp_path / "probed")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    m = [icsk.load_run(tmp_path / d, table="metrics") for d in ("plain", "probed")]
    pd.testing.assert_frame_equal(m[0], m[1], check_exact=True)
    pr = icsk.load_run(tmp_path / "probed", mode="probe", stats=["mean", "count"], layers="block2.pre_act")
    assert sorted(pr.step.unique()) == [0, 5, 10] and set(pr.arm) == {"bn", "noisy_bn", "none"}
    assert (pr[pr.stat == "count"].value == 200).all()
    cfg = compose(["experiment=demo"])
    bundle = load_data(cfg)
    x, _ = probe_batch(bundle.train, 200, seed=0)
    for arm, model in build_arms_models(cfg, bundle).items():
        if arm == "noisy_bn":
            continue  # its noise draws depend on the RNG state at step 0 of the run
        model.train()
        acts = {}
        h = model.block2.pre_act.register_forward_hook(lambda mod, i, o: acts.update(a=o.detach().double()))
        model(x)
        h.remove()
        got = pr[(pr.arm == arm) & (pr.step == 0) & (pr.stat == "mean")].sort_values("unit").value
        np.testing.assert_allclose(got.to_numpy(), acts["a"].mean(0).numpy(), rtol=1e-4, atol=1e-5)


def test_report_draws_the_probe_batch_with_mode_probe(tmp_path, capsys):
    """icsk-report --mode probe reads the probe rows (every 3rd step here), the default the
    training rows (every step); runs without probe rows get a skip message, not a crash."""
    from icsk.report import build_report, collect_runs
    from icsk.report.cli import main

    tiny(tmp_path / "run", "recorder.probe_schedule=3", "data.probe_size=100", steps=12)
    runs = collect_runs([tmp_path / "run"])
    assert sorted(runs.in_mode("probe").stats(stats=["mean"]).step.unique()) == [0, 3, 6, 9]
    assert sorted(runs.stats(stats=["mean"]).step.unique()) == list(range(12))
    probe = runs.in_mode("probe")
    assert {g.mode for g in probe.groups()} == {probe.where({}).mode, probe.only_arms(["bn"]).mode} == {"probe"}
    from icsk.report.figures import drift_frame

    assert sorted(drift_frame(probe).step.unique()) == [3, 6, 9]  # ref=previous: from the second probe on
    rep = build_report([tmp_path / "run"], out=tmp_path / "rep", figures=["ioffe", "drift_curves"], mode="probe",
                       formats=["png"], log=lambda m: None)
    assert [b.kind for b in rep.figures] == ["ioffe", "drift_curves"] and not rep.failed
    assert "fixed probe batch (mode=probe)" in rep.summary.read_text()
    tiny(tmp_path / "plain", steps=4)
    code = main([str(tmp_path / "plain"), "--out", str(tmp_path / "rep2"), "--figures", "ioffe", "--mode", "probe",
                 "--formats", "png", "--quiet"])
    assert code == 2 and "no run has probe rows" in capsys.readouterr().err
