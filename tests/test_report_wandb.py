"""icsk-report on wandb runs: the history -> metrics conversion checked against the run folders of
real training jobs (logged offline), and the wandb API path through a fake ``wandb.Api`` fed with
those runs (no network)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from test_report import _check_pdf, _check_png, _titles  # noqa: E402
from test_wandb import _netns_available, tiny_cfg  # noqa: E402

import icsk  # noqa: E402
from icsk.experiment import run as train  # noqa: E402
from icsk.report import collect_runs, figures  # noqa: E402
from icsk.report.cli import main  # noqa: E402
from icsk.report.loading import Run  # noqa: E402
from icsk.report.wandb_source import WandbQuery, WandbRun, history_to_metrics, wandb_config  # noqa: E402
from icsk.wandb_offline import read_offline_run  # noqa: E402

KEY = ["step", "arm", "metric", "layer"]
JOBS = [(0.1, 0), (0.1, 1), (10.0, 0)]  # (optim.lr, seed); at lr=10 the ReLU net without BN diverges


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, wandb_env_module) -> Path:
    """Three real training jobs with the probes on and the wandb logger offline: sweep/0, 1, 2."""
    root = tmp_path_factory.mktemp("wandb_sweep")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, (lr, seed) in enumerate(JOBS):
            train(tiny_cfg("logger.mode=offline", "model.activation=relu", f"optim.lr={lr}", f"seed={seed}",
                           "metrics=santurkar", "metrics.ics.schedule=3", "metrics.smoothness.schedule=3",
                           "metrics.bn_gap.schedule=6"), root / str(i))
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="module")
def offline(sweep) -> list[dict]:
    return [read_offline_run(sweep / str(i), wait=30) for i in range(len(JOBS))]


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(KEY, kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------- conversion
def test_history_gives_the_run_folders_metrics(sweep, offline):
    seen = set()
    for i, rec in enumerate(offline):
        disk = _sorted(icsk.load_run(sweep / str(i), table="metrics"))
        assert not disk.duplicated(KEY).any()
        got = _sorted(history_to_metrics(rec["history_rows"]))  # dict rows, as scan_history gives them
        pd.testing.assert_frame_equal(got, disk)
        # a DataFrame cannot tell a logged NaN from a missing key: those rows are left out, the rest agree
        pd.testing.assert_frame_equal(_sorted(history_to_metrics(rec["history"])),
                                      _sorted(disk[disk["value"].notna()]))
        seen |= set(zip(disk["metric"], disk["layer"] != "", strict=True))
        run = WandbRun.from_offline(sweep / str(i))
        local = Run.open(sweep / str(i))
        assert run.config == local.config and run.config["optim.lr"] == JOBS[i][0]
        for arm in ("bn", "none"):
            want = {k: local.arm_state(arm)[k] for k in ("status", "diverged_step", "last_step")}
            assert run.arm_state(arm) == want
    # the comparison covered per-layer metrics, scalars, evaluation, divergence and non-finite values
    assert {("ics_l2", True), ("bngap_w2", True), ("smooth_beta", False), ("test_acc", False),
            ("diverged", False)} <= seen
    assert not np.isfinite(icsk.load_run(sweep / "2", table="metrics")["value"]).all()
    assert Run.open(sweep / "2").arm_state("none")["status"] == "diverged"


def test_history_rows_skip_what_is_not_an_icsk_metric():
    rows = [
        {"_step": 0, "_runtime": 1.5, "_timestamp": 1e9, "step": 0, "bn/test_acc": 0.25, "none/test_acc": 1},
        {"_step": 1, "step": 4, "bn/ics_l2/block1.linear": float("nan"), "bn/note": "text", "bn/flag": True,
         "bn/hist/block1": {"_type": "histogram", "values": [1, 2], "bins": [0, 1, 2]}, "loose_key": 3.0},
        {"_step": 2, "report/curve": {"_type": "image-file", "path": "media/x.png"}},  # a report image, no step
        {"_step": 3, "bn/loss": 2.0},  # no training step: not placed on the step axis
    ]
    m = history_to_metrics(rows)
    assert m.columns.tolist() == ["step", "arm", "metric", "layer", "value"]
    assert m[KEY].values.tolist() == [[0, "bn", "test_acc", ""], [0, "none", "test_acc", ""],
                                      [4, "bn", "ics_l2", "block1.linear"]]
    assert m["value"].iloc[:2].tolist() == [0.25, 1.0] and math.isnan(m["value"].iloc[2])
    assert m["step"].dtype == np.int64 and m["value"].dtype == np.float64
    assert history_to_metrics([]).empty and history_to_metrics(pd.DataFrame()).empty
    # the raw config layout ({"value": ..., "desc": ...}) and wandb's own keys
    raw = {"optim": {"value": {"lr": 0.1, "name": "sgd"}, "desc": None}, "seed": {"value": 3}, "_wandb": {"value": {}},
           "model": {"arms": ["bn", "none"]}}
    assert wandb_config(raw) == {"optim.lr": 0.1, "optim.name": "sgd", "seed": 3, "model.arms": ("bn", "none")}


# ---------------------------------------------------------------------- the API path, faked
class FakeRun:
    """The parts of ``wandb.apis.public.Run`` icsk reads, from an offline run on disk."""

    def __init__(self, rec: dict):
        self.id, self.name, self.group = rec["run_id"], rec["name"], rec["group"]
        self.state = "finished" if rec["exit_code"] == 0 else "failed"
        self.config, self.summary, self._rows = rec["config"], rec["summary"], rec["history_rows"]

    def scan_history(self, keys=None, page_size=1000, min_step=0, max_step=None):
        assert keys is None  # every row, not only the rows holding all of some keys
        return iter(self._rows)


class FakeApi:
    """``wandb.Api`` over a dict of projects; records how it was called."""

    projects: dict[str, list[FakeRun]] = {}
    calls: list[tuple] = []
    default_entity = "me"

    def __init__(self, overrides=None, timeout=None, api_key=None):
        FakeApi.calls.append(("Api", timeout))

    def runs(self, path, filters=None, order="+created_at", per_page=50, include_sweeps=False, lazy=True):
        FakeApi.calls.append(("runs", path, filters, per_page))
        if path not in self.projects:
            raise ValueError(f"Could not find project {path}")
        group = (filters or {}).get("group") or next((f["group"] for f in (filters or {}).get("$and", [])
                                                      if "group" in f), None)
        return iter([r for r in self.projects[path] if group is None or r.group == group])

    def run(self, path):
        FakeApi.calls.append(("run", path))
        entity_project, run_id = path.rsplit("/", 1)
        for r in self.projects.get(entity_project, []):
            if r.id == run_id:
                return r
        raise ValueError(f"Could not find run {path}")


@pytest.fixture
def fake_api(monkeypatch, offline):
    import wandb

    FakeApi.projects = {"me/icsk": [FakeRun(rec) for rec in offline], "me/empty": []}
    FakeApi.calls = []
    monkeypatch.setattr(wandb, "Api", FakeApi)
    return FakeApi


def _ids(offline) -> dict[str, str]:
    """Local run id (sweep/0 -> "0") -> wandb run id ("icsk/<id>")."""
    return {str(i): f"icsk/{rec['run_id']}" for i, rec in enumerate(offline)}


def test_report_from_a_wandb_project_matches_the_run_folders(sweep, offline, fake_api, tmp_path, capsys):
    out = tmp_path / "reports"
    code = main(["wandb:me/icsk", "--out", str(out / "wandb"), "--formats", "png"])  # every figure kind
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err, err
    assert ("Api", 30) in fake_api.calls and ("runs", "me/icsk", {}, 100) in fake_api.calls
    for kind in ("ioffe", "drift_heatmap", "drift_curves", "hist_evolution"):  # no Recorder data in wandb
        assert re.search(rf"figure '{kind}' skipped \(no data\): .*carry scalar metrics only: pass their run "
                         r"folders", err), kind
    assert re.search(r"figure 'ioffe' skipped .*no percentile statistics", err)
    assert main([str(sweep), "--out", str(out / "local"), "--figures", "ics,smoothness,sweep", "--formats", "png"]) == 0
    wb, local = out / "wandb" / "demo", out / "local" / "demo"  # named after the config's name
    kinds = ["ics--optim.lr=0.1", "ics--optim.lr=10", "smoothness--optim.lr=0.1", "smoothness--optim.lr=10",
             "sweep"]
    assert sorted(p.stem for p in wb.glob("*.png")) == sorted(kinds)
    for stem in kinds:
        _check_png(wb / f"{stem}.png")
        with Image.open(wb / f"{stem}.png") as a, Image.open(local / f"{stem}.png") as b:
            assert np.array_equal(np.asarray(a), np.asarray(b)), stem  # the same figure, pixel for pixel
    text = (wb / "summary.md").read_text()
    skipped = re.search(r"## Skipped figures\n\n(- .*\n)+\n", text)
    assert skipped and "**hist_evolution**: no histograms recorded" in skipped.group(0)
    want = (local / "summary.md").read_text()
    for i, rid in _ids(offline).items():
        want = re.sub(rf"^\| {i} \|", f"| {rid} |", want, flags=re.M)
    assert text.replace(skipped.group(0), "") == want  # figures, key numbers, divergence table, run status: the same
    assert f"| icsk/{offline[2]['run_id']} | no norm | 0 | optim.lr=10 | 10 |" in text  # diverged, from wandb


def test_figures_of_wandb_runs(offline, fake_api):
    rs = collect_runs(["wandb:icsk"])  # the default entity
    assert [r.run_id for r in rs] == list(_ids(offline).values())
    assert rs.varying_keys() == ["optim.lr"] and sorted({r.seed for r in rs}) == [0, 1]
    assert rs.recorded() == {} and rs.stats().empty and rs.hist().empty
    assert _titles(figures.fig_smoothness(rs)) == ["(a) loss landscape", "(b) gradient predictiveness",
                                                   "(c) effective β-smoothness"]
    assert _titles(figures.fig_ics(rs))[:2] == ["block1.linear", "block2.linear"]
    assert figures.fig_sweep(rs).axes[0].get_ylabel() == "final test accuracy"
    with pytest.raises(figures.MissingDataError, match="no percentile statistics"):
        figures.fig_ioffe(rs)


def test_one_run_group_filter_and_limit(offline, fake_api, tmp_path):
    rid = offline[2]["run_id"]
    rs = collect_runs([f"wandb:me/icsk/{rid}", f"wandb:me/icsk/runs/{rid}"])  # the URL form too; no duplicates
    assert [r.run_id for r in rs] == [f"icsk/{rid}"] and ("run", f"me/icsk/{rid}") in fake_api.calls
    assert main([f"wandb:me/icsk/{rid}", "--out", str(tmp_path), "--figures", "smoothness", "--formats", "pdf"]) == 0
    _check_pdf(tmp_path / "demo" / "smoothness.pdf")
    q = WandbQuery(group="demo", filters={"state": "finished"}, max_runs=2, timeout=5)
    assert len(collect_runs(["wandb:me/icsk"], q)) == 2
    assert ("runs", "me/icsk", {"$and": [{"state": "finished"}, {"group": "demo"}]}, 100) in fake_api.calls
    assert ("Api", 5) in fake_api.calls
    assert main(["wandb:me/icsk", "--wandb-group", "other-sweep", "--out", str(tmp_path)]) == 2


def test_wandb_errors_exit_2_with_the_fix(fake_api, monkeypatch, tmp_path, capsys):
    import wandb
    from wandb.errors import CommError, UsageError

    for bad in ("wandb:me//icsk", "wandb:", "wandb:a/b/c/d"):
        with pytest.raises(SystemExit) as e:
            main([bad, "--out", str(tmp_path)])
        assert e.value.code == 2
        assert "expected wandb:ENTITY/PROJECT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["wandb:me/icsk", "--wandb-filters", "{not json"])
    assert "--wandb-filters expects a JSON object" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--wandb-group", "g"])
    assert "no PATH starts with wandb:" in capsys.readouterr().err

    assert main(["wandb:me/empty", "--out", str(tmp_path)]) == 2
    assert "wandb project me/empty has no runs" in capsys.readouterr().err
    assert main(["wandb:me/nope", "--out", str(tmp_path)]) == 2
    assert "cannot read wandb project me/nope (ValueError: Could not find project me/nope)" in capsys.readouterr().err

    def no_login(*a, **kw):
        raise UsageError("No API key configured. Use `wandb login` to log in.")

    class Offline(FakeApi):
        def runs(self, *a, **kw):
            raise CommError("Network error (ConnectionError), entering retry loop.")

    for api, kind in ((no_login, "UsageError"), (Offline, "CommError")):
        monkeypatch.setattr(wandb, "Api", api)
        assert main(["wandb:me/icsk", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith(f"icsk-report: error: cannot read wandb project me/icsk ({kind}: ")
        assert "`wandb login`" in err and "check the network" in err and "local run folders" in err

    class NoEntity(FakeApi):
        default_entity = None

    monkeypatch.setattr(wandb, "Api", NoEntity)
    assert main(["wandb:icsk", "--out", str(tmp_path)]) == 2
    assert "no default wandb entity; name it, wandb:ENTITY/icsk" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not _netns_available(), reason="needs `unshare -n` (a network namespace) to cut the network")
def test_real_wandb_api_without_network_fails_fast(tmp_path):
    """The real wandb.Api with an API key but no network: a one-line error naming the fix, promptly."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_SILENT="true", WANDB_API_KEY="x" * 40, OMP_NUM_THREADS="1",
               **{k: str(tmp_path / k.lower()) for k in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")})
    cmd = ["unshare", "-n", sys.executable, "-m", "icsk.report.cli", "wandb:me/icsk", "--out", str(tmp_path),
           "--wandb-timeout", "5"]
    err = tmp_path / "stderr.txt"
    with err.open("w") as f:  # a file, not a pipe: readable while wandb's exit hook may still run
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f, stdin=subprocess.DEVNULL, env=env)
    try:
        code = p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        # the error is out, but wandb's exit hook still waits on its service (seen now and then without a
        # network); that wait is wandb's, so only the message is checked then
        code = None
    finally:
        if p.poll() is None:
            children = Path(f"/proc/{p.pid}/task/{p.pid}/children")
            for pid in (children.read_text().split() if children.exists() else []):
                os.kill(int(pid), 9)
            p.kill()
            p.wait()
    lines = err.read_text().strip().splitlines()
    assert code in (2, None) and len(lines) == 1, lines
    assert lines[0].startswith("icsk-report: error: cannot read wandb project me/icsk (")
    assert "`wandb login`" in lines[0] and "check the network" in lines[0]
