"""Logging: a wandb mirror of the run folder (offline unless asked) and console progress.

The run folder is the source of truth; wandb gets per-arm scalars at the log rate, under the
history key ``<arm>/<metric>`` (``<arm>/<metric>/<layer>`` for per-layer metrics such as
``bn/ics_l2/block1.linear``; :func:`split_metric_key` inverts it). wandb is
imported lazily, runs ``offline`` by default (written under ``<run>/wandb`` for a later
``wandb sync``), never waits on a network, and is always finished so that consecutive sweep
jobs never merge into one wandb run.

Inside a Hydra multirun the run is tagged with its sweep: the wandb group becomes
``<group>-<sweep id>`` (``logger.sweep_group``; the sweep id is the sweep folder's name), the
tag ``sweep:<sweep id>`` is added, the run is named after its job (``<num>:<overrides>``) and
the config gets a ``hydra`` entry (job number, sweep folder, overrides) to group or filter by.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("icsk")

WANDB_MODES = ("offline", "online", "disabled")
# wandb's legacy spellings of its modes (WANDB_MODE=dryrun etc.)
_MODE_ALIASES = {"dryrun": "offline", "run": "online", "false": "disabled", "off": "disabled"}


def normalize_mode(mode: str | None) -> str:
    """``offline``/``online``/``disabled`` from a config or env value (``dryrun`` = offline, ...)."""
    m = str(mode if mode is not None else "offline").strip().lower()
    m = _MODE_ALIASES.get(m, m)
    if m not in WANDB_MODES:
        raise ValueError(f"logger.mode must be one of {WANDB_MODES}, got {mode!r}")
    return m


def split_metric_key(key: str) -> tuple[str, str, str] | None:
    """``(arm, metric, layer)`` of a history key ``<arm>/<metric>[/<layer>]`` (layer ``""`` when
    absent); None for keys that are not icsk metrics (wandb's ``_step``, ``_runtime``, ``step``)."""
    if key.startswith("_") or "/" not in key:
        return None
    arm, metric, *layer = key.split("/", 2)
    return (arm, metric, layer[0] if layer else "") if arm and metric else None


class NullLogger:
    """Logs nothing (``logger=none``)."""

    run_id: str | None = None

    def log(self, step: int, arm: str, values: dict[str, float]) -> None:
        pass

    def log_histogram(self, step: int, arm: str, key: str, counts=None, edges=None, *, values=None) -> None:
        pass

    def log_images(self, images: Mapping[str, Any], step: int | None = None) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def hydra_job_info() -> dict[str, Any] | None:
    """The current Hydra job (mode, job number, sweep folder, overrides), or None outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover - hydra is a dependency
        return None
    if not HydraConfig.initialized():
        return None
    try:
        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        info: dict[str, Any] = {
            "mode": "multirun" if multirun else "run",
            "job_name": str(hc.job.name),
            "output_dir": str(hc.runtime.output_dir),
            "overrides": [str(o) for o in hc.overrides.task],
        }
        if multirun:
            sweep_dir = Path(str(hc.sweep.dir))
            info.update(num=int(hc.job.num), sweep_dir=str(sweep_dir.resolve()), sweep_id=sweep_dir.name,
                        override_dirname=str(hc.job.override_dirname))
        return info
    except Exception as e:  # never let bookkeeping break a run
        log.debug("no Hydra job info: %s", e)
        return None


def run_identity(cfg: Mapping[str, Any] | None, job: dict[str, Any] | None) -> dict[str, Any]:
    """wandb ``group``, ``job_type``, ``tags`` and ``name`` for a run from the logger config and Hydra job."""
    cfg = cfg or {}
    group = cfg.get("group")
    tags = [str(t) for t in (cfg.get("tags") or [])]
    name = cfg.get("run_name")
    if job is not None and job.get("mode") == "multirun":
        sweep_id = job["sweep_id"]
        if cfg.get("sweep_group", True):
            group = f"{group}-{sweep_id}" if group else sweep_id
        tags.append(f"sweep:{sweep_id}"[:64])  # wandb limits tags to 64 characters
        if name is None:
            name = f"{job['num']}:{job['override_dirname']}" if job.get("override_dirname") else str(job["num"])
    return {"group": None if group is None else str(group)[:128], "job_type": cfg.get("job_type"),
            "tags": list(dict.fromkeys(tags)), "name": None if name is None else str(name)[:128]}


class WandbLogger(NullLogger):
    """Mirrors metrics to wandb as ``<arm>/<metric>`` with ``step`` as the x axis.

    Values logged for the same training step (every arm, evaluation, probes) are merged into one
    wandb history row, written when a later step arrives or at :meth:`finish`.
    """

    def __init__(self, run_dir: Path, config: dict[str, Any], *, mode: str = "offline", project: str = "icsk",
                 entity: str | None = None, group: str | None = None, job_type: str | None = None,
                 tags: Sequence[str] | None = None, name: str | None = None, init_timeout: float = 60.0,
                 resume_id: str | None = None):
        mode = normalize_mode(mode)
        import wandb

        self._wandb = wandb
        os.environ.setdefault("WANDB_SILENT", "true")
        offline = mode != "online"
        # offline must never touch a network: no system/hardware probes (cloud metadata endpoints),
        # no git remote lookups, no launch-job artifacts; the console is captured by the run folder.
        settings = wandb.Settings(init_timeout=init_timeout, console="off", silent=True,
                                  x_disable_stats=True, x_disable_meta=True, x_disable_machine_info=True,
                                  disable_job_creation=True, disable_git=offline, save_code=False)
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            dir=str(run_dir), mode=mode, project=project, entity=entity, group=group, job_type=job_type,
            tags=list(tags or []), name=name, config=config, settings=settings, reinit="finish_previous",
            **({"id": resume_id, "resume": "allow"} if resume_id else {}),
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.run_id = self.run.id
        self.mode = mode
        self._step: int | None = None
        self._row: dict[str, Any] = {}

    # --- history -------------------------------------------------------------------------------
    def _add(self, step: int, row: Mapping[str, Any]) -> None:
        if self._step is not None and step != self._step:
            self.flush()
        self._step = int(step)
        self._row.update(row)

    def flush(self) -> None:
        """Write the pending row (values of one step) to wandb."""
        if self._row and self.run is not None:
            row, self._row = dict(self._row), {}
            row["step"] = self._step
            self.run.log(row)
        self._row = {}

    def log(self, step: int, arm: str, values: dict[str, float]) -> None:
        self._add(step, {f"{arm}/{k}": v for k, v in values.items()})

    def log_histogram(self, step: int, arm: str, key: str, counts=None, edges=None, *, values=None) -> None:
        """A histogram ``<arm>/<key>``: bin ``counts`` with their ``edges`` (len + 1), or raw ``values``."""
        if values is not None:
            import numpy as np

            hist = self._wandb.Histogram(np.asarray(values, dtype=float).ravel())
        else:
            if counts is None or edges is None or len(edges) != len(counts) + 1:
                raise ValueError("log_histogram needs counts and edges (len(edges) == len(counts) + 1) or values=")
            hist = self._wandb.Histogram(np_histogram=([float(c) for c in counts], [float(e) for e in edges]))
        self._add(step, {f"{arm}/{key}": hist})

    def log_images(self, images: Mapping[str, Any], step: int | None = None) -> None:
        """Figures (image paths, PIL images, arrays or matplotlib figures) as ``wandb.Image``.

        With ``step`` they join that step's row; without, they go in a row of their own
        (report figures of a finished run)."""
        row = {k: v if isinstance(v, self._wandb.Image) else self._wandb.Image(str(v) if isinstance(v, Path) else v)
               for k, v in images.items()}
        if step is not None:
            self._add(step, row)
        else:
            self.flush()
            self.run.log(row)

    def summary(self, values: dict[str, Any]) -> None:
        self.flush()
        self.run.summary.update(dict(values))

    def finish(self, exit_code: int = 0) -> None:
        """Flush and finish the wandb run (idempotent); a failure to flush never skips the finish."""
        if self.run is None:
            return
        try:
            self.flush()
        finally:
            run, self.run = self.run, None
            run.finish(exit_code=exit_code)


def make_logger(cfg: Any, run_dir: Path, config: dict[str, Any], resume_id: str | None = None,
                identity: dict[str, Any] | None = None) -> NullLogger:
    """Logger from the ``logger`` config group (``name: wandb|none``).

    ``mode=disabled`` (or ``logger=none``) logs nothing and writes nothing. In a Hydra multirun
    the sweep shapes group, tags and name (see :func:`run_identity`). ``resume_id``: the wandb
    run of an earlier attempt of this run, continued instead of starting another one (it then
    holds the steps between the checkpoint and the interruption twice; readers keep the last).
    ``identity``: group, job_type, tags and name to use instead of :func:`run_identity`'s (a
    resumed sweep job keeps those of its first attempt)."""
    name = str(cfg.get("name", "none")) if cfg is not None else "none"
    if name == "none":
        return NullLogger()
    if name != "wandb":
        raise ValueError(f"unknown logger {name!r}; use logger=wandb or logger=none")
    mode = normalize_mode(cfg.get("mode", "offline"))
    if mode == "disabled":
        return NullLogger()
    job = hydra_job_info()
    ident = identity or run_identity(cfg, job)
    config = dict(config)
    if job is not None:
        config.setdefault("hydra", job)
    return WandbLogger(
        run_dir, config, mode=mode, project=str(cfg.get("project", "icsk")), entity=cfg.get("entity"),
        group=ident["group"], job_type=ident["job_type"], tags=ident["tags"], name=ident["name"],
        init_timeout=float(cfg.get("init_timeout", 60)), resume_id=resume_id,
    )
