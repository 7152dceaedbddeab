"""Recorder statistics against a float64 NumPy reference, schedules, hook hygiene, storage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import icsk
from icsk import background
from icsk.store import chunk_files, load_run

QS = (0.15, 0.5, 0.85)
# the Recorder reduces on the activation's device: every reference test runs on each one here
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def per_unit(a: np.ndarray) -> np.ndarray:
    """(N, C, ...) -> (C, N*S) float64: the values each unit's statistics are taken over."""
    a = np.asarray(a, dtype=np.float64)
    return np.moveaxis(a, 1, 0).reshape(a.shape[1], -1)


def reference(a: np.ndarray, edges: np.ndarray | None = None, sat=4.0, eps=1e-6) -> dict[str, np.ndarray]:
    """Obvious per-unit statistics in float64."""
    u = per_unit(a)
    ref = {
        "mean": u.mean(1),
        "var": u.var(1, ddof=1),
        "min": u.min(1),
        "max": u.max(1),
        "frac_sat": (np.abs(u) > sat).mean(1),
        "frac_zero": (np.abs(u) <= eps).mean(1),
        "nonfinite": (~np.isfinite(u)).sum(1).astype(float),
    }
    for q in QS:
        ref[f"q{q:g}"] = np.quantile(u, q, axis=1)
    if edges is not None:
        idx = np.searchsorted(edges, u, side="right")  # 0 underflow, B+1 overflow
        ref["hist"] = np.stack([np.bincount(row, minlength=edges.size + 1) for row in idx])
    return ref


def frame_values(df: pd.DataFrame, step: int, layer: str, stat: str) -> np.ndarray:
    sel = df[(df.step == step) & (df.layer == layer) & (df.stat == stat)].sort_values("unit")
    return sel.value.to_numpy(dtype=np.float64)


class Capture:
    """Plain reference hook: keep a float64 copy of each training-mode output."""

    def __init__(self, module: nn.Module):
        self.values: list[np.ndarray] = []
        self.h = module.register_forward_hook(lambda m, i, o: self.values.append(o.detach().double().cpu().numpy().copy()))


ALL = ["mean", "var", "min", "max", "quantiles", "frac_sat", "frac_zero", "nonfinite", "hist"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("stage_mb", [8.0, 0.0])  # staged (batched) and direct reduction paths
def test_stats_match_float64_reference(kind, stage_mb, device, tmp_path):
    torch.manual_seed(0)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 5)).to(device)
        make = lambda n: torch.randn(n, 12, device=device) * 3 + 1  # noqa: E731
    else:
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3)).to(device)
        make = lambda n: torch.randn(n, 3, 6, 5, device=device)  # noqa: E731
    caps = {"0": Capture(model[0]), "2": Capture(model[2])}
    rec = icsk.Recorder(model, layers=["0", "2"], stats=ALL, hist_bins=9, hist_range=(-2.0, 2.5),
                        sat_threshold=1.5, path=tmp_path, stage_mb=stage_mb, flush_every=3)
    with rec:
        for step in range(7):
            model(make(10 + step % 2))  # a batch-size change forces the staged path to restage
            rec.step()
    df = rec.to_frame()
    hist = rec.histograms()
    edges = np.linspace(-2.0, 2.5, 10)
    for layer, cap in caps.items():
        assert len(cap.values) == 7
        for step, a in enumerate(cap.values):
            ref = reference(a, edges, sat=1.5)
            for stat in ["mean", "var", "min", "max", "frac_sat", "frac_zero", "nonfinite", "q0.15", "q0.5", "q0.85"]:
                got = frame_values(df, step, layer, stat)
                torch.testing.assert_close(torch.tensor(got), torch.tensor(ref[stat]), rtol=2e-5, atol=2e-5,
                                           msg=f"{layer} {stat} step {step}")
            h = hist[(hist.step == step) & (hist.layer == layer)].sort_values(["unit", "bin"])
            counts = h["count"].to_numpy().reshape(ref["hist"].shape)
            np.testing.assert_array_equal(counts, ref["hist"])
            assert frame_values(df, step, layer, "count")[0] == per_unit(a).shape[1]
    assert set(df.columns) >= {"step", "layer", "stat", "unit", "value"}
    assert (df[df.stat == "count"].unit == -1).all()


@pytest.mark.parametrize("device", DEVICES)
def test_one_step_stages_match_reference(device, monkeypatch, tmp_path):
    """Stages of a single step (the GPU rule, here forced on every device) are reduced as soon
    as they fill, and give the statistics of the direct path."""
    monkeypatch.setattr(icsk.hooks, "_min_stage_steps", lambda device: 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).to(device)
    cap = Capture(model[0])
    step_mb = 5 * 4 * 6 * 5 * 4 / 2**20  # one step of the conv output: exactly one fits
    with icsk.Recorder(model, layers=["0"], stats=["mean", "var", "max", "quantiles"], path=tmp_path,
                       stage_mb=step_mb * 1.5) as rec:
        for _ in range(5):
            model(torch.randn(5, 3, 6, 5, device=device))
            rec.step()
        state = rec._states[("0", "train")]
        assert len(state.buffers) == 2 and state.buffers[0][0].shape[0] == 1
    df = rec.to_frame()
    assert len(cap.values) == 5
    for step, a in enumerate(cap.values):
        ref = reference(a)
        for stat in ("mean", "var", "max", "q0.15", "q0.5", "q0.85"):
            np.testing.assert_allclose(frame_values(df, step, "0", stat), ref[stat], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("spare", [True, False])
def test_staged_cpu_layers_are_reduced_on_a_spare_core_else_on_the_training_thread(spare, monkeypatch, tmp_path):
    """With a core beside torch's threads, a full staging buffer goes to the reducer thread;
    without one (that thread would run only when training waits for it), the training thread
    reduces it at once. Both give the float64 reference's statistics."""
    monkeypatch.setattr(icsk.hooks, "spare_core", lambda: spare)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 30), nn.Sigmoid())
    cap = Capture(model[1])
    rec = icsk.Recorder(model, layers=["1"], stats=["mean", "var", "quantiles"], path=tmp_path, max_stage_steps=4)
    threads = []
    for reducer in (rec._reducer, rec._stage_reducer):
        monkeypatch.setattr(reducer, "reduce_staged", (lambda f: lambda *a: (threads.append(threading.current_thread()),
                                                                            f(*a))[1])(reducer.reduce_staged))
    filled = []  # which staging buffer each step went into
    with rec:
        for _ in range(10):
            state = rec._states.get(("1", "train"))
            filled.append(state.active if state else 0)
            model(torch.randn(40, 12))
            rec.step()
    assert len(rec._states[("1", "train")].buffers) == 2  # staged, four steps a buffer
    # one buffer fills while the reducer thread works on the other; reduced at once, it is free again
    assert filled == ([0] * 4 + [1] * 4 + [0] * 2 if spare else [0] * 10)
    assert len(threads) == 3  # two full buffers, and the half-full one at exit
    on_training_thread = [t is threading.current_thread() for t in threads]
    assert on_training_thread == [not spare] * 3
    df = rec.to_frame()
    for step, a in enumerate(cap.values):
        ref = reference(a)
        for stat in ("mean", "var", "q0.15", "q0.5", "q0.85"):
            np.testing.assert_allclose(frame_values(df, step, "1", stat), ref[stat], rtol=2e-5, atol=2e-6)


def test_a_spare_core_is_one_beside_torchs_threads():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(cores)
        assert not background.spare_core()
        if cores > 1:
            torch.set_num_threads(cores - 1)
            assert background.spare_core()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stage_mb", [8.0, 0.0])
def test_low_precision_activations_reduced_in_float32(device, dtype, stage_mb):
    torch.manual_seed(1)
    lin = nn.Linear(8, 16).to(device, dtype)
    model = nn.Sequential(lin)
    cap = Capture(lin)
    with icsk.Recorder(model, layers=["0"], stats=["mean", "var", "quantiles"], stage_mb=stage_mb) as rec:
        model(torch.randn(64, 8, dtype=dtype, device=device))
        rec.step()
    df = rec.to_frame()
    ref = reference(cap.values[0])
    for stat in ("mean", "var", "q0.5"):
        np.testing.assert_allclose(frame_values(df, 0, "0", stat), ref[stat], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_values_are_counted_and_dropped_from_histogram(device):
    model = nn.Sequential(nn.Identity())
    x = torch.tensor([[0.0, 1.0], [float("nan"), 2.0], [float("inf"), -3.0], [1.0, float("-inf")]], device=device)
    with icsk.Recorder(model, layers=["0"], stats=["nonfinite", "hist"], hist_range=(-1, 1), hist_bins=2) as rec:
        model(x)
        rec.step()
    df = rec.to_frame()
    np.testing.assert_array_equal(frame_values(df, 0, "0", "nonfinite"), [2, 1])
    h = rec.histograms().sort_values(["unit", "bin"])
    # unit 0: 0, 1 in range (bin 2 is [0, 1), 1 -> overflow); nan dropped; +inf -> overflow
    np.testing.assert_array_equal(h[h.unit == 0]["count"], [0, 0, 1, 2])
    np.testing.assert_array_equal(h[h.unit == 1]["count"], [2, 0, 0, 2])


@pytest.mark.parametrize("device", DEVICES)
def test_resnet18_inplace_relu_does_not_corrupt_statistics(device):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).to(device)
    # bn1 is followed by ReLU(inplace=True): the hook sees a tensor that is overwritten later
    assert model.relu.inplace
    cap = {}

    def keep(m, i, o):
        cap["bn1"] = o.detach().double().cpu().numpy()

    h = model.bn1.register_forward_hook(keep)
    with icsk.Recorder(model, layers=["bn1", "layer1.0.bn1"], stats=["mean", "var", "min", "quantiles"]) as rec:
        model(torch.randn(4, 3, 32, 32, device=device))
        rec.step()
    h.remove()
    df = rec.to_frame()
    ref = reference(cap["bn1"])
    assert ref["min"].min() < 0  # BN output has negatives that the in-place ReLU would erase
    for stat in ("mean", "var", "min", "q0.15"):
        np.testing.assert_allclose(frame_values(df, 0, "bn1", stat), ref[stat], rtol=1e-4, atol=1e-5)


@needs_cuda
def test_cuda_recording_never_waits_for_the_device(tmp_path):
    """Hooks, staged reductions (on the reducer thread) and reductions inside the hook only queue
    GPU work: torch's sync debug mode raises at any host synchronisation. With 4-step staging,
    the training thread waits for two staged reductions inside the checked steps, so an error on
    the reducer thread surfaces there too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 3, 16, 16, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
    # the conv output (0.25 MB a step) is staged one step at a time, the linear one 4 at a time
    rec = icsk.Recorder(model, layers=["0", "3"], stats=ALL, hist_range=(-3.0, 3.0), path=tmp_path,
                        stage_mb=0.25, max_stage_steps=4, flush_every=1000)

    def train_step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        rec.step()

    with rec:
        for _ in range(2):  # first captures allocate staging buffers
            train_step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(12):
                train_step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    df = rec.to_frame(stats=["mean"])
    assert sorted(df.step.unique()) == list(range(14))
    assert set(df.layer) == {"0", "3"}


@needs_cuda
def test_cuda_statistics_of_forwards_on_a_side_stream(tmp_path):
    """Staged reductions run on the stream the hooks copied on: a forward on a busy side stream
    (a large matmul queued before it) must not be read before its staging copy lands."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh()).cuda()
    outs = []
    model[0].register_forward_hook(lambda m, i, o: outs.append(o.detach().clone()))  # no host sync
    big = torch.randn(4096, 4096, device="cuda")
    side = torch.cuda.Stream()
    rec = icsk.Recorder(model, layers=["0"], stats=["mean", "max", "quantiles"], max_stage_steps=4, path=tmp_path)
    with torch.cuda.stream(side), rec:
        for _ in range(10):
            for _ in range(4):
                big = torch.tanh(big @ big)  # keeps the side stream busy for milliseconds
            model(torch.randn(128, 64, device="cuda") * 2)
            rec.step()
    df = rec.to_frame()
    for step, o in enumerate(outs):
        ref = reference(o.double().cpu().numpy())
        for stat in ("mean", "max", "q0.15", "q0.5", "q0.85"):
            np.testing.assert_allclose(frame_values(df, step, "0", stat), ref[stat], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{stat} step {step}")


def count_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_every_n_schedule_records_only_scheduled_steps_and_skips_hooks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    seen_hooks = []
    with icsk.Recorder(model, layers=[nn.Linear], stats=["mean"], schedule=3) as rec:
        for _ in range(10):
            seen_hooks.append(count_hooks(model))
            model(torch.randn(5, 4))
            rec.step()
    assert seen_hooks == [2 if s % 3 == 0 else 0 for s in range(10)]
    df = rec.to_frame()
    assert sorted(df.step.unique()) == [0, 3, 6, 9]
    assert set(df.layer.unique()) == {"0", "2"}


def test_explicit_and_log_schedules():
    assert icsk.Schedule.parse([0, 5, 7]).steps_until(10) == [0, 5, 7]
    log = icsk.Schedule.log(per_decade=4).steps_until(1001)
    assert log[:7] == [0, 1, 2, 3, 6, 10, 18] and log[-1] == 1000
    assert all(b > a for a, b in zip(log, log[1:]))
    assert icsk.Schedule.parse("every:4").steps_until(10) == [0, 4, 8]
    with pytest.raises(ValueError, match="every:N"):
        icsk.Schedule.parse("sometimes")


def test_no_hook_left_after_exit_or_exception():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    before = count_hooks(model)
    with icsk.Recorder(model, capture="input") as rec:
        assert count_hooks(model) == 2
        model(torch.randn(3, 4))
        rec.step()
    assert count_hooks(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with icsk.Recorder(model, layers=["*"]) as rec2:
            assert count_hooks(model) > 0
            raise RuntimeError("boom")
    assert count_hooks(model) == before
    rec2.remove()
    rec2.remove()  # idempotent


def test_train_and_eval_histograms_each_keep_their_own_auto_range(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity())
    xs = {"train": [torch.rand(50, 2) for _ in range(3)], "eval": [torch.rand(50, 2) * 100 + 1000 for _ in range(3)]}
    rec = icsk.Recorder(model, layers=["0"], modes=("train", "eval"), stats=["hist"], hist_bins=5, path=tmp_path)
    with rec:
        for s in range(3):
            for mode in ("eval", "train"):  # eval first: its state is created first
                model.train(mode == "train")
                model(xs[mode][s])
            rec.step()
    ranges = rec.hist_edges()
    assert ranges[("0", "train")][1] < 2 < 900 < ranges[("0", "eval")][0]
    for mode in ("train", "eval"):
        for h in (rec.histograms(mode=mode), load_run(tmp_path, "hist", mode=mode)):
            lo, hi = ranges[("0", mode)]
            edges = np.linspace(lo, hi, 6)  # 5 bins: the first batch's min and max lie inside bins
            for s in range(3):
                got = h[(h.step == s) & (h.unit == 1)].sort_values("bin")
                np.testing.assert_allclose(got.left.to_numpy()[1:], edges)
                want = np.histogram(xs[mode][s][:, 1].double().numpy(), bins=edges)[0]
                np.testing.assert_array_equal(got["count"].to_numpy()[1:-1], want)
    both = rec.histograms(mode=None)
    assert set(both["mode"]) == {"train", "eval"} and len(both) == 2 * len(rec.histograms())
    meta = json.loads((tmp_path / "stats" / "recorder.json").read_text())["layers"]["0"]
    assert meta["hist_edges"] == meta["hist_edges_by_mode"]["train"]  # what readers before by-mode edges use


def test_capture_input_vs_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Sigmoid())
    x = torch.randn(20, 6)
    with icsk.Recorder(model, layers=["1"], capture="input", stats=["mean"]) as rec_in:
        model(x)
        rec_in.step()
    pre = model[0](x).detach().double().numpy()
    np.testing.assert_allclose(frame_values(rec_in.to_frame(), 0, "1", "mean"), pre.mean(0), rtol=1e-5, atol=1e-6)


def test_eval_forwards_skipped_by_default_and_tagged_when_asked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    xtr, xev = torch.randn(8, 3), torch.randn(8, 3) + 5
    with icsk.Recorder(model, layers=["0"], stats=["mean"]) as rec:
        model.eval()
        model(xev)
        model.train()
        model(xtr)
        rec.step()
    df = rec.to_frame()
    np.testing.assert_allclose(frame_values(df, 0, "0", "mean"), model(xtr).detach().mean(0).numpy(), rtol=1e-5)
    # histogram ranges restored from a run that recorded eval forwards do not turn them on
    with icsk.Recorder(model, layers=["0"], stats=["mean", "hist"]) as rec1:
        rec1.restore_edges({("0", "eval"): (-1.0, 1.0), ("0", "train"): (-2.0, 2.0)})
        model.eval()
        model(xev)
        model.train()
        model(xtr)
        rec1.step()
    assert set(rec1.to_frame(mode=None)["mode"].unique()) == {"train"}
    assert rec1.hist_edges() == {("0", "train"): (-2.0, 2.0)}
    with icsk.Recorder(model, layers=["0"], stats=["mean"], modes=("train", "eval")) as rec2:
        model.eval()
        model(xev)
        model.train()
        model(xtr)
        rec2.step()
    both = rec2.to_frame(mode=None)
    assert set(both["mode"].unique()) == {"train", "eval"}
    ev = both[(both["mode"] == "eval") & (both.stat == "mean")].sort_values("unit").value.to_numpy()
    np.testing.assert_allclose(ev, model(xev).detach().mean(0).numpy(), rtol=1e-5)


def test_only_first_forward_of_a_step_and_paused_forwards_are_ignored():
    model = nn.Sequential(nn.Identity())
    with icsk.Recorder(model, layers=["0"], stats=["mean"]) as rec:
        with rec.paused():
            model(torch.full((2, 1), 9.0))
        model(torch.ones(2, 1))
        model(torch.full((2, 1), 5.0))
        rec.step()
    assert frame_values(rec.to_frame(), 0, "0", "mean").tolist() == [1.0]


def test_forwards_inside_torch_func_transforms_are_skipped_with_one_warning():
    """vmap's batched values and grad's tracked ones cannot be copied out (the copy crashed);
    they are skipped, warned about once, and the step's own forward is still recorded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    x = torch.randn(5, 4)
    params = dict(model.named_parameters())
    with icsk.Recorder(model, layers=["0"], stats=["mean"]) as rec:
        with pytest.warns(RuntimeWarning, match="torch.func transform") as caught:
            torch.func.vmap(model)(torch.randn(7, 5, 4))  # per-sample shape (5, 4): the training shape
            torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).sum())(params)
        assert sum("torch.func" in str(w.message) for w in caught) == 1
        model(x)
        rec.step()
        with rec.paused():  # said explicitly: no warning
            torch.func.vmap(model)(torch.randn(7, 5, 4))
        model(x * 2)
        rec.step()
    frame = rec.to_frame()
    assert sorted(frame.step.unique()) == [0, 1]
    with torch.no_grad():
        np.testing.assert_allclose(frame_values(frame, 0, "0", "mean"), model[0](x).mean(0).numpy(), rtol=1e-5)
        np.testing.assert_allclose(frame_values(frame, 1, "0", "mean"), model[0](x * 2).mean(0).numpy(), rtol=1e-5)


def _run_script(tmp_path, body: str, *args: str) -> subprocess.CompletedProcess:
    """Runs ``body`` as a script in ``tmp_path``, after a preamble that imports what it needs and
    makes a Linear model ``m``."""
    script = tmp_path / "script.py"
    script.write_text("import os, sys, threading, time, torch, icsk\nfrom torch import nn\n"
                      "m = nn.Sequential(nn.Linear(4, 3))\n" + body)
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)


def test_a_recorder_left_open_is_closed_at_interpreter_exit(tmp_path):
    """attach() without close(): a script that ends, or dies of an exception, still writes
    every step it recorded (they had been lost with the process)."""
    for how in ("ends", "raise"):
        res = _run_script(tmp_path, (
            "rec = icsk.Recorder(m, layers=['0'], stats=['mean'], path=sys.argv[1], flush_every=1000).attach()\n"
            "for _ in range(3):\n"
            "    m(torch.randn(5, 4)); rec.step()\n"
            "if sys.argv[2] == 'raise':\n"
            "    raise RuntimeError('the script dies')\n"), str(tmp_path / how), how)
        assert (res.returncode != 0) == (how == "raise"), res.stderr
        assert sorted(load_run(tmp_path / how).step.unique()) == [0, 1, 2], how


def _exit_quietly() -> None:
    pass


def test_a_forked_child_leaves_the_parents_open_recorder_alone(tmp_path):
    """A DataLoader-style forked worker inherits the open Recorder but none of its threads: at
    its exit it must not try to close it (it hung there, waiting on the parent's writer)."""
    import multiprocessing

    model = nn.Sequential(nn.Linear(4, 3))
    with icsk.Recorder(model, layers=["0"], stats=["mean"], path=tmp_path / "run") as rec:
        model(torch.randn(5, 4))
        rec.step()
        child = multiprocessing.get_context("fork").Process(target=_exit_quietly)
        child.start()
        child.join(30)
        if child.is_alive():
            child.kill()
        assert child.exitcode == 0
        model(torch.randn(5, 4))
        rec.step()
    assert sorted(load_run(tmp_path / "run").step.unique()) == [0, 1]




def test_a_thread_still_recording_at_exit_is_joined_before_its_recorder_is_closed(tmp_path):
    """The main thread returns while a (non-daemon) training thread still records: the exit
    hook waits for it instead of closing its Recorder under it (steps after that were dropped)."""
    res = _run_script(tmp_path, (
        "def train():\n"
        "    with icsk.Recorder(m, layers=['0'], stats=['mean'], path='run') as rec:\n"
        "        for _ in range(20):\n"
        "            m(torch.randn(5, 4)); rec.step(); time.sleep(0.02)\n"
        "threading.Thread(target=train).start()\n"
        "time.sleep(0.1)\n"))
    assert res.returncode == 0, res.stderr
    assert sorted(load_run(tmp_path / "run").step.unique()) == list(range(20))


def test_a_forked_child_that_exits_keeps_the_parents_folder_and_claim(tmp_path):
    """An os.fork() child that ends normally finalizes its copy of the Recorder: that must not
    delete the parent's temporary folder nor give up the parent's claim (shared lock)."""
    res = _run_script(tmp_path, (
        "rec = icsk.Recorder(m, layers=['0'], stats=['mean']).attach()\n"
        "m(torch.randn(5, 4)); rec.step(); rec.flush(wait=True)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    sys.exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "try:\n"
        "    icsk.Recorder(m, layers=['0'], path=rec.path).attach(); print('second accepted')\n"
        "except icsk.RecorderError:\n"
        "    print('second refused')\n"
        "m(torch.randn(5, 4)); rec.step(); rec.close()\n"
        "print('steps', sorted(int(s) for s in icsk.load_run(rec.path).step.unique()))\n"))
    assert res.returncode == 0, res.stderr
    assert "second refused" in res.stdout and "steps [0, 1]" in res.stdout, res.stdout


def test_layer_selection_and_errors():
    model = nn.Sequential()
    model.add_module("enc", nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    model.add_module("head", nn.Linear(3, 1))
    assert list(icsk.select_layers(model, "enc.*")) == ["enc.0", "enc.1"]
    assert list(icsk.select_layers(model, nn.ReLU)) == ["enc.1"]
    assert list(icsk.select_layers(model, lambda n, m: n.endswith("head"))) == ["head"]
    with pytest.raises(icsk.RecorderError, match=r"'haed'.*nearest valid names.*'head'"):
        icsk.Recorder(model, layers=["haed"])
    with pytest.raises(icsk.RecorderError, match="unknown statistic"):
        icsk.Recorder(model, layers=["head"], stats=["mean", "kurtosis"])


def test_probe_forwards_are_tagged_and_recorded_on_unscheduled_steps_too():
    """Inside rec.probe() a forward is recorded as mode 'probe' at the current step, even on a step
    the schedule skips (hooks come and go with it); training-mode rows are not touched; quantiles
    and histograms of the probe batch match NumPy; misuse is refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    probe, xs = torch.randn(50, 3), torch.randn(6, 8, 3)
    with icsk.Recorder(model, layers=["0"], stats=["mean", "quantiles", "hist"], schedule=2, hist_range=(-2, 2),
                       hist_bins=8, flush_every=2) as rec:
        want, train_want = {}, {}
        for t in range(6):
            with rec.probe():
                model(probe)
            with rec.paused():
                want[t] = model[0](probe).detach().double().numpy()
                train_want[t] = model[0](xs[t]).detach().double().numpy()
            assert rec.attached == (t % 2 == 0)  # the schedule's hooks only
            model(xs[t])
            with torch.no_grad():
                model[0].weight.mul_(1.1)
            rec.step()
        with pytest.raises(icsk.RecorderError, match="nested"), rec.probe(), rec.probe():
            pass
        with pytest.raises(icsk.RecorderError, match="paused"), rec.paused(), rec.probe():
            pass
    tr = rec.to_frame()
    assert sorted(tr.step.unique()) == [0, 2, 4]
    for t in (0, 2, 4):
        np.testing.assert_allclose(frame_values(tr, t, "0", "mean"), train_want[t].mean(0), rtol=1e-5, atol=1e-6)
    pr = rec.to_frame(mode="probe")
    assert sorted(pr.step.unique()) == list(range(6))
    for t, a in want.items():
        np.testing.assert_allclose(frame_values(pr, t, "0", "mean"), a.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(frame_values(pr, t, "0", "q0.85"), np.quantile(a, 0.85, axis=0), rtol=1e-5, atol=1e-6)
        ref = reference(a.astype(np.float32), np.linspace(-2, 2, 9))["hist"]
        h = rec.histograms(mode="probe")
        got = h[h.step == t].pivot(index="unit", columns="bin", values="count").to_numpy()
        np.testing.assert_array_equal(got, ref)
    with pytest.raises(icsk.RecorderError, match="enter it first"), rec.probe():
        pass
    # probes on steps the schedule skips count towards flush_every: chunks appear while training
    with icsk.Recorder(model, layers=["0"], stats=["mean"], schedule=[0], flush_every=2) as rec2:
        for _ in range(5):
            with rec2.probe():
                model(probe)
            rec2.step()
        rec2._writer.wait()  # chunks are written in the background
        assert len(chunk_files(rec2.stats_dir)) == 2  # steps 0-1 and 2-3, before the Recorder closes
    assert sorted(rec2.to_frame(mode="probe").step.unique()) == list(range(5))


def test_a_model_without_submodules_is_recorded_through_the_wrapper_the_error_names():
    lin = nn.Linear(3, 2)
    with pytest.raises(icsk.RecorderError, match=r"no submodules.*nn\.Sequential\(model\), layers=\['0'\]"):
        icsk.Recorder(lin)
    x = torch.randn(5, 3)
    with icsk.Recorder(nn.Sequential(lin), layers=["0"], stats=["mean"]) as rec:
        lin(x)  # the user's own module, called as before
        rec.step()
    np.testing.assert_allclose(frame_values(rec.to_frame(), 0, "0", "mean"), lin(x).mean(0).detach().numpy(), rtol=1e-6)


def test_single_names_bad_selectors_axes_and_empty_batches():
    model = nn.Sequential(nn.Linear(3, 2))
    x = torch.randn(4, 3)
    with icsk.Recorder(model, layers="0", stats="mean", modes="eval", schedule=np.int64(2)) as rec:
        for _ in range(3):
            model.eval()
            model(x)
            model.train()
            model(x)
            rec.step()
    df = rec.to_frame(mode=None)
    assert set(df["mode"]) == {"eval"} and set(df.stat) == {"mean", "count"} and sorted(set(df.step)) == [0, 2]
    with pytest.raises(icsk.RecorderError, match="not a name, glob"):
        icsk.Recorder(model, layers=0)
    with pytest.raises(icsk.RecorderError, match="empty list"):
        icsk.Recorder(model, layers=[])
    with pytest.raises(TypeError, match="schedule must be"):
        icsk.Recorder(model, schedule=2.0)
    with pytest.raises(ValueError, match="whole numbers"):
        icsk.Recorder(model, schedule=[0, 2.5])
    with pytest.raises(icsk.RecorderError, match=r"channel_dim=5 is out of range.*\(4, 2\)"):
        with icsk.Recorder(model, channel_dim=5):
            model(x)
    with icsk.Recorder(model, stats=["mean"]) as rec:
        with pytest.warns(UserWarning, match="empty tensor of shape \\(0, 2\\)"):
            model(x[:0])
        rec.step()
        model(x)
        rec.step()
    df = rec.to_frame()
    assert sorted(set(df.step)) == [1]
    np.testing.assert_allclose(frame_values(df, 1, "0", "mean"), model(x).detach().mean(0).numpy(), rtol=1e-6)


class TupleOut(nn.Module):
    def forward(self, x):
        return x * 2, {"aux": x}


def test_non_tensor_outputs_rejected_with_hint_or_selected():
    model = nn.Sequential(TupleOut())
    with icsk.Recorder(model, layers=["0"]) as rec:
        with pytest.raises(icsk.RecorderError, match=r"gives a tuple.*select=0"):
            model(torch.ones(2, 3))
    with icsk.Recorder(model, layers=["0"], select=0, stats=["mean"]) as rec:
        model(torch.ones(2, 3))
        rec.step()
    assert frame_values(rec.to_frame(), 0, "0", "mean").tolist() == [2.0, 2.0, 2.0]


@pytest.mark.parametrize("select,choices", [
    ("zz", r"select='zz' failed on its dict \('zz'\); its keys are \['a', 'b'\]"),
    (5, r"select=5 failed on its dict \(5\); its keys are \['a', 'b'\]"),
])
def test_a_select_that_fails_on_a_dict_lists_its_keys(select, choices):
    class DictOut(nn.Module):
        def forward(self, x):
            return {"a": x, "b": 2 * x}

    model = nn.Sequential(DictOut())
    with icsk.Recorder(model, layers=["0"], select=select):
        with pytest.raises(icsk.RecorderError, match=choices):
            model(torch.ones(2, 3))


def test_a_select_that_fails_on_a_tuple_gives_its_length_or_fields():
    model = nn.Sequential(TupleOut())
    with icsk.Recorder(model, layers=["0"], select=2):
        with pytest.raises(icsk.RecorderError, match=r"select=2 failed on its tuple .*it has 2 items: pass an "
                                                     r"index from 0 to 1"):
            model(torch.ones(2, 3))

    class Fields(nn.Module):
        def forward(self, x):
            return torch.return_types.max((x, x))  # a named tuple (values, indices)

    model = nn.Sequential(Fields())
    with icsk.Recorder(model, layers=["0"], select="value"):
        with pytest.raises(icsk.RecorderError, match=r"its fields are \['values', 'indices'\]"):
            model(torch.ones(2, 3))


@pytest.mark.parametrize("bad,says", [
    ("fixed", 'hist_range must be "auto" or a pair \\(lo, hi\\) of numbers, got \'fixed\''),
    ("auto ", "got 'auto '"),
    ((0, 1, 2), r"got \(0, 1, 2\)"),
    (None, "got None"),
    ((1.0, 0.0), r"needs finite lo < hi, got \(1.0, 0.0\)"),
    ((0.0, float("inf")), "needs finite lo < hi"),
])
def test_a_bad_hist_range_is_refused_with_the_fix(bad, says):
    with pytest.raises(icsk.RecorderError, match=says):
        icsk.Recorder(nn.Sequential(nn.Identity()), layers="0", stats=["hist"], hist_range=bad)
    rec = icsk.Recorder(nn.Sequential(nn.Identity()), layers="0", stats=["hist"], hist_range=[-1, 2])
    assert rec.hist_range == (-1.0, 2.0)


@pytest.mark.parametrize("kw", [{"sat_threshold": -1.0}, {"zero_eps": -1e-6}, {"sat_threshold": float("nan")},
                                {"quantiles": (0.5, 1.5)}, {"hist_bins": 0}])
def test_thresholds_quantiles_and_bins_out_of_range_are_refused(kw):
    with pytest.raises(icsk.RecorderError, match=r"must be >= 0|must lie in \[0, 1\]|hist_bins must be >= 1"):
        icsk.Recorder(nn.Sequential(nn.Identity()), layers="0", **kw)


def test_remove_stops_recording_until_attach():
    model = nn.Sequential(nn.Linear(3, 2))
    x = torch.randn(4, 3)
    with icsk.Recorder(model, layers="0", stats=["mean"]) as rec:
        for step in range(6):
            if step == 1:
                rec.remove()
                rec.remove()  # idempotent
            if step == 4:
                rec.attach()
            assert count_hooks(model) == (0 if step in (1, 2, 3) else 1)
            model(x)
            rec.step()
        with pytest.raises(icsk.RecorderError, match=r"attach\(\) it again after remove\(\)"):
            rec.remove()
            with rec.probe():
                pass
    assert count_hooks(model) == 0
    assert sorted(set(rec.to_frame().step)) == [0, 4, 5]


def test_channels_last_units():
    model = nn.Sequential(nn.Identity())
    x = torch.randn(4, 7, 5)  # (batch, tokens, features)
    with icsk.Recorder(model, layers=["0"], stats=["mean"], channel_dim=-1) as rec:
        model(x)
        rec.step()
    np.testing.assert_allclose(frame_values(rec.to_frame(), 0, "0", "mean"), x.mean((0, 1)).numpy(), rtol=1e-5, atol=1e-6)


def test_streams_chunks_to_run_folder_and_load_run_reads_them(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4))
    rec = icsk.Recorder(model, layers=["0"], stats=["mean", "quantiles"], path=tmp_path, flush_every=4)
    with rec:
        for _ in range(10):
            model(torch.randn(6, 5))
            rec.step()
            if rec.current_step == 8:
                rec.flush(wait=True)
                assert len(list((tmp_path / "stats").glob("chunk-*.parquet"))) == 2
    assert len(list((tmp_path / "stats").glob("chunk-*.parquet"))) == 3
    df = load_run(tmp_path)
    pd.testing.assert_frame_equal(df.reset_index(drop=True), rec.to_frame().reset_index(drop=True))
    assert sorted(df.step.unique()) == list(range(10))
    sub = rec.to_frame(stats=["q0.5"], steps=(2, 5))
    assert sorted(sub.step.unique()) == [2, 3, 4] and set(sub.stat.unique()) == {"q0.5"}


def test_read_filters_take_single_names_globs_and_quantiles_and_reject_what_was_not_recorded(tmp_path):
    model = nn.Sequential()
    model.add_module("block1", nn.Linear(5, 4))
    model.add_module("block2", nn.Linear(4, 3))
    model.add_module("head", nn.Linear(3, 2))
    rec = icsk.Recorder(model, stats=["mean", "quantiles", "hist"], quantiles=(0.25, 0.75), path=tmp_path)
    with rec:
        for _ in range(4):
            model(torch.randn(6, 5))
            rec.step()
    full = rec.to_frame()
    for read in (rec.to_frame, lambda **kw: load_run(tmp_path, **kw)):
        one = read(layers="block1", stats="mean", steps=2)
        assert set(one.layer) == {"block1"} and set(one.stat) == {"mean"} and set(one.step) == {2}
        assert len(one) == 4 and one.value.tolist() == full[(full.layer == "block1") & (full.stat == "mean") & (full.step == 2)].value.tolist()
        assert set(read(layers=["block*"]).layer) == {"block1", "block2"}
        assert set(read(stats=["quantiles"]).stat) == {"q0.25", "q0.75"}
        with pytest.raises(ValueError, match=r"layer 'blok1' was not recorded.*'block1'"):
            read(layers=["blok1"])
        with pytest.raises(ValueError, match=r"statistic 'median' was not recorded.*'q0.25'") as err:
            read(stats="median")
        assert "'hist'" not in str(err.value)  # not offered: the frame refuses it
        with pytest.raises(ValueError, match=r"histograms\(\)"):
            read(stats=["hist"])
        with pytest.raises(ValueError, match="mode must be 'train', 'eval', 'probe' or None"):
            read(mode="test")
    assert set(rec.histograms(layers="head*").layer) == {"head"}
    assert load_run(tmp_path, layers=["blok1", "head"], strict=False).layer.unique().tolist() == ["head"]
    assert load_run(tmp_path, layers="blok1", strict=False).empty and load_run(tmp_path, "hist", steps=[]).empty


def test_reading_histograms_that_were_not_recorded_says_so(tmp_path):
    model = nn.Sequential(nn.Linear(5, 4))
    with icsk.Recorder(model, stats=["mean"], path=tmp_path) as rec:
        model(torch.randn(6, 5))
        rec.step()
    for read in (rec.histograms, lambda: load_run(tmp_path, "hist")):
        with pytest.raises(ValueError, match=r"histograms were not recorded here \(stats: \['mean'\]\).*'hist'"):
            read()
    assert load_run(tmp_path, "hist", strict=False).empty


def test_chunks_are_cut_by_steps_or_by_size(tmp_path):
    model = nn.Sequential(nn.Linear(5, 4))
    # 4 units x (mean + 2-bin histogram with under/overflow = 5 values) x 4 bytes = 80 bytes a step
    rec = icsk.Recorder(model, layers=["0"], stats=["mean", "hist"], hist_bins=2, path=tmp_path / "size",
                        flush_every=1000, flush_mb=240 / 2**20)
    with rec:
        for _ in range(10):
            model(torch.randn(6, 5))
            rec.step()
            rec._writer.wait()
            chunks = len(list((tmp_path / "size" / "stats").glob("chunk-*.parquet")))
            assert chunks == rec.current_step // 3, rec.current_step
    assert sorted(load_run(tmp_path / "size").step.unique()) == list(range(10))
    with pytest.raises(icsk.RecorderError, match="flush_mb"):
        icsk.Recorder(model, flush_mb=0)


def test_values_are_float32_bytes_and_older_list_chunks_read_the_same(tmp_path):
    """A chunk's values column is float32 bytes; a folder that also holds a chunk in the older
    list<float32> layout (say, resumed by a newer icsk) reads back as one frame."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4))
    with icsk.Recorder(model, layers=["0"], stats=["mean", "var", "hist"], hist_range=(-1, 1), hist_bins=3,
                       path=tmp_path, flush_every=3) as rec:
        for _ in range(6):
            model(torch.randn(7, 5))
            rec.step()
    want, want_hist = load_run(tmp_path), load_run(tmp_path, "hist")
    first = sorted((tmp_path / "stats").glob("chunk-*.parquet"))[0]
    table = pq.read_table(first)
    assert table.schema.field("values").type == pa.large_binary()
    row = table.filter(pa.compute.equal(table.column("stat"), "mean")).column("values")[0].as_py()
    step0 = want[(want.step == 0) & (want.stat == "mean")].sort_values("unit")["value"].to_numpy()
    np.testing.assert_array_equal(np.frombuffer(row, "<f4"), step0)
    as_lists = [np.frombuffer(v.as_py(), "<f4").tolist() for v in table.column("values")]
    old = table.set_column(table.column_names.index("values"), "values", pa.array(as_lists, pa.list_(pa.float32())))
    pq.write_table(old, first)
    pd.testing.assert_frame_equal(load_run(tmp_path), want)
    pd.testing.assert_frame_equal(load_run(tmp_path, "hist"), want_hist)


def test_load_run_errors_name_the_folder(tmp_path):
    with pytest.raises(icsk.RunFolderError, match="no such run folder"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(icsk.RunFolderError, match="not an icsk run folder"):
        load_run(tmp_path / "empty")


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")
def test_worker_threads_run_single_threaded_at_idle_priority(tmp_path, monkeypatch):
    """Reducer and writer threads must never preempt training threads nor start OpenMP teams."""
    monkeypatch.setattr(background, "_promoted", False)  # (an earlier test may have starved workers)
    before = torch.get_num_threads()
    rec = icsk.Recorder(nn.Sequential(nn.Linear(3, 2)), path=tmp_path)
    assert torch.get_num_threads() == before  # the process-wide count is left alone
    workers = [*rec._reduce_pool._threads, *rec._writer._pool._threads]
    assert sorted(t.name.split("_")[0] for t in workers) == ["icsk-reduce", "icsk-writer"]
    for t in workers:
        assert os.sched_getscheduler(t.native_id) == os.SCHED_IDLE, t.name
    assert rec._reduce_pool.submit(torch.get_num_threads).result() == 1
    rec.close()


@pytest.fixture
def idle_worker(monkeypatch):
    """A fresh one-worker background pool at idle priority, with the module's state reset and a
    short STARVED_S: ``(pool, the worker's native id)``."""
    if not hasattr(os, "SCHED_IDLE"):
        pytest.skip("SCHED_IDLE is Linux-only")
    monkeypatch.setattr(background, "_promoted", False)
    monkeypatch.setattr(background, "_warned", False)
    monkeypatch.setattr(background, "_idle_workers", set())
    monkeypatch.setattr(background, "STARVED_S", 0.05)
    pool = background.background_pool("icsk-test")
    tid = pool.submit(threading.get_native_id).result()
    assert os.sched_getscheduler(tid) == os.SCHED_IDLE and background._idle_workers == {tid}
    yield pool, tid
    pool.shutdown()


@pytest.mark.parametrize("permitted", [True, False])
def test_a_starved_idle_worker_is_promoted_or_named_in_a_warning(monkeypatch, idle_worker, permitted):
    """Other processes keeping every core busy starve an idle-priority worker, and training
    waits on it (9 s became 102 s with two busy loops on 2 cores): a long wait moves the workers
    to normal priority, or, where that is not permitted, warns to set ICSK_IDLE_WORKERS=0."""
    import time

    pool, tid = idle_worker
    if not permitted:
        def refuse(pid, policy, param):
            raise PermissionError(1, "Operation not permitted")
        monkeypatch.setattr(os, "sched_setscheduler", refuse)
    assert isinstance(background._runqueue_wait_ns(), int)  # this worker's schedstat reads
    waits = iter(range(0, 10**11, 10**9))  # the worker waits for a core all the time (simulated)
    monkeypatch.setattr(background, "_runqueue_wait_ns", lambda: next(waits))
    slow = pool.submit(time.sleep, 0.3)
    if permitted:
        background.wait_for(slow)
        assert os.sched_getscheduler(tid) == os.SCHED_OTHER and not background._idle_workers
        assert background._promoted  # later workers start at normal priority
    else:
        with pytest.warns(RuntimeWarning, match="ICSK_IDLE_WORKERS=0"):
            background.wait_for(slow)
        assert os.sched_getscheduler(tid) == os.SCHED_IDLE


def test_a_worker_that_is_slow_but_not_starved_stays_idle_without_a_warning(idle_worker, recwarn):
    """A long job on a worker that gets the CPU it asks for (a first Triton compile on a GPU
    machine; here a sleep) is not starvation: nothing is promoted and nothing warns."""
    import time

    pool, tid = idle_worker
    assert background.wait_for(pool.submit(lambda: time.sleep(0.4) or 7)) == 7
    assert os.sched_getscheduler(tid) == os.SCHED_IDLE and background._idle_workers == {tid}
    assert not background._promoted and not [w for w in recwarn if "ICSK_IDLE_WORKERS" in str(w.message)]


def test_sigterm_under_graceful_signals_flushes_what_was_recorded(tmp_path):
    """The README's recipe for scripts: SIGTERM mid-training still leaves every recorded step on disk."""
    proc = _run_script(tmp_path, (
        "import signal\n"
        "from icsk.experiment import graceful_signals\n"
        "with graceful_signals(), icsk.Recorder(m, path='run', stats=['mean'], flush_every=1000) as rec:\n"
        "    for i in range(100):\n"
        "        m(torch.randn(5, 4)); rec.step()\n"
        "        if i == 50:\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n"))
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr
    assert sorted(set(load_run(tmp_path / "run").step)) == list(range(51))


def test_a_second_recorder_on_a_used_path_refuses_to_mix_steps_and_continues_it_after(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    kw = dict(path=tmp_path, stats=["mean", "hist"], hist_bins=5, flush_every=1)  # a chunk per step
    with icsk.Recorder(model, layers=["0", "2"], **kw) as rec:
        for _ in range(3):
            model(torch.randn(4, 3))
            rec.step()
    first = rec.histograms(layers="0")
    edges = rec.hist_edges()
    for start in (0, 2):  # step 2 is in the last of three chunks
        with pytest.raises(icsk.RecorderError, match=r"already holds statistics up to step 2.*start_step=3"):
            with icsk.Recorder(model, layers=["2"], start_step=start, **kw):
                model(torch.randn(4, 3))
    with pytest.raises(icsk.RecorderError, match=r"recorded with stats=\['mean', 'hist'\].*same settings"):
        with icsk.Recorder(model, layers=["2"], start_step=3, **{**kw, "stats": ["mean"]}):
            model(torch.randn(4, 3))
    with icsk.Recorder(model, layers=["2"], start_step=3, **kw) as rec2:
        model(torch.randn(4, 3) * 100)  # far outside the first session's range
        rec2.step()
    assert rec2.hist_edges() == {("2", "train"): edges[("2", "train")]}  # the same bins as before
    df = load_run(tmp_path)
    assert df[df.stat == "mean"].groupby("step").size().tolist() == [6, 6, 6, 2]  # no step twice
    pd.testing.assert_frame_equal(load_run(tmp_path, "hist", layers="0"), first)  # session 1 reads as before
    h = load_run(tmp_path, "hist", layers="2")
    assert h[h.step == 3].left.iloc[1] == h[h.step == 0].left.iloc[1]


def test_load_run_filters_across_arms_that_record_different_layers(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    for arm, layers in (("a", ["0", "2"]), ("b", ["2"])):
        with icsk.Recorder(model, layers=layers, stats=["mean", "quantiles"], path=tmp_path / "arms" / arm) as rec:
            model(torch.randn(5, 3))
            rec.step()
    only_a = load_run(tmp_path, layers="0", stats="quantiles")
    assert set(only_a.arm) == {"a"} and set(only_a.stat) == {"q0.15", "q0.5", "q0.85"} and len(only_a) == 12
    assert set(load_run(tmp_path, layers="2").arm) == {"a", "b"}
    with pytest.raises(ValueError, match=r"layer '1' was not recorded.*\['0', '2'\]"):
        load_run(tmp_path, layers=["1"])


# ---------------------------------------------------------------------- user models in the wild
def test_variable_shapes_keep_staging_memory_bounded_and_numbers_right(monkeypatch):
    """Sequence lengths that change every step (dynamic padding) restage the layer each step; with a
    reducer slower than training, the copies must wait for it instead of queueing without bound."""
    monkeypatch.setattr(icsk.hooks, "spare_core", lambda: True)  # reduced on the reducer thread
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16))
    rec = icsk.Recorder(model, layers=["0"], stats=["mean", "var"], channel_dim=-1)
    slow = rec._stage_reducer.reduce_staged

    def reduce_slowly(*a, **k):
        threading.Event().wait(0.01)
        return slow(*a, **k)

    monkeypatch.setattr(rec._stage_reducer, "reduce_staged", reduce_slowly)
    ref, queued = Capture(model[0]), []
    with rec, torch.no_grad():
        for step in range(30):
            model(torch.randn(4, 4 + step % 7, 8))
            queued.append(rec._reduce_pool._work_queue.qsize())
            rec.step()
    ref.h.remove()
    assert max(queued) <= 2, queued  # one per staging buffer at most
    df = rec.to_frame()
    for step in (0, 13, 29):
        u = ref.values[step].reshape(-1, 16)  # units on the last axis
        np.testing.assert_allclose(frame_values(df, step, "0", "mean"), u.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(frame_values(df, step, "0", "var"), u.var(0, ddof=1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("width", [4, 64])  # staged, and reduced inside the hook
def test_a_first_forward_under_inference_mode_does_not_break_training_forwards(width):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, width, 3, padding=1))
    rec = icsk.Recorder(model, layers=["0"], stats=["mean", "quantiles"], modes=("train", "eval"),
                        stage_mb=1)
    ref = Capture(model[0])
    xs = [torch.randn(16, 3, 16, 16) for _ in range(3)]
    with rec:
        model.eval()
        with torch.inference_mode():
            model(xs[0])
        model.train()
        for x in xs:
            model(x).mean().backward()
            rec.step()
        model.eval()
        with torch.no_grad():  # the eval state's buffers were made under inference_mode
            model(xs[1])
        rec.step()
    ref.h.remove()
    ev = rec.to_frame(mode="eval")
    np.testing.assert_allclose(frame_values(ev, 3, "0", "mean"), reference(ref.values[4])["mean"], rtol=1e-4, atol=1e-5)
    df = rec.to_frame()
    for step, a in enumerate(ref.values[1:4]):  # [0]: the eval forward under inference_mode
        want = reference(a)
        for stat in ("mean", "q0.5"):
            np.testing.assert_allclose(frame_values(df, step, "0", stat), want[stat], rtol=1e-4, atol=1e-5)


def test_a_copy_of_the_model_is_not_recorded_and_pickles(tmp_path):
    import copy
    import pickle

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    rec = icsk.Recorder(model, layers=[model[0]], stats=["mean"])  # a module instance as the selector
    x = torch.randn(8, 4)
    want = model(x).detach().double().mean(0).numpy()  # the weights never change here
    with rec:
        model(x)
        rec.step()
        ema = copy.deepcopy(model)
        with torch.no_grad():
            ema[0].bias.fill_(1000.0)
        for _ in range(2):
            ema(x)  # first in the step: must not be recorded as the model's
            model(x)
            rec.step()
        clone = pickle.loads(pickle.dumps(model))
        assert torch.equal(clone(x), model(x))
        rec.step()
        shallow = copy.copy(model[0])  # shares the hook dict with the original
        shallow(x * 100)  # first in the step: must not be recorded as the model's
        model(x)
    df = rec.to_frame()
    for step in range(5):  # step 3: the model's forward next to the clone's; 4: next to the shallow copy's
        np.testing.assert_allclose(frame_values(df, step, "0", "mean"), want, rtol=1e-5)
    ema(x), clone(x)  # the copies' inert hooks do nothing after exit either
    assert rec.to_frame().step.max() == 4
    with pytest.raises(icsk.RecorderError, match="not a submodule of this model"):
        icsk.Recorder(model, layers=[nn.Linear(4, 3)])


def test_data_parallel_replicas_are_recorded():
    """DataParallel calls replicas of each module that share its hooks: those are the model's forwards."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(8, 4)
    with icsk.Recorder(model, layers=["0"], stats=["mean"]) as rec:
        replica = model[0]._replicate_for_data_parallel()  # as nn.parallel.replicate makes them
        replica._parameters = dict(model[0]._parameters)  # (which then gives each replica its device's copies)
        replica(x)
        rec.step()
    np.testing.assert_allclose(frame_values(rec.to_frame(), 0, "0", "mean"), model(x).double().mean(0).detach().numpy(),
                               rtol=1e-5)


@pytest.mark.parametrize("shapes", ["fixed", "varying"])
def test_data_parallel_replicas_in_threads_record_one_replica_per_step(shapes):
    """parallel_apply runs the replicas' forwards in threads at once: each step must hold one
    replica's statistics, whole (it mixed rows, wrote staging memory never filled, or crashed)."""

    class Tap(nn.Module):
        def forward(self, x):
            return x

    model = nn.Sequential(Tap())
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # thread switches inside the hooks, as often as possible
    try:
        with icsk.Recorder(model, layers=["0"], stats=["mean", "quantiles"], flush_every=7) as rec:
            for step in range(120):
                n = 4 + step % 3 if shapes == "varying" else 4
                replicas = [model[0]._replicate_for_data_parallel() for _ in range(2)]
                xs = [torch.full((n, 3), 10.0 * step + i) for i in range(2)]
                threads = [threading.Thread(target=r, args=(x,)) for r, x in zip(replicas, xs, strict=True)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                rec.step()
    finally:
        sys.setswitchinterval(interval)
    df = rec.to_frame()
    assert sorted(df.step.unique()) == list(range(120))
    for step, rows in df[df.stat != "count"].groupby("step"):
        assert len(rows) == 4 * 3, step  # mean and three quantiles of 3 units, once
        assert rows.value.nunique() == 1 and rows.value.iloc[0] in (10.0 * step, 10.0 * step + 1), step


def test_replicas_record_the_device_of_the_models_own_weights_whichever_runs_first():
    """DataParallel keeps the model on device_ids[0], whose replica always gets a slice of the
    batch: that replica is recorded even when another device's replica reaches the hook first
    (here a replica on the meta device, which has no values at all, runs first every step)."""
    lin = nn.Linear(3, 2)
    model = nn.Sequential(lin)

    def replica(device):
        r = lin._replicate_for_data_parallel()
        r.weight, r.bias = (t.detach().to(device) for t in (lin.weight, lin.bias))
        return r

    with icsk.Recorder(model, layers=["0"], stats=["mean"], flush_every=3) as rec:
        for step in range(5):
            replica("meta")(torch.ones(4, 3, device="meta"))
            replica("cpu")(torch.full((4, 3), float(step)))
            rec.step()
    df = rec.to_frame()
    for step in range(5):
        np.testing.assert_allclose(frame_values(df, step, "0", "mean"),
                                   lin(torch.full((1, 3), float(step)))[0].detach().numpy(), rtol=1e-6)


@needs_cuda
def test_replicas_on_two_devices_record_the_first_device_and_a_moved_model_keeps_its_steps():
    """DataParallel: a step's forward on another device than the first recorded one is another
    replica's slice, left out; the model itself moving between devices within a chunk is kept."""

    class Tap(nn.Module):
        def forward(self, x):
            return x

    model = nn.Sequential(Tap())
    with icsk.Recorder(model, layers=["0"], stats=["mean"], flush_every=100) as rec:
        for step in range(4):
            replicas = [model[0]._replicate_for_data_parallel() for _ in range(2)]
            order = ["cuda", "cpu"] if step == 0 else ["cpu", "cuda"]
            for r, dev in zip(replicas, order, strict=True):
                r(torch.full((4, 2), 10.0 * step + (dev == "cpu"), device=dev))
            rec.step()
        for step in range(4, 8):  # the model itself: on the CPU, then on the GPU
            model(torch.full((4, 2), 10.0 * step, device="cpu" if step < 6 else "cuda"))
            rec.step()
    df = rec.to_frame()
    for step in range(8):
        np.testing.assert_array_equal(frame_values(df, step, "0", "mean"), [10.0 * step] * 2)


def test_select_is_applied_once():
    class Nested(nn.Module):
        def forward(self, x):
            return (x, x * 100), "aux"

    with icsk.Recorder(nn.Sequential(Nested()), layers=["0"], select=0) as rec:
        with pytest.raises(icsk.RecorderError, match="gives a tuple"):
            rec.model(torch.randn(4, 3))


def test_two_live_recorders_on_one_path_are_refused_and_a_dead_writer_is_taken_over(tmp_path):
    a, b = nn.Sequential(nn.Linear(4, 2)), nn.Sequential(nn.Linear(4, 2))
    first = icsk.Recorder(a, layers=["0"], stats=["mean"], path=tmp_path)
    with first:
        with pytest.raises(icsk.RecorderError, match="another writer"):
            with icsk.Recorder(b, layers=["0"], stats=["mean"], path=tmp_path):
                pass
        a(torch.randn(5, 4))
        first.step()
    assert not (tmp_path / "stats" / ".writer").exists()
    # a claim file nobody holds (a killed writer's, even one naming this very process) is taken over
    (tmp_path / "stats" / ".writer").write_text(f"pid {os.getpid()}")
    with icsk.Recorder(b, layers=["0"], stats=["mean"], path=tmp_path, start_step=1) as rec:
        b(torch.randn(5, 4))
        rec.step()
    assert sorted(load_run(tmp_path).step.unique()) == [0, 1]


def test_selected_outputs_take_the_fast_path_and_named_tuple_fields(monkeypatch):
    from collections import namedtuple

    Out = namedtuple("Out", "logits aux")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return Out(self.lin(x), None)

    class Top(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Net()

        def forward(self, x):
            return self.net(x).logits

    torch.manual_seed(0)
    model = Top()
    rec = icsk.Recorder(model, layers=["net"], stats=["mean"], select="logits")
    slow_calls = []
    real = rec._capture_slow
    monkeypatch.setattr(rec, "_capture_slow", lambda *a: (slow_calls.append(1), real(*a)))
    ref = Capture(model.net.lin)
    with rec:
        for _ in range(20):
            model(torch.randn(6, 4))
            rec.step()
    ref.h.remove()
    assert len(slow_calls) == 1  # staged after the first step, like a plain tensor output
    df = rec.to_frame()
    for step in (0, 19):
        np.testing.assert_allclose(frame_values(df, step, "net", "mean"), ref.values[step].mean(0), rtol=1e-5)


def test_capture_input_given_as_the_only_keyword_argument():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.Tanh()

        def forward(self, x):
            return self.act(input=x * 2)

    x = torch.randn(6, 3)
    with icsk.Recorder(Net(), layers=["act"], stats=["mean"], capture="input") as rec:
        rec.model(x)
        rec.step()
    np.testing.assert_allclose(frame_values(rec.to_frame(), 0, "act", "mean"), (x * 2).double().mean(0).numpy(),
                               rtol=1e-5)


@pytest.mark.parametrize("change", [{"capture": "input"}, {"sat_threshold": 1.0}, {"channel_dim": -1}])
def test_continuing_a_path_with_settings_that_change_the_numbers_is_refused(tmp_path, change):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with icsk.Recorder(model, layers=["1"], path=tmp_path) as rec:
        model(torch.randn(5, 4))
        rec.step()
    with pytest.raises(icsk.RecorderError, match=next(iter(change))):
        with icsk.Recorder(model, layers=["1"], path=tmp_path, start_step=1, **change) as rec:
            model(torch.randn(5, 4))


@pytest.mark.parametrize("width", [6, 2])
def test_continuing_a_path_with_a_layer_of_another_width_is_refused(tmp_path, width):
    """Its histograms would lose units (or not load) next to the earlier steps' rows."""
    def session(w: int, start: int) -> None:
        model = nn.Sequential(nn.Linear(3, w))
        with icsk.Recorder(model, layers=["0"], stats=["mean", "hist"], path=tmp_path, start_step=start) as rec:
            for _ in range(2):
                model(torch.randn(30, 3))
                rec.step()

    session(4, 0)
    with pytest.raises(icsk.RecorderError, match=f"has {width} units.*with 4 units"):
        session(width, 2)
    session(4, 2)  # the same model continues it
    assert sorted(icsk.load_run(tmp_path, "hist").query("step == 3").unit.unique()) == [0, 1, 2, 3]
    assert sorted(icsk.load_run(tmp_path).step.unique()) == [0, 1, 2, 3]


def test_torch_compile_runs_the_hooks_eagerly_without_recompiling():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    xs = [torch.randn(5, 4) for _ in range(12)]
    with icsk.Recorder(model, layers=["1"], stats=["mean"]) as rec:
        for step, x in enumerate(xs):
            compiled(x).sum().backward()  # no optimizer step: the weights stay as they are
            rec.step()
            if step == 2:
                after_warmup = len(graphs)
    assert len(graphs) == after_warmup  # no recompiles: the hooks' state is not guarded on
    df = rec.to_frame()
    with torch.no_grad():
        for step in (0, 11):
            want = model[1](model[0](xs[step])).double().mean(0).numpy()
            np.testing.assert_allclose(frame_values(df, step, "1", "mean"), want, rtol=1e-5)


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_signal_during_the_hand_over_of_a_chunk_loses_and_repeats_nothing(tmp_path, when):
    """Ctrl-C (KeyboardInterrupt) landing while a chunk is handed to the writer, before or after it
    is queued: close() then writes every recorded step exactly once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    rec = icsk.Recorder(model, layers=["0"], stats=["mean"], path=tmp_path, flush_every=4)
    real_queue = rec._writer._queue
    calls = []

    def queue(*a):
        calls.append(1)
        if len(calls) == 2 and when == "before":
            raise KeyboardInterrupt
        out = real_queue(*a)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return out

    rec._writer._queue = queue
    with pytest.raises(KeyboardInterrupt), rec:
        for _ in range(20):
            model(torch.randn(5, 4))
            rec.step()
    steps = load_run(tmp_path).query("stat == 'mean'").groupby("step").size()
    assert list(steps.index) == list(range(8)) and (steps == 3).all()


def test_select_leaves_tensor_subclass_outputs_alone():
    """select= picks from tuples and dicts; an output that is a tensor (of a subclass too) is recorded as it is."""

    class Marked(torch.Tensor):
        pass

    class Net(nn.Module):
        def forward(self, x):
            return (x * 2).as_subclass(Marked)

    x = torch.randn(6, 3)
    with icsk.Recorder(nn.Sequential(Net()), layers=["0"], stats=["mean"], select=0) as rec:
        rec.model(x)
        rec.step()
    np.testing.assert_allclose(frame_values(rec.to_frame(), 0, "0", "mean"), (x * 2).double().mean(0).numpy(), rtol=1e-5)
