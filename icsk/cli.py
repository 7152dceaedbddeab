"""Console entry points: ``icsk-train`` (Hydra) and ``icsk-report``."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

_PROCESS_START = time.time() - 1.0  # (file times may round down)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _hydra_main(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .experiment import ConfigError, resume_command, run

    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    if cfg.get("resume") and hc.mode != RunMode.MULTIRUN and not (Path(hc.runtime.output_dir) / "run.json").exists():
        # (a sweep job that never started may have no folder yet: relaunched with resume=true, it starts)
        _remove_if_stub(Path(hc.runtime.output_dir))
        sys.exit(f"icsk-train: resume=true, but {hc.runtime.output_dir} holds no run to continue (no run.json); pass "
                 "the run's folder as hydra.run.dir=<run>, or drop resume=true to start a new run")
    try:
        info = run(cfg, hc.runtime.output_dir, overrides=overrides)
    except (ConfigError, KeyboardInterrupt) as e:
        if hc.mode == RunMode.MULTIRUN:  # the sweep records the job and goes on (or stops, on Ctrl-C)
            raise
        if isinstance(e, ConfigError):
            _remove_if_stub(Path(hc.runtime.output_dir))
            sys.exit(f"icsk-train: {e}")  # a one-line error, not Hydra's traceback
        print(f"icsk-train: interrupted: {hc.runtime.output_dir}; continue it with: "
              f"{resume_command(overrides, hc.runtime.output_dir)}", file=sys.stderr, flush=True)
        sys.exit(130)
    print(run_line(info, hc.runtime.output_dir), flush=True)


def _remove_if_stub(run_dir: Path) -> None:
    """Remove the folder Hydra made for a launch that was refused (only its .hydra/ and log file
    inside, both from this process), so it does not sit among real runs (icsk-report runs/*)."""
    try:
        if {p.name for p in run_dir.iterdir()} <= {".hydra", "icsk.log"} and \
                (run_dir / ".hydra").stat().st_mtime >= _PROCESS_START:
            shutil.rmtree(run_dir)
    except OSError:  # gone already, or not ours to remove
        pass


def run_line(info: dict, run_dir: str | Path) -> str:
    """One line on how a job ended: its status, run folder, each arm's last test accuracy and the
    arms that diverged (a finished job trains its other arms to the end)."""
    acc = [f"{arm} {d['test_acc']:.3f}" for arm, d in (info.get("final") or {}).items() if "test_acc" in d]
    div = [f"{arm} at step {d.get('diverged_step')}" for arm, d in (info.get("arms") or {}).items()
           if d.get("status") == "diverged"]
    return (f"icsk-train: {info.get('status')}: {run_dir}" + (f" (test_acc {', '.join(acc)})" if acc else "")
            + (f"; diverged: {', '.join(div)}" if div else ""))


def train_main() -> None:
    """``icsk-train [overrides]``: one training job (or ``-m`` for a sweep) configured by conf/."""
    import warnings

    import hydra

    # our launcher configs spell out the plugins' fields; Hydra 1.3 notes that as deprecated
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema",
                            category=UserWarning)
    if not (CONF_DIR / "config.yaml").exists():
        sys.exit(f"icsk-train: no Hydra configs at {CONF_DIR}; run it from an icsk checkout (pip install -e .)")
    try:
        hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(_hydra_main)()
    except KeyboardInterrupt:  # a sweep's (a single run prints its own line and exits 130 before this)
        from . import sweep
        from .experiment import sweep_resume_command

        if sweep.active_sweep_dir is None:
            raise
        print(f"icsk-train: sweep interrupted: {sweep.active_sweep_dir}; continue it with: "
              f"{sweep_resume_command(sys.argv[1:], sweep.active_sweep_dir)}", file=sys.stderr, flush=True)
        sys.exit(130)


def report_main(argv: list[str] | None = None) -> None:
    """``icsk-report RUN_OR_SWEEP... --out DIR``: figures from run folders."""
    from .report.cli import main

    sys.exit(main(argv))
