"""Sweeps end to end: Hydra multiruns through the joblib and submitit launchers, one folder and one
offline wandb run per job, the sweep index (sweep_summary.csv), failed jobs, the SLURM launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf

import icsk
from icsk.cli import CONF_DIR
from icsk.sweep import JOB_STATUS, SweepSummary, expected_jobs, main, summarize_sweep, write_summary
from icsk.wandb_offline import offline_runs, read_offline_run

TINY = ["experiment=demo", "train.steps=20", "train.log_every=5", "train.eval_every=10", "train.checkpoint_every=0",
        "train.progress=false", "recorder.schedule=5"]


def icsk_train() -> list[str]:
    exe = Path(sys.executable).parent / "icsk-train"
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from icsk.cli import train_main; train_main()"]


def launch(tmp_path: Path, *overrides: str, timeout: int = 540) -> subprocess.CompletedProcess:
    """``icsk-train -m ...`` in a subprocess: offline wandb (never a network), 1 BLAS thread per job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HYDRA_"))}
    env.update(WANDB_SILENT="true", HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               WANDB_CACHE_DIR=str(tmp_path / ".wandb_cache"), WANDB_CONFIG_DIR=str(tmp_path / ".wandb_config"),
               WANDB_DATA_DIR=str(tmp_path / ".wandb_data"))
    cmd = [*icsk_train(), "-m", *overrides]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    res.args = cmd
    return res


def show(res: subprocess.CompletedProcess) -> str:
    return f"$ {' '.join(map(str, res.args))}\n--- stdout\n{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-6000:]}"


@pytest.mark.slow
def test_joblib_multirun_jobs_get_own_folders_wandb_runs_and_a_summary(tmp_path):
    # the sweep folder keeps Hydra's ${now:...}: every job must still land in the same one
    res = launch(tmp_path, *TINY, "seed=0,1", "optim.lr=0.1,0.5", "logger.mode=offline",
                 "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                 f"hydra.sweep.dir={tmp_path}/sweeps/" + "${now:%H-%M-%S-%f}")
    assert res.returncode == 0, show(res)
    sweeps = [p for p in (tmp_path / "sweeps").iterdir() if p.is_dir()]
    assert len(sweeps) == 1, sweeps
    sweep = sweeps[0]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]

    wanted = {0: (0, 0.1), 1: (0, 0.5), 2: (1, 0.1), 3: (1, 0.5)}  # basic sweeper order: last key varies fastest
    run_ids, groups = set(), set()
    for job in jobs:
        info = json.loads((job / "run.json").read_text())
        assert info["status"] == "finished"
        seed, lr = wanted[int(job.name)]
        cfg = OmegaConf.load(job / "config.yaml")
        assert (cfg.seed, cfg.optim.lr) == (seed, lr)
        runs = offline_runs(job)
        assert len(runs) == 1, runs  # consecutive jobs of a worker never share or merge a wandb run
        assert runs[0].is_relative_to(job / "wandb")
        run = read_offline_run(runs[0])
        assert run["run_id"] == info["wandb_run"]
        assert run["exit_code"] == 0
        assert (run["config"]["seed"], run["config"]["optim"]["lr"]) == (seed, lr)
        assert run["config"]["hydra"]["num"] == int(job.name)
        assert f"sweep:{sweep.name}" in run["tags"]
        assert run["project"] == "icsk" and run["job_type"] == "train"
        run_ids.add(run["run_id"])
        groups.add(run["group"])
        # per-arm scalars at the log rate, the same numbers as the run folder's metrics table
        h = run["history"]
        assert {"bn/loss", "none/loss", "bn/test_acc", "none/test_acc", "step"} <= set(h.columns)
        logged = h.dropna(subset=["bn/loss"])
        assert logged["step"].tolist() == [4, 9, 14, 19]
        assert h.dropna(subset=["bn/test_acc"])["step"].tolist() == [0, 10, 20]
        assert h["step"].is_unique  # one wandb row per training step, every arm in it
        m = icsk.load_run(job, table="metrics")
        ref = m[(m.arm == "bn") & (m.metric == "loss") & (m.layer == "")].sort_values("step")
        assert ref.step.tolist() == [4, 9, 14, 19]
        assert logged["bn/loss"].to_numpy() == pytest.approx(ref.value.to_numpy(), rel=1e-6)
        assert run["summary"]["bn/final_test_acc"] == pytest.approx(info["final"]["bn"]["test_acc"])
        assert run["summary"]["none/status"] == "finished"
    assert len(run_ids) == 4
    assert groups == {f"demo-{sweep.name}"}

    df = pd.read_csv(sweep / "sweep_summary.csv")
    assert len(df) == 4
    assert df.job.tolist() == [0, 1, 2, 3]
    assert (df.status == "finished").all()
    assert df[["seed", "optim.lr"]].values.tolist() == [[0, 0.1], [0, 0.5], [1, 0.1], [1, 0.5]]
    assert df.wandb_run.tolist() == [json.loads((j / "run.json").read_text())["wandb_run"] for j in jobs]
    assert {"bn/test_acc", "none/test_acc", "bn/status", "none/status"} <= set(df.columns)
    assert df["bn/test_acc"].between(0, 1).all()
    assert len(pd.read_parquet(sweep / "sweep_summary.parquet")) == 4


def test_the_final_line_names_arms_that_diverged():
    from icsk.cli import run_line

    info = {"status": "finished", "final": {"bn": {"test_acc": 0.91}, "none": {"test_acc": 0.1}},
            "arms": {"bn": {"status": "finished", "diverged_step": None},
                     "none": {"status": "diverged", "diverged_step": 10}}}
    assert run_line(info, "runs/x") == "icsk-train: finished: runs/x (test_acc bn 0.910, none 0.100); diverged: none at step 10"
    info["arms"]["none"]["status"] = "finished"
    assert run_line(info, "runs/x") == "icsk-train: finished: runs/x (test_acc bn 0.910, none 0.100)"


@pytest.mark.slow
def test_a_failed_job_does_not_stop_the_sweep_and_is_summarized(tmp_path):
    # the basic launcher runs the jobs in order; the first one fails before it trains
    res = launch(tmp_path, *TINY, "optim.lr=-1,0.1", "logger=none", f"hydra.sweep.dir={tmp_path}/sweep")
    assert res.returncode != 0, show(res)  # Hydra re-raises the first failure after the last job
    assert "optim.lr must be > 0" in res.stderr
    sweep = tmp_path / "sweep"
    assert json.loads((sweep / "1" / "run.json").read_text())["status"] == "finished"
    assert json.loads((sweep / "0" / JOB_STATUS).read_text())["status"] == "failed"
    final = json.loads((sweep / "1" / "run.json").read_text())["final"]
    assert f"icsk-train: finished: {sweep / '1'} (test_acc bn {final['bn']['test_acc']:.3f}" in res.stdout, show(res)
    df = pd.read_csv(sweep / "sweep_summary.csv")  # written although on_multirun_end never ran
    assert df.status.tolist() == ["failed", "finished"]
    assert "optim.lr must be > 0" in df.error[0]
    assert df["optim.lr"].tolist() == [-1, 0.1]


@pytest.mark.slow
def test_submitit_local_runs_the_cluster_code_path(tmp_path):
    res = launch(tmp_path, *TINY, "seed=0,1", "logger.mode=offline", "hydra/launcher=submitit_local",
                 "hydra.launcher.cpus_per_task=1", "hydra.launcher.gpus_per_node=0", "hydra.launcher.timeout_min=10",
                 f"hydra.sweep.dir={tmp_path}/sweep")
    assert res.returncode == 0, show(res)
    sweep = tmp_path / "sweep"
    assert (sweep / ".submitit").is_dir()  # submitit's pickles and logs: the job really went through it
    assert list((sweep / ".submitit").rglob("*_result.pkl"))
    ids = set()
    for job in ("0", "1"):
        info = json.loads((sweep / job / "run.json").read_text())
        assert info["status"] == "finished"
        run = read_offline_run(sweep / job / "wandb")
        assert run["run_id"] == info["wandb_run"]
        assert run["history"]["bn/loss"].notna().sum() == 4
        ids.add(run["run_id"])
    assert len(ids) == 2
    df = pd.read_csv(sweep / "sweep_summary.csv")
    assert df.status.tolist() == ["finished", "finished"] and df.seed.tolist() == [0, 1]


class _Submitted(Exception):
    pass


def test_slurm_launcher_builds_the_sbatch_array(tmp_path, monkeypatch):
    """conf/hydra/launcher/slurm.yaml through the real SlurmLauncher up to `sbatch` (not run)."""
    from hydra.utils import instantiate
    from submitit.slurm.slurm import SlurmExecutor

    from icsk.cli import _hydra_main

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", return_hydra_config=True, overrides=[
            "experiment=lr_sweep", "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}/sweep",
            "hydra.launcher.partition=gpu", "hydra.launcher.array_parallelism=2",
            "hydra.launcher.setup=[source .venv/bin/activate]",
        ])
    captured = {}

    def fake_submit(self, command):
        captured["sbatch"] = self._make_submission_file_text(command, "uid")
        raise _Submitted

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # "srun is on the PATH"
    monkeypatch.setattr(SlurmExecutor, "_submit_command", fake_submit)
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    launcher.setup(hydra_context=None, task_function=_hydra_main, config=cfg)
    jobs = [["optim.lr=0.01"], ["optim.lr=0.1"], ["optim.lr=1.0"]]
    with pytest.raises(_Submitted):
        launcher.launch(jobs, initial_job_idx=0)
    text = captured["sbatch"]
    for line in ["#SBATCH --array=0-2%2", "#SBATCH --partition=gpu", "#SBATCH --time=240", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB", "#SBATCH --nodes=1", "source .venv/bin/activate"]:
        assert line in text, (line, text)
    assert f"{tmp_path}/sweep/.submitit/" in text
    assert "submitit.core._submit" in text
    assert len(list((tmp_path / "sweep" / ".submitit").rglob("*.pkl"))) == 3  # one pickled job per override set


def _job(sweep: Path, num: int, overrides: list[str], run: dict | None = None, hydra_status: dict | None = None):
    d = sweep / str(num)
    (d / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), d / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"job": {"num": num}}}), d / ".hydra" / "hydra.yaml")
    if run is not None:
        (d / "run.json").write_text(json.dumps(run))
    if hydra_status is not None:
        (d / JOB_STATUS).write_text(json.dumps(hydra_status))


def _arms(bn="finished", none="finished", step=None):
    return {"bn": {"status": bn, "diverged_step": None, "last_step": 99},
            "none": {"status": none, "diverged_step": step, "last_step": step or 99}}


def test_summary_statuses_from_folders(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    OmegaConf.save(OmegaConf.create({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "max_batch_size": None,
                    "params": {"optim.lr": "0.1,1.0,10.0"}},
        "overrides": {"task": ["experiment=demo", "seed=0,1"]}}}), sweep / "multirun.yaml")
    expected = expected_jobs(sweep)
    assert expected is not None and len(expected) == 6
    assert expected[0] == ["optim.lr=0.1", "experiment=demo", "seed=0"]
    final = {"bn": {"test_acc": 0.9, "loss": 0.1}, "none": {"test_acc": 0.5, "loss": 1.0}}
    _job(sweep, 0, expected[0], {"status": "finished", "arms": _arms(), "final": final, "wandb_run": "abc"})
    _job(sweep, 1, expected[1], {"status": "finished", "arms": _arms(none="diverged", step=7), "final": final})
    _job(sweep, 2, expected[2], {"status": "failed", "error": "RuntimeError: boom", "arms": _arms(), "final": {}})
    _job(sweep, 3, expected[3], None, {"job": 3, "status": "failed", "error": "ConfigError: bad lr"})
    _job(sweep, 4, expected[4], {"status": "interrupted", "arms": _arms(), "final": final})
    # job 5 never started: no folder at all
    df = summarize_sweep(sweep)
    assert df.job.tolist() == [0, 1, 2, 3, 4, 5]
    assert df.status.tolist() == ["finished", "diverged", "failed", "failed", "interrupted", "missing"]
    assert df.error[2] == "RuntimeError: boom" and df.error[3] == "ConfigError: bad lr"
    assert df["optim.lr"].tolist() == [0.1, 0.1, 1.0, 1.0, 10.0, 10.0]
    assert df["seed"].tolist() == [0, 1, 0, 1, 0, 1]
    assert df.loc[1, "none/status"] == "diverged" and df.loc[1, "none/diverged_step"] == 7
    assert df.loc[0, "bn/test_acc"] == 0.9 and df.loc[0, "wandb_run"] == "abc"
    assert df.folder[5] == "" and df.overrides[5] == "optim.lr=10.0 experiment=demo seed=1"
    assert df.columns[:6].tolist() == ["job", "folder", "overrides", "status", "error", "wandb_run"]

    write_summary(sweep)
    assert pd.read_csv(sweep / "sweep_summary.csv").status.tolist() == df.status.tolist()
    assert pd.read_parquet(sweep / "sweep_summary.parquet").shape == df.shape


def test_summary_cli_and_empty_sweep(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert summarize_sweep(empty).empty
    sweep = tmp_path / "s"
    sweep.mkdir()
    _job(sweep, 0, ["seed=3"], {"status": "finished", "arms": _arms(), "final": {"bn": {"test_acc": 0.8}}})
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "1 jobs" in out and "finished" in out
    assert (sweep / "sweep_summary.csv").exists()
    with pytest.raises(FileNotFoundError):
        summarize_sweep(tmp_path / "nope")
    with pytest.raises(SystemExit) as e:  # a one-line usage error, not a traceback
        main([str(sweep), str(tmp_path / "nope")])
    assert e.value.code == 2 and f"no such sweep folder: {tmp_path / 'nope'}" in capsys.readouterr().err


def test_callback_writes_at_exit_when_the_sweep_raised(tmp_path):
    """Hydra skips on_multirun_end after a failed job; the callback's exit hook writes the table."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    _job(sweep, 0, ["seed=0"], {"status": "finished", "arms": _arms(), "final": {}})
    cb = SweepSummary(print_table=False)
    cb.on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert not (sweep / "sweep_summary.csv").exists()
    cb._at_exit()  # what atexit runs
    assert pd.read_csv(sweep / "sweep_summary.csv").status.tolist() == ["finished"]
    (sweep / "sweep_summary.csv").unlink()
    cb.on_multirun_end(OmegaConf.create({}))  # written once only
    assert not (sweep / "sweep_summary.csv").exists()


def test_a_job_that_died_while_running_is_summarized_as_failed(tmp_path):
    """run.json still says "running" (the process died before it could say more) while Hydra's
    job_status.json recorded the failure: the row says failed, with Hydra's error."""
    from icsk.sweep import job_row

    job = tmp_path / "0"
    job.mkdir()
    (job / "run.json").write_text(json.dumps({"status": "running", "arms": {}}))
    (job / JOB_STATUS).write_text(json.dumps({"status": "failed", "error": "ValueError: boom"}))
    row = job_row(job, 0, ["seed=0"], tmp_path)
    assert (row["status"], row["error"]) == ("failed", "ValueError: boom")
    (job / JOB_STATUS).write_text(json.dumps({"status": "running"}))  # still running for all anyone knows
    assert job_row(job, 0, ["seed=0"], tmp_path)["status"] == "running"


@pytest.mark.slow
def test_ctrl_c_on_a_sweep_prints_the_command_that_finishes_it(tmp_path):
    """It printed Python's traceback of the KeyboardInterrupt and no way on."""
    import shlex
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HYDRA_"))}
    env.update(OMP_NUM_THREADS="1")
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([*icsk_train(), "-m", *TINY, "train.steps=1000000", "logger=none", "seed=0,1",
                             "recorder.flush_every=16", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not list((sweep / "0" / "arms" / "bn" / "stats").glob("chunk-*.parquet")):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no chunk appeared"
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    line = next(x for x in err.splitlines() if x.startswith("icsk-train: sweep interrupted:"))
    words = shlex.split(line.split("continue it with: ")[1])
    assert words[1] == "-m" and "seed=0,1" in words and words[-2:] == ["resume=true", f"hydra.sweep.dir='{sweep}'"]
    assert json.loads((sweep / "0" / "run.json").read_text())["status"] == "interrupted"
