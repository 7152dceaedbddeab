"""The wandb mirror: offline runs on disk that icsk.wandb_offline reads back, nothing written when
disabled, always finished (also when training raises), never a network."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from icsk.config import compose
from icsk.log import NullLogger, WandbLogger, make_logger, normalize_mode, run_identity
from icsk.wandb_offline import (BLOCK_LEN, WandbFileError, find_run_files, iter_records, offline_runs,
                                read_offline_run)


pytestmark = pytest.mark.usefixtures("wandb_env")  # conftest: wandb's caches in the test folder


def tiny_cfg(*extra: str):
    return compose(["experiment=demo", "train.steps=12", "train.log_every=4", "train.eval_every=6",
                    "train.checkpoint_every=0", "train.progress=false", "recorder=none", *extra])


def test_offline_logger_writes_a_run_the_reader_reads_back(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blob = "x" * 100_000  # a config larger than a 32 KiB block: the record is split in fragments
    lg = WandbLogger(tmp_path, {"model": {"depth": 3}, "blob": blob}, mode="offline", group="g", job_type="arms",
                     tags=["t1"], name="my-run")
    lg.log(0, "bn", {"test_acc": 0.1})
    lg.log(0, "none", {"test_acc": 0.2})   # same step: the same wandb row
    lg.log(4, "bn", {"loss": 2.0, "acc": 0.3})
    lg.log(4, "none", {"loss": 2.5, "acc": 0.25})
    lg.log_histogram(4, "bn", "hist/block1", counts=[1, 2, 3], edges=[0.0, 1.0, 2.0, 3.0])
    lg.log_histogram(9, "none", "hist/raw", values=np.linspace(-1, 1, 50))
    lg.log(9, "bn", {"loss": 1.0})
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    png = tmp_path / "fig.png"
    fig.savefig(png)
    plt.close(fig)
    lg.log_images({"report/curve": png})
    lg.summary({"bn/final_test_acc": 0.9, "bn/status": "finished"})
    run_id = lg.run_id
    lg.finish()
    lg.finish()  # idempotent

    runs = offline_runs(tmp_path)
    assert len(runs) == 1 and runs[0].parent == tmp_path / "wandb" and runs[0].name.endswith(run_id)
    run = read_offline_run(tmp_path, wait=30)  # from the run folder; the .wandb file or its folder work too
    assert read_offline_run(runs[0])["run_id"] == read_offline_run(find_run_files(runs[0])[0])["run_id"] == run_id
    assert run["run_id"] == run_id and run["exit_code"] == 0
    assert (run["project"], run["group"], run["job_type"], run["tags"], run["name"]) == ("icsk", "g", "arms", ["t1"],
                                                                                          "my-run")
    assert run["config"]["model"] == {"depth": 3} and run["config"]["blob"] == blob
    h = run["history"]
    # one row per step (every arm in it), then the image row (wandb fills in the last step)
    assert h["step"].tolist() == [0, 4, 9, 9]
    rows = h.set_index("_step")
    assert rows.loc[0, "bn/test_acc"] == 0.1 and rows.loc[0, "none/test_acc"] == 0.2
    assert rows.loc[1, "bn/loss"] == 2.0 and rows.loc[1, "none/acc"] == 0.25
    hist = rows.loc[1, "bn/hist/block1"]
    assert hist["_type"] == "histogram" and hist["values"] == [1, 2, 3] and hist["bins"] == [0.0, 1.0, 2.0, 3.0]
    raw = rows.loc[2, "none/hist/raw"]
    assert raw["_type"] == "histogram" and sum(raw["values"]) == 50
    assert rows.loc[2, "bn/loss"] == 1.0
    img = h["report/curve"].dropna().iloc[0]
    assert img["_type"] == "image-file" and img["path"].endswith(".png")
    assert list(runs[0].rglob("*.png"))  # the image file itself sits in the run's media folder
    assert run["summary"]["bn/final_test_acc"] == 0.9 and run["summary"]["bn/status"] == "finished"
    with pytest.raises(ValueError):
        WandbLogger.log_histogram(lg, 0, "bn", "h", counts=[1, 2], edges=[0, 1])


def test_consecutive_runs_in_one_process_never_merge(tmp_path):
    ids = []
    for i in range(4):
        lg = WandbLogger(tmp_path / f"job{i}", {"job": i}, mode="offline")
        lg.log(0, "bn", {"loss": float(i)})
        if i % 2 == 0:
            lg.finish()
        else:  # a job that forgot to finish: reinit="finish_previous" closes it at the next init
            lg.flush()
        ids.append(lg.run_id)
    lg.finish()
    assert len(set(ids)) == 4
    for i, rid in enumerate(ids):
        runs = offline_runs(tmp_path / f"job{i}")
        assert len(runs) == 1 and runs[0].name.endswith(rid)
        run = read_offline_run(runs[0], wait=30)
        assert run["config"]["job"] == i
        assert run["history"]["bn/loss"].tolist() == [float(i)]
        assert run["exit_code"] is not None  # every one was finished


@pytest.mark.parametrize("logger", [["logger.mode=disabled"], ["logger=none"]])
def test_disabled_logging_writes_nothing(tmp_path, logger):
    from icsk.experiment import run

    cfg = tiny_cfg(*logger)
    assert isinstance(make_logger(cfg.logger, tmp_path, {}), NullLogger)
    info = run(cfg, tmp_path / "run")
    assert info["status"] == "finished" and info["wandb_run"] is None
    assert not list(tmp_path.rglob("wandb")) and not list(tmp_path.rglob("*.wandb"))


def test_finish_is_called_when_training_raises(tmp_path, monkeypatch):
    import wandb

    from icsk import experiment
    from icsk.experiment import run

    calls = []
    real_finish, real_step = WandbLogger.finish, experiment.Trainer.train_step

    def finish(self, exit_code=0):
        calls.append(exit_code)
        return real_finish(self, exit_code)

    def train_step(self, *a, **kw):
        if self.step == 6:
            raise RuntimeError("boom at step 6")
        return real_step(self, *a, **kw)

    monkeypatch.setattr(WandbLogger, "finish", finish)
    monkeypatch.setattr(experiment.Trainer, "train_step", train_step)
    with pytest.raises(RuntimeError, match="boom at step 6"):
        run(tiny_cfg("logger.mode=offline"), tmp_path)
    assert calls == [1]
    assert wandb.run is None
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["status"] == "failed" and "boom" in info["error"]
    wb = read_offline_run(tmp_path, wait=30)
    assert wb["run_id"] == info["wandb_run"]
    assert wb["exit_code"] == 1  # the run was finished, as failed
    loss_steps = wb["history"].dropna(subset=["bn/loss"])["step"].tolist()
    assert loss_steps[0] == 3 and max(loss_steps) < 6  # what was logged before the failure


def test_run_identity_groups_the_jobs_of_a_sweep():
    cfg = {"group": "lr_sweep", "job_type": "train", "tags": ["a"], "run_name": None}
    assert run_identity(cfg, None) == {"group": "lr_sweep", "job_type": "train", "tags": ["a"], "name": None}
    job = {"mode": "multirun", "num": 3, "sweep_id": "2026-01-01_10-00-00-000001",
           "override_dirname": "optim.lr=0.1,seed=1"}
    got = run_identity(cfg, job)
    assert got["group"] == "lr_sweep-2026-01-01_10-00-00-000001"
    assert got["tags"] == ["a", "sweep:2026-01-01_10-00-00-000001"]
    assert got["name"] == "3:optim.lr=0.1,seed=1"
    assert run_identity({**cfg, "sweep_group": False, "run_name": "x"}, job)["group"] == "lr_sweep"
    assert run_identity({**cfg, "run_name": "x"}, job)["name"] == "x"
    assert run_identity(cfg, {"mode": "run"})["group"] == "lr_sweep"


def test_modes():
    assert [normalize_mode(m) for m in ("offline", "ONLINE", "disabled", "dryrun", "run", None)] == [
        "offline", "online", "disabled", "offline", "online", "offline"]
    with pytest.raises(ValueError, match="logger.mode"):
        normalize_mode("cloud")


# --- the .wandb file format, on synthetic files -------------------------------------------------

def _chunk(kind: int, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF
    return struct.pack("<IHB", crc, len(payload), kind) + payload


def write_log(path: Path, records: list[bytes]) -> None:
    """A LevelDB-log writer straight from the format description (what wandb does)."""
    out = bytearray(b":W&B" + struct.pack("<HB", 0xBEE1, 0))
    for rec in records:
        first = True
        while True:
            left = BLOCK_LEN - len(out) % BLOCK_LEN
            if left < 7:
                out += b"\x00" * left
                continue
            take = min(len(rec), left - 7)
            part, rec = rec[:take], rec[take:]
            kind = (1 if not rec else 2) if first else (4 if not rec else 3)
            out += _chunk(kind, part)
            first = False
            if not rec:
                break
    path.write_bytes(bytes(out))


def test_reader_handles_block_padding_and_fragments(tmp_path):
    # sizes chosen so that a block ends with < 7 bytes of padding and records span 1-3 blocks
    records = [bytes([i % 251]) * n for i, n in enumerate([10, BLOCK_LEN - 7 - 7 - 10 - 3 - 7, 5, 70_000, 1, 40_000])]
    f = tmp_path / "run-x.wandb"
    write_log(f, records)
    assert list(iter_records(f, strict=True)) == records
    # a truncated tail (a job killed mid-write) yields the complete records only
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    assert list(iter_records(f)) == records[:-1]
    with pytest.raises(WandbFileError):
        list(iter_records(f, strict=True))
    # a flipped payload byte fails the checksum
    bad = bytearray(data)
    bad[7 + 7 + 3] ^= 0xFF
    f.write_bytes(bytes(bad))
    with pytest.raises(WandbFileError, match="checksum"):
        list(iter_records(f, strict=True))
    f.write_bytes(b"PK\x03\x04 not wandb")
    with pytest.raises(WandbFileError, match="not a wandb run file"):
        list(iter_records(f))


def test_resume_continues_the_wandb_run_and_readers_keep_the_resumed_values(tmp_path, monkeypatch):
    """An interrupted run resumed from its checkpoint logs into the same wandb run id (not a second
    run that reports would count as another seed); the reader reads both attempts as one run, and
    the steps logged twice (after the checkpoint) keep the resumed attempt's values, as in the
    run folder."""
    from icsk import experiment
    from icsk.experiment import run
    from icsk.report.wandb_source import history_to_metrics
    from icsk.store import read_metrics

    cfg = ["train.checkpoint_every=6", "train.log_every=1", "logger.mode=offline", "model.arms=[bn,noisy_bn]"]
    real_step = experiment.Trainer.train_step

    def train_step(self, *a, **kw):
        if self.step == 9:
            raise KeyboardInterrupt("signal 15")
        return real_step(self, *a, **kw)

    monkeypatch.setattr(experiment.Trainer, "train_step", train_step)
    sweep_job = {"mode": "multirun", "sweep_id": "sw1", "num": 3, "override_dirname": "seed=3"}
    monkeypatch.setattr(experiment, "hydra_job_info", lambda: sweep_job)  # the first attempt is a sweep job
    with pytest.raises(KeyboardInterrupt):
        run(tiny_cfg(*cfg), tmp_path)
    monkeypatch.setattr(experiment, "hydra_job_info", lambda: None)  # resumed alone, outside the sweep
    first_id = json.loads((tmp_path / "run.json").read_text())["wandb_run"]
    with pytest.raises(KeyboardInterrupt):  # an attempt without wandb keeps the id for the next one
        run(tiny_cfg(*(c for c in cfg if not c.startswith("logger.")), "resume=true", "logger=none"), tmp_path)
    assert json.loads((tmp_path / "run.json").read_text())["wandb_run"] == first_id
    monkeypatch.setattr(experiment.Trainer, "train_step", real_step)
    info = run(tiny_cfg(*cfg, "resume=true"), tmp_path)
    assert info["wandb_run"] == first_id
    wb = read_offline_run(tmp_path, wait=30)
    assert len(wb["attempts"]) == 2 and wb["run_id"] == info["wandb_run"] and wb["exit_code"] == 0
    # the resumed job stays in its sweep's group, with its tag and name
    assert (wb["group"], wb["name"]) == ("demo-sw1", "3:seed=3") and "sweep:sw1" in wb["tags"]
    got = history_to_metrics(wb["history_rows"])
    got = got[got.metric == "loss"].sort_values(["arm", "step"]).reset_index(drop=True)
    want = read_metrics(tmp_path)
    want = want[(want.metric == "loss")].sort_values(["arm", "step"]).reset_index(drop=True)
    assert got.step.tolist() == want.step.tolist() == [*range(12)] * 2
    np.testing.assert_allclose(got.value, want.value, rtol=1e-6)
    logged = [r["step"] for r in wb["history_rows"] if "noisy_bn/loss" in r]
    assert sorted(logged) == sorted([*range(9), *range(6, 12)])  # steps 6-8 by both attempts


def test_attempts_are_ordered_by_time_whether_offline_or_online(tmp_path):
    """An online attempt's folder is run-<time>-<id>, an offline one's offline-run-<time>-<id>."""
    names = ["offline-run-20260102_000000-abc", "run-20260101_000000-abc", "run-20260103_000000-abc"]
    for n in names:
        (tmp_path / "wandb" / n).mkdir(parents=True)
        write_log(tmp_path / "wandb" / n / "run-abc.wandb", [])
    assert [f.parent.name for f in find_run_files(tmp_path)] == [names[1], names[0], names[2]]
    # one id in two projects is two runs, not two attempts of one
    from wandb.proto import wandb_internal_pb2 as pb

    for n, project in zip(names[:2], ("p1", "p2"), strict=True):
        rec = pb.Record()
        rec.run.run_id, rec.run.project = "abc", project
        write_log(tmp_path / "wandb" / n / "run-abc.wandb", [rec.SerializeToString()])
    (tmp_path / "wandb" / names[2] / "run-abc.wandb").unlink()
    with pytest.raises(WandbFileError, match="different projects"):
        read_offline_run(tmp_path)



def test_an_attempt_that_is_just_starting_keeps_the_run_unfinished(tmp_path):
    """A resumed run's new attempt whose file holds only its header so far (wandb's service is
    starting) is still the run's last attempt: the run reads as unfinished, with the first
    attempt's identity and rows, not as finished with the first attempt's exit code."""
    lg = WandbLogger(tmp_path, {"a": 1}, mode="offline", group="g")
    lg.log(0, "bn", {"loss": 1.0})
    lg.finish(exit_code=0)
    first = read_offline_run(tmp_path, wait=30)
    assert first["exit_code"] == 0
    rid = first["run_id"]
    d = tmp_path / "wandb" / f"offline-run-29990101_000000-{rid}"  # later than the first attempt
    d.mkdir()
    write_log(d / f"run-{rid}.wandb", [])
    run = read_offline_run(tmp_path)
    assert run["exit_code"] is None and len(run["attempts"]) == 2 and run["path"] == str(d / f"run-{rid}.wandb")
    assert (run["run_id"], run["project"], run["group"]) == (rid, "icsk", "g")
    assert [r["bn/loss"] for r in run["history_rows"] if "bn/loss" in r] == [1.0]

def test_reader_refuses_ambiguous_folders(tmp_path):
    for rid in ("aaa", "bbb"):
        d = tmp_path / "wandb" / f"offline-run-20260101_000000-{rid}"
        d.mkdir(parents=True)
        write_log(d / f"run-{rid}.wandb", [])
    assert len(find_run_files(tmp_path)) == 2
    with pytest.raises(WandbFileError, match="2 wandb runs"):
        read_offline_run(tmp_path)
    empty = read_offline_run(tmp_path / "wandb" / "offline-run-20260101_000000-aaa")
    assert empty["history"].empty and empty["exit_code"] is None
    with pytest.raises(FileNotFoundError):
        read_offline_run(tmp_path / "missing")


def _netns_available() -> bool:
    if shutil.which("unshare") is None or sys.platform != "linux":
        return False
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _netns_available(), reason="needs `unshare -n` (a network namespace) to cut the network")
def test_offline_mode_needs_no_network(tmp_path):
    """In a network namespace with no interface up, an offline run starts, logs and finishes
    promptly (nothing waits on a connection timeout), and is readable afterwards."""
    script = (
        "import sys; from icsk.log import WandbLogger\n"
        "lg = WandbLogger(sys.argv[1], {'a': 1}, mode='offline', init_timeout=30)\n"
        "[lg.log(s, 'bn', {'loss': 1.0 / (s + 1)}) for s in range(5)]\n"
        "lg.finish(); print(lg.run_id)\n"
    )
    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_BASE_URL": "https://api.wandb.ai", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["unshare", "-n", sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                         text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    run = read_offline_run(tmp_path, wait=30)
    assert run["run_id"] == res.stdout.strip().splitlines()[-1]
    assert run["history"]["bn/loss"].tolist() == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])
    assert run["exit_code"] == 0


def test_history_to_metrics_keeps_the_later_of_two_values_for_a_step():
    from icsk.report.wandb_source import history_to_metrics

    rows = [{"step": 5, "bn/loss": 1.0, "bn/acc": 0.5}, {"step": 6, "bn/loss": 2.0},
            {"step": 5, "bn/loss": 3.0}, {"step": 6, "none/loss": 4.0}]
    m = history_to_metrics(rows).sort_values(["arm", "metric", "step"]).reset_index(drop=True)
    assert m[["step", "arm", "metric", "value"]].values.tolist() == [
        [5, "bn", "acc", 0.5], [5, "bn", "loss", 3.0], [6, "bn", "loss", 2.0], [6, "none", "loss", 4.0]]



@pytest.mark.slow
def test_a_run_killed_before_wandb_wrote_anything_still_reads(tmp_path):
    """SIGKILL takes wandb's service down with the job, before it wrote more than a file header
    (what a killed attempt holds is up to wandb). Resumed, the run's wandb mirror still reads as
    one run: the empty attempt is skipped, and the resumed attempt's rows match the run folder
    from the checkpoint on."""
    import signal

    from icsk.report.wandb_source import history_to_metrics
    from icsk.store import read_metrics

    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, str(root / "scripts" / "train.py"), "experiment=demo", "logger=wandb", "logger.mode=offline",
            "train.progress=false", "train.steps=20", "train.log_every=5", "train.eval_every=10",
            "train.checkpoint_every=10", "recorder=none", f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "ICSK_FAULT_KILL_AT_STEP": "10"}  # killed as the loop comes round after the checkpoint
    killed = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = subprocess.run([*args, "resume=true"], cwd=root, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert len(find_run_files(tmp_path)) == 2
    wb = read_offline_run(tmp_path, wait=30)
    assert wb["exit_code"] == 0 and wb["project"] == "icsk"
    got = history_to_metrics(wb["history_rows"])
    want = read_metrics(tmp_path)
    for metric in ("loss", "test_loss"):
        g = got[(got.metric == metric) & (got.step > 10)].sort_values(["arm", "step"])
        w = want[(want.metric == metric) & (want.step > 10)].sort_values(["arm", "step"])
        assert len(g) > 0 and g.step.tolist() == w.step.tolist() and g.arm.tolist() == w.arm.tolist(), metric
        np.testing.assert_allclose(g.value, w.value, rtol=1e-6)
