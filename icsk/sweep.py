"""Sweep index: one table row per job of a Hydra multirun (``sweep_summary.csv`` / ``.parquet``).

The :class:`SweepSummary` Hydra callback (registered in ``conf/config.yaml`` under
``hydra.callbacks``) writes ``<sweep_dir>/sweep_summary.csv`` (and ``.parquet``) when a multirun
ends -- also when some jobs failed: Hydra then raises after the last job and skips
``on_multirun_end``, so the callback writes the table at interpreter exit instead. Each job
also leaves ``job_status.json`` (Hydra's view: completed or failed, and the error) so that a job
that failed before its run folder existed is reported as ``failed``, not ``missing``.

:func:`summarize_sweep` builds the same table from the folders alone (no Hydra app needed), e.g.
while a SLURM sweep is still running: ``python -m icsk.sweep multirun/lr_sweep/<date>``.

Columns: ``job``, ``folder``, ``overrides`` (``"seed=0 optim.lr=0.1"``), ``status``
(``finished``, ``diverged`` = finished with an arm diverged, ``failed``, ``interrupted``,
``running``, ``missing``), ``error``, ``wandb_run``, one column per swept key (``optim.lr``,
``seed``, values parsed), then per arm ``<arm>/status``, ``<arm>/diverged_step`` and the arm's
final metrics (``bn/test_acc``, ``none/loss``, ...).
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback

if TYPE_CHECKING:
    import pandas as pd
    from omegaconf import DictConfig

log = logging.getLogger("icsk")

SUMMARY_NAME = "sweep_summary"
JOB_STATUS = "job_status.json"
STATUSES = ("finished", "diverged", "failed", "interrupted", "running", "missing")
BASE_COLUMNS = ["job", "folder", "overrides", "status", "error", "wandb_run"]


def quiet_launcher_schema_warning() -> None:
    """Silence Hydra 1.3's deprecation notice about conf/hydra/launcher/joblib.yaml.

    That file shares the plugin's name on purpose (``hydra/launcher=joblib`` picks ours) and is
    complete on its own; Hydra 1.3 still validates it against the plugin's schema of the same
    name and warns, once per process, that such matching is deprecated. This module is imported
    in every sweep process (it holds the sweep callback) before the jobs compose their config."""
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema",
                            category=UserWarning)


quiet_launcher_schema_warning()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _yaml(path: Path) -> Any:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:
        return None


def _parse_value(text: str) -> Any:
    """An override's value as YAML would read it (``0.1`` -> float, ``bn`` -> str)."""
    import yaml

    try:
        v = yaml.safe_load(text)
    except Exception:
        return text
    return v if isinstance(v, (int, float, str, bool)) or v is None else text


def _split_override(o: str) -> tuple[str, str] | None:
    if "=" not in o:
        return None
    key, value = o.split("=", 1)
    key = key.lstrip("+~")
    if key.startswith("hydra.") or key.startswith("hydra/"):
        return None
    return key, value


def expected_jobs(sweep_dir: str | Path) -> list[list[str]] | None:
    """The job override lists a basic-sweeper multirun launched, in job-number order, rebuilt from
    ``multirun.yaml`` (sweeper params + command-line overrides); None when that is not possible."""
    cfg = _yaml(Path(sweep_dir) / "multirun.yaml")
    if not isinstance(cfg, dict):
        return None
    hydra = cfg.get("hydra") or {}
    sweeper = hydra.get("sweeper") or {}
    if "BasicSweeper" not in str(sweeper.get("_target_", "")):
        return None
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        args = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
        args += [str(o) for o in (hydra.get("overrides") or {}).get("task", [])]
        overrides = OverridesParser.create().parse_overrides(args)
        batches = BasicSweeper.split_arguments(overrides, None)
        return [list(job) for batch in batches for job in batch]
    except Exception as e:  # glob() sweeps need the config loader; fall back to what is on disk
        log.debug("cannot rebuild the job list of %s: %s", sweep_dir, e)
        return None


def _job_folders(sweep_dir: Path) -> dict[int, Path]:
    """Job number -> folder for every job folder (one holding ``.hydra/overrides.yaml``)."""
    found: dict[int, Path] = {}
    extra: list[Path] = []
    for ov in sorted(sweep_dir.rglob(".hydra/overrides.yaml")):
        folder = ov.parent.parent
        num = None
        hcfg = _yaml(ov.parent / "hydra.yaml")
        if isinstance(hcfg, dict):
            num = ((hcfg.get("hydra") or {}).get("job") or {}).get("num")
        if num is None:
            status = _read_json(folder / JOB_STATUS) or {}
            num = status.get("job")
        if num is None and folder.name.isdigit():
            num = int(folder.name)
        if isinstance(num, int) and num not in found:
            found[num] = folder
        else:
            extra.append(folder)
    nxt = max(found, default=-1) + 1
    for folder in extra:  # folders whose number cannot be told: after the others
        found[nxt] = folder
        nxt += 1
    return found


def job_row(folder: Path | None, job: int, overrides: list[str], sweep_dir: Path) -> dict[str, Any]:
    """One summary row for the job in ``folder`` (None: it never started)."""
    row: dict[str, Any] = {"job": job, "folder": "", "overrides": " ".join(overrides), "status": "missing",
                           "error": "", "wandb_run": ""}
    for o in overrides:
        kv = _split_override(o)
        if kv is not None:
            key = kv[0] if kv[0] not in BASE_COLUMNS else f"override:{kv[0]}"
            row[key] = _parse_value(kv[1])
    if folder is None:
        return row
    try:
        row["folder"] = str(folder.relative_to(sweep_dir))
    except ValueError:
        row["folder"] = str(folder)
    info = _read_json(folder / "run.json")
    hydra_status = _read_json(folder / JOB_STATUS) or {}
    if info is None:
        if hydra_status.get("status") == "failed":
            row["status"] = "failed"
            row["error"] = hydra_status.get("error", "")
        return row
    status = str(info.get("status", "missing"))
    if status == "running" and hydra_status.get("status") == "failed":  # (a job killed before run.json said so)
        status = "failed"
    arms: dict[str, Any] = info.get("arms") or {}
    if status == "finished" and any((a or {}).get("status") == "diverged" for a in arms.values()):
        status = "diverged"
    row["status"] = status
    row["error"] = info.get("error") or (hydra_status.get("error", "") if status == "failed" else "")
    row["wandb_run"] = info.get("wandb_run") or ""
    final: dict[str, Any] = info.get("final") or {}
    for arm in list(arms) + [a for a in final if a not in arms]:
        a = arms.get(arm) or {}
        row[f"{arm}/status"] = a.get("status", "")
        row[f"{arm}/diverged_step"] = a.get("diverged_step")
        for metric, value in sorted((final.get(arm) or {}).items()):
            row[f"{arm}/{metric}"] = value
    return row


def summarize_sweep(sweep_dir: str | Path) -> pd.DataFrame:
    """The sweep table of a multirun folder (``multirun.yaml``, each job's ``.hydra/overrides.yaml``
    and ``run.json``); jobs that ``multirun.yaml`` implies but that left no folder are ``missing``."""
    import pandas as pd

    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"no sweep folder {sweep_dir}")
    folders = _job_folders(sweep_dir)
    expected = expected_jobs(sweep_dir) or []
    rows = []
    for num in sorted(set(folders) | set(range(len(expected)))):
        folder = folders.get(num)
        overrides = None
        if folder is not None:
            ov = _yaml(folder / ".hydra" / "overrides.yaml")
            overrides = [str(o) for o in ov] if isinstance(ov, list) else None
        if overrides is None:
            overrides = expected[num] if num < len(expected) else []
        rows.append(job_row(folder, num, overrides, sweep_dir))
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=BASE_COLUMNS)
    swept = [c for c in df.columns if c not in BASE_COLUMNS and "/" not in c]
    arm_cols = [c for c in df.columns if "/" in c]
    df = df[BASE_COLUMNS + swept + arm_cols]
    return df.sort_values("job", kind="stable").reset_index(drop=True)


def write_summary(sweep_dir: str | Path, *, parquet: bool = True) -> pd.DataFrame:
    """Write ``sweep_summary.csv`` (and ``.parquet``) into ``sweep_dir``; returns the table."""
    sweep_dir = Path(sweep_dir)
    df = summarize_sweep(sweep_dir)
    tmp = sweep_dir / f".{SUMMARY_NAME}.csv.tmp"
    df.to_csv(tmp, index=False)
    tmp.replace(sweep_dir / f"{SUMMARY_NAME}.csv")
    if parquet:
        try:
            out = df.copy()
            for c in out.columns:  # mixed-type columns (an override given as 1 and as "a") as text
                if out[c].dtype == object and out[c].map(type).nunique() > 1:
                    out[c] = out[c].map(lambda v: None if v is None else str(v))
            out.to_parquet(sweep_dir / f"{SUMMARY_NAME}.parquet", index=False)
        except Exception as e:  # the CSV is the index; parquet is a convenience
            log.warning("sweep summary: no parquet (%s)", e)
    return df


active_sweep_dir: str | None = None  # the sweep this process launched (icsk-train's interrupt message)


class SweepSummary(Callback):
    """Hydra callback: ``job_status.json`` per job, ``sweep_summary.csv`` per multirun."""

    def __init__(self, parquet: bool = True, print_table: bool = True) -> None:
        self.parquet = parquet
        self.print_table = print_table
        self._sweep_dir: Path | None = None
        self._done = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global active_sweep_dir
        active_sweep_dir = str(config.hydra.sweep.dir)
        self._sweep_dir = Path(active_sweep_dir).resolve()
        self._done = False
        atexit.register(self._at_exit)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        try:
            if config.hydra.mode != RunMode.MULTIRUN:
                return
            out = Path(str(config.hydra.runtime.output_dir))
            failed = job_return.status == JobStatus.FAILED
            err = job_return._return_value if failed else None
            rec = {"job": int(config.hydra.job.num), "status": "failed" if failed else "completed",
                   "error": f"{type(err).__name__}: {err}" if err is not None else "",
                   "overrides": [str(o) for o in config.hydra.overrides.task]}
            (out / JOB_STATUS).write_text(json.dumps(rec, indent=1))
        except Exception as e:  # bookkeeping must never turn a job into a failure
            log.warning("sweep summary: cannot record job status: %s", e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._write()

    def _at_exit(self) -> None:
        if not self._done:  # the sweep raised (a job failed) before on_multirun_end
            self._write()

    def _write(self) -> None:
        if self._done or self._sweep_dir is None or not self._sweep_dir.is_dir():
            return
        self._done = True
        atexit.unregister(self._at_exit)
        try:
            df = write_summary(self._sweep_dir, parquet=self.parquet)
        except Exception as e:
            log.warning("sweep summary of %s failed: %s", self._sweep_dir, e)
            return
        if self.print_table:
            counts = df["status"].value_counts().to_dict() if len(df) else {}
            print(f"sweep summary: {len(df)} jobs {counts} -> {self._sweep_dir / (SUMMARY_NAME + '.csv')}",
                  file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """``python -m icsk.sweep SWEEP_DIR...``: (re)write and print the summary of sweep folders."""
    import argparse

    import pandas as pd

    p = argparse.ArgumentParser(prog="python -m icsk.sweep", description=main.__doc__)
    p.add_argument("sweep_dirs", nargs="+", type=Path)
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if missing := [str(d) for d in args.sweep_dirs if not d.is_dir()]:
        p.error(f"no such sweep folder: {', '.join(missing)} (a multirun folder, e.g. multirun/<date>/<time>)")
    with pd.option_context("display.max_columns", 30, "display.width", 200):
        for d in args.sweep_dirs:
            df = summarize_sweep(d) if args.no_write else write_summary(d)
            print(f"# {d}: {len(df)} jobs")
            print(df.drop(columns=["error"]).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
