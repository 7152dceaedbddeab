"""Runs read from wandb instead of run folders: ``icsk-report wandb:ENTITY/PROJECT ...``.

wandb mirrors the scalar metrics of a run (history keys ``<arm>/<metric>[/<layer>]``, see
:mod:`icsk.log`), its config, and each arm's status in the summary. A :class:`WandbRun`
therefore has metrics, config and arm status but no Recorder statistics: the figures drawn
from metrics (ics, smoothness, sweep) work; those needing Recorder statistics (ioffe, drift_*,
hist_evolution) report the missing data and need the run folders.

    runs = fetch_runs("wandb:me/icsk", WandbQuery(group="lr_sweep-2026-01-01_10-00-00-000001"))
    run = WandbRun.from_offline("runs/demo/<date>")    # an offline run on disk, same conversion
    history_to_metrics(rows)                           # wandb history rows -> metrics frame
"""

from __future__ import annotations

import itertools
import json
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..log import split_metric_key
from ..config import flatten
from .loading import NoRunsError, Run

PREFIX = "wandb:"
FORMS = "wandb:ENTITY/PROJECT, wandb:ENTITY/PROJECT/RUN_ID or wandb:PROJECT (your default entity)"
PER_PAGE = 100  # runs per API request
HISTORY_PAGE = 1000  # history rows per API request


class WandbSourceError(RuntimeError):
    """wandb could not be read (no login, no network, unknown project or run); the message names
    the project and the fix."""


def is_wandb_path(path: str | Path) -> bool:
    """Whether an input names wandb runs (``wandb:...``) rather than a folder."""
    return str(path).startswith(PREFIX)


@dataclass(frozen=True)
class WandbPath:
    """A parsed ``wandb:`` input: entity (None: ``WANDB_ENTITY`` or your default entity), project,
    optional run id."""

    entity: str | None
    project: str
    run_id: str | None = None

    @classmethod
    def parse(cls, text: str) -> WandbPath:
        """Parse ``wandb:[ENTITY/]PROJECT[/RUN_ID]`` (``ENTITY/PROJECT/runs/RUN_ID``, as in a
        run's URL, works too); ValueError naming the expected forms otherwise."""
        parts = str(text).removeprefix(PREFIX).split("/")
        if len(parts) == 4 and parts[2] == "runs":
            del parts[2]
        if not is_wandb_path(text) or not 1 <= len(parts) <= 3 or not all(p and p == p.strip() for p in parts):
            raise ValueError(f"{text!r} is not a wandb project or run; expected {FORMS}")
        if len(parts) == 1:
            return cls(None, parts[0])
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def describe(self, entity: str | None = None) -> str:
        """``wandb project ENTITY/PROJECT`` or ``wandb run ENTITY/PROJECT/RUN_ID`` (for messages)."""
        parts = (entity or self.entity, self.project, self.run_id)
        return f"wandb {'run' if self.run_id else 'project'} " + "/".join(p for p in parts if p)


@dataclass
class WandbQuery:
    """Which runs of a project to read: wandb ``group``, MongoDB-style ``filters`` as
    ``wandb.Api().runs`` takes them (e.g. ``{"config.optim.lr": 0.1, "state": "finished"}``), at
    most ``max_runs``; ``timeout`` in seconds for each API request. A run path ignores all but
    the timeout."""

    group: str | None = None
    filters: dict[str, Any] | None = None
    max_runs: int | None = None
    timeout: int = 30

    def api_filters(self) -> dict[str, Any]:
        """``filters`` and ``group`` as one filter dict for ``Api.runs``."""
        parts = [f for f in (self.filters, {"group": self.group} if self.group else None) if f]
        return {"$and": parts} if len(parts) > 1 else (parts[0] if parts else {})


# ---------------------------------------------------------------------- conversion (pure)
def _number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def history_to_metrics(history: Iterable[Mapping[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """wandb history rows -> the metrics frame ``step, arm, metric, layer, value`` of a run folder.

    ``history`` is rows as dicts (``Run.scan_history()``) or a DataFrame (``Run.history()``,
    :func:`icsk.wandb_offline.read_offline_run`). Keys ``<arm>/<metric>[/<layer>]`` are split
    with :func:`icsk.log.split_metric_key`; the row's ``step`` column is the training step (rows
    without one are skipped); histograms, images and text are skipped. A DataFrame cannot tell a
    NaN cell from a key the row lacks, so its NaN cells are skipped; dict rows keep logged NaNs.
    A value logged twice for one step (a resumed run re-logs the steps after its checkpoint)
    keeps the later one."""
    if isinstance(history, pd.DataFrame):
        history = ({k: v for k, v in row.items() if not (_number(v) and v != v)}
                   for row in history.to_dict("records"))
    parsed: dict[str, tuple[str, str, str] | None] = {}
    steps, arms, metrics, layers, values = [], [], [], [], []
    for row in history:
        step = row.get("step")
        if not _number(step) or not np.isfinite(step):
            continue
        for key, v in row.items():
            if key not in parsed:
                parsed[key] = split_metric_key(str(key))
            if parsed[key] is None or not _number(v):
                continue
            arm, metric, layer = parsed[key]
            steps.append(int(step))
            arms.append(arm)
            metrics.append(metric)
            layers.append(layer)
            values.append(float(v))
    df = pd.DataFrame({"step": np.asarray(steps, dtype=np.int64), "arm": pd.Series(arms, dtype=str),
                       "metric": pd.Series(metrics, dtype=str), "layer": pd.Series(layers, dtype=str),
                       "value": np.asarray(values, dtype=np.float64)})
    # a resumed run logs the steps between its checkpoint and the interruption again: the last wins
    return df.drop_duplicates(["step", "arm", "metric", "layer"], keep="last", ignore_index=True)


def wandb_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A wandb run config as the flat dotted keys of a run folder's config (``optim.lr``): wandb's
    own ``_*`` entries dropped, the ``{"value": ..., "desc": ...}`` wrapping of raw configs undone."""

    def unwrap(v: Any) -> Any:
        return v["value"] if isinstance(v, Mapping) and "value" in v and set(v) <= {"value", "desc"} else v

    return flatten({k: unwrap(v) for k, v in config.items() if not str(k).startswith("_")})


def arm_status(summary: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """``{arm: {"status": ...}}`` from the summary keys ``<arm>/status`` icsk writes at the end."""
    out = {}
    for k, v in summary.items():
        parts = split_metric_key(str(k))
        if parts is not None and parts[1:] == ("status", "") and isinstance(v, str):
            out[parts[0]] = {"status": v}
    return out


# ---------------------------------------------------------------------- runs
@dataclass
class WandbRun(Run):
    """A run read from wandb: metrics from its history, config, and arm status from its summary
    (``info``: ``status`` = wandb state, ``arms``, ``wandb_path``, ``wandb_name``, ``group``).
    It has no Recorder statistics: wandb carries scalar metrics only."""

    history: Any = field(default=None, repr=False)

    @classmethod
    def from_record(cls, rec: Mapping[str, Any], run_id: str, wandb_path: str) -> WandbRun:
        """From a dict laid out like :func:`icsk.wandb_offline.read_offline_run`'s (``config``,
        ``summary``, ``history``, ``name``, ``group``) plus ``state``."""
        info = {"status": rec.get("state") or "unknown", "arms": arm_status(rec.get("summary") or {}),
                "wandb_path": wandb_path, "wandb_name": rec.get("name"), "group": rec.get("group")}
        return cls(path=None, run_id=run_id, config=wandb_config(rec.get("config") or {}), info=info,
                   history=rec.get("history"))

    @classmethod
    def from_offline(cls, path: str | Path) -> WandbRun:
        """An offline wandb run on disk (a run folder, its ``wandb/`` or ``offline-run-*`` folder)."""
        from ..wandb_offline import read_offline_run

        rec = read_offline_run(path)
        code = rec["exit_code"]
        state = "running" if code is None else ("finished" if code == 0 else "failed")
        rec = {**rec, "state": state, "history": rec["history_rows"]}
        return cls.from_record(rec, f"{rec['project']}/{rec['run_id']}", rec["path"])

    @property
    def arm_dirs(self) -> list[str]:
        return []

    def recorder_arms(self) -> list[str]:
        return []

    def recorder_meta(self, arm: str) -> dict:
        return {}

    def _load_metrics(self) -> pd.DataFrame:
        return history_to_metrics([] if self.history is None else self.history)

    def _table(self, table: str, **kw) -> pd.DataFrame:
        return pd.DataFrame()


def _api_record(run: Any) -> dict[str, Any]:
    """What a report needs of a public-API run, laid out as :meth:`WandbRun.from_record` reads it
    (the whole history, unsampled)."""
    return {"name": run.name, "group": run.group, "state": run.state, "config": dict(run.config),
            "summary": dict(run.summary.items()), "history": list(run.scan_history(page_size=HISTORY_PAGE))}


def _teardown_wandb(timeout: float = 5.0) -> None:
    """Shut down wandb's service process, waiting at most ``timeout`` seconds. After a network
    failure it may still be retrying, and the exit hook wandb registers would wait for it."""
    import threading

    import wandb

    worker = threading.Thread(target=wandb.teardown, name="icsk-wandb-teardown", daemon=True)
    worker.start()
    worker.join(timeout)


def fetch_runs(path: str, query: WandbQuery | None = None) -> list[WandbRun]:
    """The runs of a ``wandb:`` input through the public API (``wandb.Api``), each with its full
    history. Raises ValueError (malformed path), WandbSourceError (no login, no network, unknown
    project or run) and NoRunsError (no run matches the query)."""
    src = WandbPath.parse(path)
    q = query or WandbQuery()
    where = src.describe()
    try:
        import wandb

        api = wandb.Api(timeout=q.timeout)
        entity = src.entity or getattr(api, "settings", {}).get("entity") or api.default_entity  # as wandb does
        if not entity:
            raise WandbSourceError(f"{where}: no default wandb entity; name it, wandb:ENTITY/{src.project}")
        where = src.describe(entity)
        if src.run_id:
            found: Iterable[Any] = [api.run(f"{entity}/{src.project}/{src.run_id}")]
        else:
            found = itertools.islice(api.runs(f"{entity}/{src.project}", filters=q.api_filters(), per_page=PER_PAGE),
                                     q.max_runs)
        records = [(r.id, _api_record(r)) for r in found]
    except WandbSourceError:
        raise
    except Exception as e:  # wandb raises many kinds (CommError, UsageError, requests/HTTP errors, ValueError)
        _teardown_wandb()
        detail = (str(e).strip().splitlines() or [""])[0][:300]
        raise WandbSourceError(
            f"cannot read {where} ({type(e).__name__}: {detail}); log in with `wandb login` (or set "
            "WANDB_API_KEY), check the network and the name, or pass the local run folders instead"
        ) from e
    if not records:
        filters = q.api_filters()
        raise NoRunsError(f"{where} has no runs" + (f" matching {json.dumps(filters)}" if filters else ""))
    return [WandbRun.from_record(rec, f"{src.project}/{rid}", f"{entity}/{src.project}/{rid}") for rid, rec in records]
