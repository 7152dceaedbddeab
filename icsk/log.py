"""Logging: a wandb mirror of the run folder (offline unless asked) and console progress.

The run folder is the source of truth; wandb gets per-arm scalars at the log rate. wandb is
imported lazily, runs ``offline`` by default (written under ``<run>/wandb`` for a later
``wandb sync``), never waits on a network, and is always finished so that consecutive sweep
jobs never merge into one wandb run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("icsk")

WANDB_MODES = ("offline", "online", "disabled")


class NullLogger:
    """Logs nothing (``logger=none``)."""

    run_id: str | None = None

    def log(self, step: int, arm: str, values: dict[str, float]) -> None:
        pass

    def log_histogram(self, step: int, arm: str, key: str, counts, edges) -> None:
        pass

    def log_images(self, images: dict[str, str]) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbLogger(NullLogger):
    """Mirrors metrics to wandb as ``<arm>/<metric>`` with ``step`` as the x axis."""

    def __init__(self, run_dir: Path, config: dict[str, Any], *, mode: str = "offline", project: str = "icsk",
                 entity: str | None = None, group: str | None = None, job_type: str | None = None,
                 tags: list[str] | None = None, name: str | None = None, init_timeout: float = 60.0):
        if mode not in WANDB_MODES:
            raise ValueError(f"logger.mode must be one of {WANDB_MODES}, got {mode!r}")
        import wandb

        self._wandb = wandb
        os.environ.setdefault("WANDB_SILENT", "true")
        settings = wandb.Settings(init_timeout=init_timeout, console="off", silent=True,
                                  x_disable_stats=True, x_disable_meta=True)
        self.run = wandb.init(
            dir=str(run_dir), mode=mode, project=project, entity=entity, group=group, job_type=job_type,
            tags=list(tags or []), name=name, config=config, settings=settings, reinit="finish_previous",
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.run_id = self.run.id
        self._pending: dict[int, dict[str, Any]] = {}

    def log(self, step: int, arm: str, values: dict[str, float]) -> None:
        row = {f"{arm}/{k}": v for k, v in values.items()}
        row["step"] = step
        self.run.log(row)

    def log_histogram(self, step: int, arm: str, key: str, counts, edges) -> None:
        hist = self._wandb.Histogram(np_histogram=(list(counts), list(edges)))
        self.run.log({f"{arm}/{key}": hist, "step": step})

    def log_images(self, images: dict[str, str]) -> None:
        self.run.log({k: self._wandb.Image(v) for k, v in images.items()})

    def summary(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            self.run.summary[k] = v

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def make_logger(cfg: Any, run_dir: Path, config: dict[str, Any]) -> NullLogger:
    """Logger from the ``logger`` config group (``name: wandb|none``)."""
    name = str(cfg.get("name", "none")) if cfg is not None else "none"
    if name == "none" or (name == "wandb" and cfg.get("mode") == "disabled"):
        return NullLogger()
    if name != "wandb":
        raise ValueError(f"unknown logger {name!r}; use logger=wandb or logger=none")
    return WandbLogger(
        run_dir, config, mode=str(cfg.get("mode", "offline")), project=str(cfg.get("project", "icsk")),
        entity=cfg.get("entity"), group=cfg.get("group"), job_type=cfg.get("job_type"),
        tags=list(cfg.get("tags") or []), name=cfg.get("run_name"), init_timeout=float(cfg.get("init_timeout", 60)),
    )
