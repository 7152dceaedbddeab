"""Divergence, interruption, resume, bad input and determinism of the training job."""

from __future__ import annotations

import json
import re
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

import icsk
from icsk.config import compose
from icsk.experiment import ConfigError, run
from icsk.store import ChunkWriter, read_chunks

ROOT = Path(__file__).resolve().parents[1]
BASE = ["experiment=demo", "logger=none", "train.progress=false", "train.log_every=5"]


def job(tmp_path, *extra, steps=30):
    cfg = compose([*BASE, f"train.steps={steps}", "train.eval_every=10", "train.checkpoint_every=0", *extra])
    return run(cfg, tmp_path)


def cli(run_dir: Path, *extra: str, env_extra: dict | None = None, wait: bool = True):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", **(env_extra or {})}
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *BASE, f"hydra.run.dir={run_dir}", *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def frames(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    st = icsk.load_run(run_dir).sort_values(["arm", "step", "layer", "stat", "unit"]).reset_index(drop=True)
    mt = icsk.load_run(run_dir, table="metrics").sort_values(["arm", "step", "metric", "layer"]).reset_index(drop=True)
    return st, mt


def test_diverging_arm_stops_while_the_other_goes_on(tmp_path):
    info = job(tmp_path, "model.activation=relu", "optim.lr=5", steps=60)
    arms = info["arms"]
    assert arms["bn"]["status"] == "finished" and arms["bn"]["last_step"] == 59
    assert arms["none"]["status"] == "diverged"
    s = arms["none"]["diverged_step"]
    assert 0 < s < 60 and "non-finite" in arms["none"]["reason"]
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["arms"]["none"]["diverged_step"] == s and saved["status"] == "finished"
    m = icsk.load_run(tmp_path, table="metrics")
    assert m[(m.metric == "diverged")].step.tolist() == [s]
    df = icsk.load_run(tmp_path, stats=["nonfinite"])
    none = df[df.arm == "none"]
    if torch.cuda.is_available():  # no host sync per step: found at the next loss transfer (log_every=5)
        assert s <= none.step.max() < s + 5
    else:
        assert none.step.max() == s  # the diverging forward is recorded, nothing after it
    assert df[df.arm == "bn"].step.max() == 59


def test_same_seed_gives_bit_identical_frames(tmp_path):
    job(tmp_path / "a", "model.arms=[bn,noisy_bn]", steps=25)
    job(tmp_path / "b", "model.arms=[bn,noisy_bn]", steps=25)
    for fa, fb in zip(frames(tmp_path / "a"), frames(tmp_path / "b"), strict=True):
        pd.testing.assert_frame_equal(fa, fb, check_exact=True)
    job(tmp_path / "c", "model.arms=[bn,noisy_bn]", "seed=1", steps=25)
    assert not frames(tmp_path / "a")[0].value.equals(frames(tmp_path / "c")[0].value)


def test_resume_without_a_checkpoint_trains_again_without_duplicate_rows(tmp_path):
    """checkpoint_every=0 (the sweep presets) or a kill before the first checkpoint: resume=true
    starts over, and the folder ends up as a fresh run's, not with steps recorded twice."""
    job(tmp_path / "fresh", "recorder.flush_every=8", steps=20)
    job(tmp_path / "again", "recorder.flush_every=8", steps=20)  # the earlier attempt's rows are on disk
    job(tmp_path / "again", "recorder.flush_every=8", "resume=true", steps=20)
    for fa, fb in zip(frames(tmp_path / "fresh"), frames(tmp_path / "again"), strict=True):
        pd.testing.assert_frame_equal(fa, fb, check_exact=True)


def test_resume_refuses_other_settings_and_prints_the_command_that_works(tmp_path):
    """A resume must not train on with settings the run did not start with (the README's
    'resume=true in its folder' used to rebuild the job from the defaults): it is refused with a
    command that resumes it, valid for the shell and for Hydra also when the folder's name holds
    '=' and ',' (Hydra's override_dirname); config.yaml stays the run's; where/how-it-prints
    settings may change, and so may keys the run's config predates or that an override set
    through an interpolation that resolves anew."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    run_dir = tmp_path / "optim.lr=0.3,seed=0"
    first = [*BASE, "train.steps=20", "train.eval_every=0", "train.checkpoint_every=10", "optim.lr=0.3",
             "model.arms=[bn,none]", "resume=false", "name=demo_${now:%H%M%S%f}", "+model.options.momentum=0.5"]
    run(compose(first), run_dir, overrides=first)
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, "status": "interrupted"}))  # (a finished one: see below)
    saved = (run_dir / "config.yaml").read_text()
    with pytest.raises(ConfigError) as err:
        run(compose(["resume=true", "logger=none"]), run_dir)
    msg = str(err.value)
    assert "optim.lr: 0.3 in the run, 0.5 now" in msg and "train.steps: 20 in the run, 2000 now" in msg
    assert msg.endswith("start a new run folder.")
    cmd = shlex.split(msg.split("Resume it with: ")[1].split(". Only ")[0])
    assert cmd[0] == "icsk-train" and cmd[1:-2] == [o for o in first if o != "resume=false"]
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(cmd[-2:])}
    assert parsed == {"resume": True, "hydra.run.dir": str(run_dir)}
    assert (run_dir / "config.yaml").read_text() == saved
    # a key only one launch sets (+key=..., ~key) is a difference; so is a literal instead of the
    # interpolation the run was started with
    again = [o for o in cmd[1:-2] if not o.startswith("+model.options")]
    for other, key in [(again, "model.options.momentum: 0.5 in the run, (unset) now"),
                       ([*cmd[1:-2], "~metrics.bn_gap"], "metrics.bn_gap.enabled: False in the run, (unset) now"),
                       ([*cmd[1:-2], "name=other"], "name: demo_")]:
        with pytest.raises(ConfigError, match=re.escape(key)):
            run(compose([*other, "resume=true"]), run_dir, overrides=[*other, "resume=true"])
    # a key added to icsk since the run started (absent from its config.yaml, null) is no difference
    assert "  probe_schedule: null\n" in saved
    (run_dir / "config.yaml").write_text(saved.replace("  probe_schedule: null\n", ""))
    args = [*cmd[1:-2], "resume=true", "train.progress=true", "device=cpu"]
    info = run(compose(args), run_dir, overrides=args)
    assert info["status"] == "finished" and info["overrides"] == first
    assert "probe_schedule" not in (run_dir / "config.yaml").read_text()


@pytest.mark.parametrize("log_every", [1, 3])
def test_logged_learning_rate_is_the_one_the_logged_step_used(tmp_path, log_every):
    """A cosine schedule from lr 1 over 6 steps: step s trains with 0.5 (1 + cos(pi s / 6)); the
    row logged at step s must carry that, not the next step's rate."""
    cfg = compose([*BASE, "train.steps=6", "train.eval_every=0", "train.checkpoint_every=0", "optim.lr=1",
                   "optim.schedule=cosine", f"train.log_every={log_every}", "model.arms=[none]"])
    run(cfg, tmp_path)
    m = icsk.load_run(tmp_path, table="metrics")
    lr = m[m.metric == "lr"].sort_values("step")
    want = 0.5 * (1 + np.cos(np.pi * lr.step.to_numpy() / 6))
    assert lr.step.tolist() == list(range(log_every - 1, 6, log_every))
    np.testing.assert_allclose(lr.value.to_numpy(), want, rtol=1e-6)


@pytest.mark.parametrize("steps", [1, 2, 8])
def test_the_step_schedule_drops_at_half_and_three_quarters_of_the_run(steps):
    """x0.1 at 50 % and again at 75 % of train.steps; a one-step run kept both drops at step 0."""
    from icsk.experiment import build_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(compose(["optim.schedule=step"]).optim, opt, steps)
    got = []
    for _ in range(steps):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = {1: [1.0], 2: [1.0, 0.01], 8: [1.0] * 4 + [0.1] * 2 + [0.01] * 2}[steps]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_a_slurm_time_out_closes_the_run_as_interrupted(tmp_path, monkeypatch):
    """submitit's SIGUSR2 handler raises UncompletedJobError (a RuntimeError) at a time-out it does
    not requeue: that is an interruption, as the README and the slurm launcher config say."""
    import icsk.experiment as experiment

    class UncompletedJobError(RuntimeError):
        pass

    real_run = experiment.Trainer.run

    def run_then_time_out(self, *a, **k):
        self.steps = 6
        real_run(self, *a, **k)
        raise UncompletedJobError("Job not requeued because: timed-out too many times.")

    monkeypatch.setattr(experiment.Trainer, "run", run_then_time_out)
    with pytest.raises(UncompletedJobError):
        job(tmp_path, steps=20)
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["status"] == "interrupted" and "error" not in info
    assert info["arms"]["bn"]["last_step"] == 5


@pytest.mark.parametrize("case", ["cosine", "step", "diverging"])
def test_a_run_resumes_from_its_checkpoint_bit_identically(tmp_path, monkeypatch, case):
    """Cut at step 14 (checkpoint at 12) and resumed, a run equals the uninterrupted one: the cosine
    factor was a numpy scalar that torch.load(weights_only=True) refused; a checkpoint between
    two loss logs (log_every 7) logged the partial window there; the reason of a divergence (at
    step 11 in the diverging case) was lost."""
    import icsk.experiment as experiment

    # on the CPU, as README promises: a GPU's reductions split by shape, so a step reduced in a
    # batch of another size (the checkpoints cut the staging batches) may differ in its last bits
    opts = ["train.checkpoint_every=6", "train.eval_every=5", "train.log_every=7", "optim.warmup_steps=3", "device=cpu"]
    opts += ["model.activation=relu", "optim.lr=5"] if case == "diverging" else [f"optim.schedule={case}"]
    job(tmp_path / "full", *opts, steps=20)
    job(tmp_path / "plain", *opts[1:], steps=20)  # no checkpoints: the same rows
    real_run = experiment.Trainer.run

    def run_then_stop(self, *a, **k):
        self.steps = 14
        real_run(self, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment.Trainer, "run", run_then_stop)
    with pytest.raises(KeyboardInterrupt):
        job(tmp_path / "cut", *opts, steps=20)
    monkeypatch.setattr(experiment.Trainer, "run", real_run)
    job(tmp_path / "cut", *opts, "resume=true", steps=20)
    for run_dir in ("plain", "cut"):
        for fa, fb in zip(frames(tmp_path / "full"), frames(tmp_path / run_dir), strict=True):
            pd.testing.assert_frame_equal(fa, fb, check_exact=True)
    m = frames(tmp_path / "full")[1]
    assert sorted(m[(m.metric == "loss") & (m.arm == "bn")].step) == [6, 13, 19]
    infos = [json.loads((tmp_path / d / "run.json").read_text()) for d in ("full", "cut")]
    assert infos[0]["status"] == infos[1]["status"] == "finished"
    assert infos[0]["arms"] == infos[1]["arms"]
    if case == "diverging":
        assert infos[1]["arms"]["none"]["status"] == "diverged" and "non-finite" in infos[1]["arms"]["none"]["reason"]


@pytest.mark.parametrize("where", ["run_eval", "load_checkpoint"])
def test_a_failure_before_the_first_step_closes_the_run_as_failed(tmp_path, monkeypatch, where):
    """The first evaluation (or a resume's checkpoint load) ran after run.json said "running" but
    outside the block that closes it: a failure there left it "running", with no error."""
    import icsk.experiment as experiment

    if where == "load_checkpoint":
        job(tmp_path, "train.checkpoint_every=5", steps=10)
        info = json.loads((tmp_path / "run.json").read_text())
        (tmp_path / "run.json").write_text(json.dumps({**info, "status": "interrupted"}))

    def fail(self, *a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(experiment.Trainer, where, fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        job(tmp_path, *(["resume=true", "train.checkpoint_every=5"] if where == "load_checkpoint" else []), steps=10)
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["status"] == "failed" and info["error"] == "RuntimeError: disk on fire"
    assert set(info["arms"]) == {"bn", "none"}


def test_a_requeue_exit_closes_the_run_as_interrupted(tmp_path, monkeypatch):
    """submitit calls sys.exit(-1) when SLURM pre-empts or requeues the job: the run is closed as
    interrupted (resumable), not left 'running'."""
    import icsk.experiment as experiment

    real_step = experiment.Trainer.train_step

    def train_step(self, *a, **k):
        if self.step == 5:
            raise SystemExit(-1)
        return real_step(self, *a, **k)

    monkeypatch.setattr(experiment.Trainer, "train_step", train_step)
    with pytest.raises(SystemExit):
        job(tmp_path, steps=20)
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["status"] == "interrupted" and info["arms"]["bn"]["last_step"] == 4
    assert {a["status"] for a in info["arms"].values()} == {"interrupted"}  # not left 'running'


def test_a_requeued_submitit_job_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """submitit resubmits a pre-empted job with its first overrides (no resume=true): the job sees
    its own interrupted run and continues it, ending as the uninterrupted run does."""
    import icsk.experiment as experiment

    real_step = experiment.Trainer.train_step

    def train_step(self, *a, **k):
        if self.step == 13:
            raise SystemExit(-1)  # submitit's exit on pre-emption
        return real_step(self, *a, **k)

    monkeypatch.setattr(experiment.Trainer, "train_step", train_step)
    with pytest.raises(SystemExit):
        job(tmp_path / "cut", "train.checkpoint_every=10", steps=20)
    monkeypatch.setattr(experiment.Trainer, "train_step", real_step)
    with pytest.raises(ConfigError, match="already holds a run"):  # outside submitit: refused as before
        job(tmp_path / "cut", "train.checkpoint_every=10", steps=20)
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "123")
    info = job(tmp_path / "cut", "train.checkpoint_every=10", steps=20)
    assert info["status"] == "finished"
    monkeypatch.delenv("SUBMITIT_LOCAL_JOB_ID")
    job(tmp_path / "whole", "train.checkpoint_every=10", steps=20)
    for a, b in zip(frames(tmp_path / "cut"), frames(tmp_path / "whole"), strict=True):
        pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_a_job_on_a_live_run_is_refused_before_it_touches_the_folder(tmp_path, monkeypatch):
    """Another job (a resume, or a submitit job that looks requeued) must not delete rows of, or
    rewrite run.json of, a run that is still training."""
    from icsk.store import FolderLease

    job(tmp_path, "train.checkpoint_every=5", steps=10)
    info = (tmp_path / "run.json").read_text()
    (tmp_path / "run.json").write_text(info.replace('"finished"', '"running"'))
    live = FolderLease(tmp_path)  # the live job holds its folder
    live.acquire()
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    try:
        with pytest.raises(ConfigError, match="another writer"):
            job(tmp_path, "resume=true", "train.checkpoint_every=5", steps=10)
        monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "7")
        with pytest.raises(ConfigError, match="another writer"):
            job(tmp_path, "train.checkpoint_every=5", steps=10)
        assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before
    finally:
        live.release()
    (tmp_path / "run.json").write_text(info)  # a signal after the last step: requeued, finished already
    assert job(tmp_path, "train.checkpoint_every=5", steps=10)["status"] == "finished"
    assert not any(tmp_path.rglob(".writer"))


def test_a_recorder_that_cannot_attach_leaves_no_claim_behind(tmp_path, monkeypatch):
    real_attach = icsk.Recorder.attach

    def attach(self):
        if self.path.name == "none":  # the second arm's folder is held by another writer
            raise icsk.RecorderError("another writer")
        return real_attach(self)

    monkeypatch.setattr(icsk.Recorder, "attach", attach)
    with pytest.raises(icsk.RecorderError, match="another writer"):
        job(tmp_path, steps=3)
    assert (tmp_path / "arms" / "bn").exists() and not any(tmp_path.rglob(".writer"))


def test_resuming_a_finished_run_leaves_it_alone(tmp_path):
    """resume=true over a whole sweep must not retrain (or wipe) the jobs that finished."""
    job(tmp_path, steps=10)  # checkpoint_every=0: a resume would otherwise train again from step 0
    before = frames(tmp_path)
    chunks = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("chunk-*.parquet")}
    info = job(tmp_path, "resume=true", steps=10)
    assert info["status"] == "finished"
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("chunk-*.parquet")} == chunks  # not rewritten
    for a, b in zip(before, frames(tmp_path), strict=True):
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    # more steps for a finished run: not "resume it with <the command that does nothing>"
    with pytest.raises(ConfigError, match=r"finished already, and these settings differ from its own \(train.steps: "
                                          r"10 in the run, 20 now\); a finished run is not extended"):
        job(tmp_path, "resume=true", steps=20)


@pytest.mark.parametrize("bad", ["logger=wandb logger.mode=ofline", "optim.lr=0", "optim.schedule=cosin",
                                 "recorder.stats=[varr]", "train.eval_every=-1", "train.checkpoint_every=-5",
                                 "train.log_every=0"])
def test_a_refused_config_writes_nothing_and_a_refused_resume_deletes_nothing(tmp_path, bad):
    with pytest.raises(ValueError, match=bad.split()[-1].split("=")[0].split(".")[-1].rstrip("s")):
        job(tmp_path / "new", *bad.split(), steps=2)
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) in ([], ["wandb"])
    job(tmp_path / "done", steps=4)  # no checkpoint: a resume would train again from step 0
    (tmp_path / "done" / "run.json").write_text(
        (tmp_path / "done" / "run.json").read_text().replace('"finished"', '"interrupted"'))
    chunks = sorted(p.name for p in (tmp_path / "done").rglob("chunk-*.parquet"))
    with pytest.raises(ValueError):
        job(tmp_path / "done", "resume=true", *bad.split(), steps=4)
    assert sorted(p.name for p in (tmp_path / "done").rglob("chunk-*.parquet")) == chunks


def test_resume_clears_the_earlier_attempts_error(tmp_path):
    job(tmp_path, steps=10)
    info = json.loads((tmp_path / "run.json").read_text())
    info.update(status="failed", error="RuntimeError: CUDA out of memory")
    (tmp_path / "run.json").write_text(json.dumps(info))
    job(tmp_path, "resume=true", steps=10)
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["status"] == "finished" and "error" not in info


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    common = ["train.steps=60", "train.checkpoint_every=20", "train.eval_every=10", "model.arms=[bn,noisy_bn]",
              "recorder.probe_schedule=7", "data.probe_size=50", "recorder.stats=[mean,var,quantiles,hist]"]
    full = cli(tmp_path / "full", *common)
    assert full.returncode == 0, full.stdout + full.stderr
    assert json.loads((tmp_path / "full" / "run.json").read_text())["overrides"] == [*BASE, *common]
    killed = cli(tmp_path / "cut", *common, env_extra={"ICSK_FAULT_KILL_AT_STEP": "50"})
    assert killed.returncode == -signal.SIGKILL
    partial = icsk.load_run(tmp_path / "cut")  # a killed run folder still reads
    assert 40 <= partial.step.max() + 1 <= 50 and partial.step.min() == 0
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["status"] == "running"
    resumed = cli(tmp_path / "cut", *common, "resume=true")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    for fa, fb in zip(frames(tmp_path / "full"), frames(tmp_path / "cut"), strict=True):
        pd.testing.assert_frame_equal(fa, fb, check_exact=True)
    probe = [icsk.load_run(tmp_path / d, mode="probe").sort_values(["arm", "step", "layer", "stat", "unit"])
             .reset_index(drop=True) for d in ("full", "cut")]
    pd.testing.assert_frame_equal(*probe, check_exact=True)
    hists = [icsk.load_run(tmp_path / d, table="hist", mode="probe") for d in ("full", "cut")]
    pd.testing.assert_frame_equal(*hists, check_exact=True)  # the resumed run reuses the probe's ranges
    assert sorted(probe[0].step.unique()) == list(range(0, 60, 7))
    steps = icsk.load_run(tmp_path / "cut", stats=["mean"], layers=["block1.pre_act"])
    counts = steps.groupby(["arm", "step"], observed=True).size()
    assert (counts == 100).all() and len(counts) == 120  # no duplicate, no gap


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_flushes_and_marks_interrupted(tmp_path, sig):
    proc = cli(tmp_path, "train.steps=1000000", "train.eval_every=0", "recorder.flush_every=16", wait=False)
    try:
        deadline = time.time() + 300
        while not list((tmp_path / "arms" / "bn" / "stats").glob("chunk-*.parquet")):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "no chunk appeared"
            time.sleep(0.5)
        proc.send_signal(sig)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    out = proc.stdout.read()
    assert proc.returncode == 130 and "Traceback" not in out, out  # one line, with the way on
    assert f"icsk-train: interrupted: {tmp_path}; continue it with: " in out and "resume=true" in out
    again = shlex.split(out.split("continue it with: ")[1].splitlines()[0])
    assert Path(again[0]).resolve() == Path(sys.executable).resolve() or Path(ROOT, again[0]).resolve() == Path(
        sys.executable).resolve()  # the interpreter and script it was started with, to type again in ROOT
    assert again[1] == str(ROOT / "scripts" / "train.py") and again[-1] == f"hydra.run.dir='{tmp_path}'"
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["status"] == "interrupted"
    df = icsk.load_run(tmp_path, stats=["mean"], layers=["block1.pre_act"])
    last = info["arms"]["bn"]["last_step"]
    # everything up to the interrupt was flushed (staged steps included), without gaps; the
    # forward of a step cut short by the signal may be recorded too
    got = sorted(df[df.arm == "bn"].step.unique())
    assert got == list(range(len(got))) and len(got) - 1 in (last, last + 1) and last > 0


def test_run_json_records_the_thread_count_and_a_resume_with_another_warns(tmp_path, caplog):
    """CPU results depend on torch's intra-op thread count (float sums round differently): the
    run records it, and a resume that would mix two counts says so (on the CPU: device=auto
    would pick a GPU where there is one)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        job(tmp_path, "device=cpu", "train.checkpoint_every=5", steps=10)
        info = json.loads((tmp_path / "run.json").read_text())
        assert info["torch_threads"] == 1
        (tmp_path / "run.json").write_text(json.dumps({**info, "status": "interrupted"}))
        torch.set_num_threads(2)
        with caplog.at_level("WARNING", logger="icsk"):
            job(tmp_path, "device=cpu", "train.checkpoint_every=5", "resume=true", steps=10)
    finally:
        torch.set_num_threads(before)
    assert "started with 1 intra-op threads and continues with 2" in caplog.text
    info = json.loads((tmp_path / "run.json").read_text())
    assert (info["torch_threads"], info["torch_threads_on_resume"]) == (1, 2)


def test_a_refused_launch_leaves_no_stub_folder_behind(tmp_path):
    """Hydra makes the run folder (.hydra/, icsk.log) before icsk sees the config: a refused launch
    left it among the real runs, where `icsk-report runs/demo/*` then stopped on it."""
    bad = cli(tmp_path / "stub", "model.activation=sigmod")
    assert bad.returncode == 1 and "icsk-train: model=mlp: unknown activation 'sigmod'" in bad.stderr, bad.stderr
    assert not (tmp_path / "stub").exists()
    gone = cli(tmp_path / "typo", "resume=true")  # no run to continue there
    assert gone.returncode == 1 and "holds no run to continue" in gone.stderr and not (tmp_path / "typo").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")  # a folder of the user's stays as it was
    assert cli(tmp_path / "mine", "model.activation=sigmod").returncode == 1
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_the_command_that_continues_a_run_starts_the_program_as_the_user_did(tmp_path, monkeypatch):
    """``.venv/bin/icsk-train`` run without activating the venv must be told to run that again,
    not ``icsk-train`` (not on PATH, or another install's)."""
    from icsk.experiment import resume_command

    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "icsk-train").write_text("#!/bin/sh\n")
    (bin_dir / "icsk-train").chmod(0o755)
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "train.py").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr(sys, "argv", [".venv/bin/icsk-train", "seed=1"])
    assert resume_command(["seed=1"], "runs/a") == (".venv/bin/icsk-train seed=1 resume=true "
                                                        "\"hydra.run.dir='runs/a'\"")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")  # the venv active: its icsk-train is the one on PATH
    assert resume_command(["seed=1"], "runs/a").startswith("icsk-train seed=1 resume=true ")
    monkeypatch.setattr(sys, "argv", ["scripts/train.py", "seed=1"])
    words = shlex.split(resume_command(["seed=1"], "runs/a"))
    assert (tmp_path / words[0]).resolve() == Path(sys.executable).resolve() and words[1] == "scripts/train.py"
    monkeypatch.setattr(sys, "argv", ["-c"])  # neither (a launcher's worker process): the console script
    assert resume_command([], "runs/a").startswith("icsk-train resume=true ")


def test_signal_during_a_chunk_write_loses_no_chunk(tmp_path):
    """SIGTERM raises KeyboardInterrupt wherever the main thread waits, here for the previous
    chunk inside write(): the chunk being handed over must still reach the disk."""
    writer = ChunkWriter(tmp_path, background=True)
    gate = threading.Event()

    def slow_table():
        gate.wait(10)
        return pa.table({"step": [0]})

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGUSR1, interrupt)
    try:
        writer.write(slow_table)
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        with pytest.raises(KeyboardInterrupt):
            writer.write(pa.table({"step": [1]}))  # waits for the first chunk, is interrupted
        with pytest.raises(KeyboardInterrupt):
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1)).start()
            writer.wait()  # an interrupted wait keeps what is in flight
    finally:
        signal.signal(signal.SIGUSR1, old)
        gate.set()
    writer.wait()
    assert read_chunks(tmp_path).column("step").to_pylist() == [0, 1]



def test_chunks_reach_the_disk_at_close_and_checkpoints_not_at_every_write(tmp_path, monkeypatch):
    """A chunk appears whole under its name (hidden file, then rename) without waiting for the
    disk: training does not wait for fsync at every chunk. close() puts every chunk, the
    sidecar and the folder holding their names on the disk. A checkpoint counts chunks, so the
    job syncs every chunk before writing one (a power cut must not leave a checkpoint counting
    lost chunks), and the checkpoint itself before it replaces the last one."""
    import pyarrow.parquet as pq

    synced: list[str] = []
    real_fsync = os.fsync
    unsynced_at_checkpoint: list[list[str]] = []

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.endswith(".checkpoint.pt.tmp"):
            on_disk = [str(p.resolve()) for p in (tmp_path / "job").rglob("chunk-*.parquet")]
            unsynced_at_checkpoint.append([p for p in on_disk if p not in synced])
        synced.append(path)
        real_fsync(fd)

    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc to name the files fsync is called on")
    monkeypatch.setattr(os, "fsync", fsync)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Sigmoid())
    rec = icsk.Recorder(model, layers=["1"], path=tmp_path / "rec", flush_every=2)
    stats = (tmp_path / "rec" / "stats").resolve()
    with rec:
        for _ in range(5):
            model(torch.randn(8, 4))
            rec.step()
        rec.flush(wait=True)
        chunks = sorted(stats.glob("chunk-*.parquet"))
        assert len(chunks) == 3 and synced == []
        assert len(icsk.load_run(tmp_path / "rec")) > 0  # readable before any fsync
        meta = pq.ParquetFile(chunks[0]).metadata.row_group(0)
        names = [meta.column(i).path_in_schema for i in range(meta.num_columns)]
        assert meta.column(names.index("step")).statistics.has_min_max  # row groups filter by step
        assert meta.column(names.index("values")).statistics is None  # (would cost a fifth of the write)
    assert sorted(synced) == sorted([str(p) for p in chunks] + [str(stats / "recorder.json"), str(stats)])
    synced.clear()
    rec.close()  # idempotent: nothing new to sync
    assert synced == []
    assert job(tmp_path / "job", "train.checkpoint_every=10", steps=30)["status"] == "finished"
    assert len(unsynced_at_checkpoint) == 2 and unsynced_at_checkpoint == [[], []]
    assert any(s.endswith(os.path.join("job", "metrics")) for s in synced)
    assert any("metrics" in s and s.endswith(".parquet") for s in synced)
    # a resumed writer syncs the chunks an earlier attempt left too (killed, it may never have)
    synced.clear()
    from icsk.store import ChunkWriter

    writer = ChunkWriter(stats)
    writer.write(pa.table({"step": [99]}))
    writer.sync()
    assert {str(p) for p in chunks} <= set(synced)

def test_bad_inputs_get_clear_messages(tmp_path):
    with pytest.raises(ConfigError, match=r"batch_size=1.*batch_size>=2"):
        job(tmp_path / "bs1", "data.batch_size=1", steps=2)
    with pytest.raises(ConfigError, match=r"\['LpInf', 'lp1'\].*batch_size=1"):  # lp by its aliases, any case
        job(tmp_path / "bs1lp", "data.batch_size=1", "model.arms=[lp1,LpInf,ln]", steps=2)
    with pytest.raises(ConfigError, match=r"probe batch.*data.probe_size>=2, got 1"):
        job(tmp_path / "probe1", "recorder.probe_schedule=5", "data.probe_size=1", steps=2)
    with pytest.raises(ConfigError, match=r"data.probe_size must be >= 1"):
        job(tmp_path / "probe0", "recorder.probe_schedule=5", "data.probe_size=0", steps=2)
    # a refused config leaves nothing behind: the same folder takes the fixed config, no resume needed
    assert not (tmp_path / "probe0" / "arms").exists() and not (tmp_path / "probe0" / "config.yaml").exists()
    assert job(tmp_path / "probe0", "recorder.probe_schedule=5", "data.probe_size=2", steps=2)["status"] == "finished"
    with pytest.raises(ConfigError, match=str(tmp_path / "nodata")):  # (icsk-train prints config errors in one line)
        job(tmp_path / "mnist", "data=mnist", f"data.root={tmp_path / 'nodata'}", steps=2)
    with pytest.raises(ConfigError, match=r"recorder: .*block9.pre_act.*nearest valid names.*block\d.pre_act"):
        job(tmp_path / "layer", "recorder.layers=[block9.pre_act]", steps=2)


def test_corrupt_or_partial_run_folders(tmp_path):
    job(tmp_path, steps=20)
    before = icsk.load_run(tmp_path)
    (tmp_path / "run.json").unlink()  # partial folder: statistics still read
    pd.testing.assert_frame_equal(icsk.load_run(tmp_path), before)
    chunk = sorted((tmp_path / "arms" / "none" / "stats").glob("chunk-*.parquet"))[0]
    good = chunk.read_bytes()
    chunk.write_bytes(good[: len(good) // 2])
    with pytest.raises(icsk.RunFolderError, match=rf"{chunk.name}.*unreadable"):
        icsk.load_run(tmp_path)
    chunk.write_bytes(b"")  # what a power cut can leave of a chunk the disk had not got yet
    with pytest.raises(icsk.RunFolderError, match=rf"{chunk.name}.*unreadable.*delete it to load the rest"):
        icsk.load_run(tmp_path)
    chunk.write_bytes(good)  # the other files were never touched
    pd.testing.assert_frame_equal(icsk.load_run(tmp_path), before)


def test_a_recorder_failing_to_close_loses_neither_the_other_arms_nor_the_losses(tmp_path, monkeypatch):
    """At the end of a job every table is closed even when one fails (here a full disk while one
    arm's statistics are written): the other arm's statistics and the losses reach the run folder,
    and the failure is still raised."""
    from icsk.hooks import Recorder
    from icsk.store import read_metrics

    real_close = Recorder.close
    failed = []

    def close(self):
        if not failed and "bn" in str(self.path):
            failed.append(self.path)
            raise OSError(28, "No space left on device")
        return real_close(self)

    monkeypatch.setattr(Recorder, "close", close)
    with pytest.raises(OSError, match="No space left"):
        job(tmp_path, "model.arms=[none,bn]", steps=20)
    assert failed
    losses = read_metrics(tmp_path)
    assert set(losses[losses.metric == "loss"].arm) == {"none", "bn"} and losses.step.max() >= 15
    other = icsk.load_run(tmp_path / "arms" / "none")
    assert other.step.max() == 19
