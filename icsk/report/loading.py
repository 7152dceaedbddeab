"""Collect runs (run folders, Hydra sweep folders, wandb projects) and read their tables with config columns.

A *run folder* holds ``run.json`` or ``arms/`` (or a Recorder's ``stats/``); a *sweep folder*
holds run folders one or two levels down (Hydra multirun: ``0/ 1/ ...``). An input
``wandb:ENTITY/PROJECT`` reads runs through the wandb API (:mod:`.wandb_source`; metrics only).
Tables of several runs are concatenated with a ``run`` column plus config columns (``seed`` and
every config key that varies across runs, e.g. ``optim.lr``), so seeds can be aggregated and
sweeps plotted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..config import flatten
from ..store import ROW_MODES, RunFolderError, arms_of, load_run, read_json, read_recorder_meta
from .style import order_arms

if TYPE_CHECKING:
    from .wandb_source import WandbQuery

# Config keys never treated as swept parameters (bookkeeping, or the arm itself): a resumed run,
# one that downloaded its data or checkpointed more often is the same experiment as its siblings.
_NOT_SWEPT = re.compile(r"^(name|seed|resume|model\.arms|model\.norm|(hydra|logger|wandb)(\..*)?|"
                        r"(.*\.)?(\w*_dir|dir|\w*_path|path|root|\w*_file|project|entity|tags|notes|device|"
                        r"\w*workers|log_every|progress|\w*download|checkpoint_every|eval_batch_size))$")
_MAX_DEPTH = 3


class NoRunsError(FileNotFoundError):
    """A path holds no run folder; the message names the folder."""


def natural_key(s: str) -> list:
    """Sort key that orders ``block2`` before ``block10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(s))]


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a run folder (``run.json``, ``arms/`` or a Recorder ``stats/``)."""
    return (path / "run.json").is_file() or (path / "arms").is_dir() or (path / "stats" / "recorder.json").is_file()


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved config as a flat dict of dotted keys ({} when there is none)."""
    for p in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if p.is_file():
            from omegaconf import OmegaConf

            cfg = OmegaConf.load(p)
            try:
                c = OmegaConf.to_container(cfg, resolve=True)
            except Exception:  # e.g. ${hydra:...} outside a Hydra app
                c = OmegaConf.to_container(cfg, resolve=False)
            return flatten(c)
    return {}


@dataclass
class Run:
    """One run folder: its config, status, and lazily read tables (``path`` is None for a run
    not read from a folder, see :class:`.wandb_source.WandbRun`)."""

    path: Path | None
    run_id: str
    config: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, run_id: str | None = None) -> Run:
        """Read a run folder's config and run.json."""
        path = Path(path)
        info = read_json(path / "run.json") if (path / "run.json").is_file() else {}
        return cls(path=path, run_id=run_id or path.name, config=read_config(path), info=info)

    @property
    def name(self) -> str | None:
        """Experiment name from the config."""
        n = self.config.get("name")
        return str(n) if n not in (None, "") else None

    @property
    def seed(self) -> Any:
        """The run's seed (None if unknown)."""
        return self.config.get("seed")

    @cached_property
    def arm_dirs(self) -> list[str]:
        """Arms with a stats folder (``arms/<arm>/``)."""
        return arms_of(self.path)

    @property
    def default_arm(self) -> str:
        """Arm name for a single-recorder folder (first configured arm, else ``run``)."""
        arms = self.config.get("model.arms")
        if isinstance(arms, tuple) and arms:
            return str(arms[0])
        return str(self.config.get("model.norm") or "run")

    @cached_property
    def arms(self) -> list[str]:
        """Every arm the run knows about (run.json, stats folders, metrics), canonical order."""
        names = set(self.arm_dirs) | set((self.info.get("arms") or {}).keys())
        m = self.metrics
        if len(m):
            names |= set(m["arm"].astype(str).unique())
        if not names:
            names = set(self.recorder_arms())
        return order_arms(names)

    def recorder_arms(self) -> list[str]:
        """Arms with Recorder statistics (a single-recorder folder: the default arm)."""
        return self.arm_dirs or ([self.default_arm] if (self.path / "stats").is_dir() else [])

    def stats_dir(self, arm: str) -> Path:
        """Stats folder of an arm."""
        return self.path / "arms" / arm / "stats" if self.arm_dirs else self.path / "stats"

    def recorder_meta(self, arm: str) -> dict:
        """recorder.json of an arm's stats folder ({} when missing)."""
        d = self.stats_dir(arm)
        return read_recorder_meta(d) if d.is_dir() else {}

    @cached_property
    def metrics(self) -> pd.DataFrame:
        """Training metrics ``step, arm, metric, layer, value`` (empty frame when none)."""
        df = self._load_metrics()
        df["arm"] = df["arm"].astype(str)
        df["layer"] = df["layer"].fillna("").astype(str)
        return df

    def _load_metrics(self) -> pd.DataFrame:
        if not (self.path / "metrics").is_dir():
            return pd.DataFrame(columns=["step", "arm", "metric", "layer", "value"])
        return load_run(self.path, table="metrics")

    def _table(self, table: str, **kw) -> pd.DataFrame:
        try:
            df = load_run(self.path, table=table, strict=False, **kw)  # runs of a sweep may record different layers
        except RunFolderError:
            return pd.DataFrame()
        if "arm" not in df.columns:
            df.insert(0, "arm", self.default_arm)
        for c in ("arm", "layer", "stat"):
            if c in df.columns:
                df[c] = df[c].astype(str)
        return df

    def stats(self, layers: Sequence[str] | None = None, stats: Sequence[str] | None = None,
              mode: str = "train") -> pd.DataFrame:
        """Recorder statistics ``arm, step, layer, stat, unit, value`` of ``mode``'s forwards."""
        return self._table("stats", layers=layers, stats=stats, mode=mode)

    def hist(self, layers: Sequence[str] | None = None, mode: str = "train") -> pd.DataFrame:
        """Histograms ``arm, step, layer, unit, bin, left, right, count`` of ``mode``'s forwards."""
        return self._table("hist", layers=layers, mode=mode)

    def arm_state(self, arm: str) -> dict[str, Any]:
        """Status of an arm: ``status``, ``diverged_step``, ``last_step`` (from run.json, else from
        the ``diverged`` metric and the last step with a training loss)."""
        st = dict((self.info.get("arms") or {}).get(arm) or {})
        st.setdefault("status", self.info.get("status", "unknown"))
        st.setdefault("diverged_step", None)
        m = self.metrics
        if st.get("diverged_step") is None and len(m):
            d = m[(m["arm"] == arm) & (m["metric"] == "diverged") & (m["value"] > 0)]
            if len(d):
                st["diverged_step"] = int(d["step"].min())
                st["status"] = "diverged"
        if st.get("diverged_step") is not None:
            st["status"] = "diverged"
        if st.get("last_step") is None and len(m):
            mine = m[m["arm"] == arm]
            s = mine.loc[mine["metric"] == "loss", "step"]  # the training loss is logged at trained steps
            s = s if len(s) else mine["step"]
            st["last_step"] = int(s.max()) if len(s) else None
        return st


def _sort_key(p: Path) -> list:
    return natural_key(p.as_posix())


def _scan(path: Path, depth: int) -> list[Path]:
    if is_run_dir(path):
        return [path]
    if depth == 0:
        return []
    found: list[Path] = []
    for sub in sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_sort_key):
        found.extend(_scan(sub, depth - 1))
    return found


def find_run_dirs(path: str | Path) -> list[Path]:
    """Run folders at ``path``: the folder itself, or run folders up to three levels below it.

    Raises NoRunsError naming the folder when there are none."""
    path = Path(path)
    if not path.exists():
        raise NoRunsError(f"{path}: no such file or folder")
    if not path.is_dir():
        raise NoRunsError(f"{path}: not a folder; pass a run folder or a sweep folder")
    found = _scan(path, _MAX_DEPTH)
    if not found:
        raise NoRunsError(
            f"{path}: no run folders found (a run folder has run.json or arms/; a sweep folder has "
            "numbered run folders 0/ 1/ ... inside)"
        )
    return found


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return "[" + ",".join(map(str, v)) + "]"
    return str(v)


def _follows(values: Sequence[str], by: Sequence[str]) -> bool:
    """Whether ``values`` (one per run) are a function of ``by``: runs that agree on ``by`` agree on it."""
    return len(set(zip(by, values, strict=True))) == len(set(by))


class RunSet:
    """Several runs read together; tables carry ``run``, ``seed`` and the swept config keys."""

    def __init__(self, runs: Iterable[Run], label: str = "", arms: Sequence[str] | None = None, mode: str = "train"):
        """``mode``: which Recorder rows the statistics tables read: 'train' (training batches),
        'probe' (the fixed probe batch, ``recorder.probe_schedule``) or 'eval'."""
        self.runs: list[Run] = list(runs)
        self.label = label
        self.arm_filter: list[str] | None = list(arms) if arms is not None else None
        self.mode = mode

    def _subset(self, runs: Iterable[Run], label: str | None = None, arms: Sequence[str] | None = ()) -> RunSet:
        """Another RunSet with this one's label, arm filter and mode unless given."""
        return RunSet(runs, self.label if label is None else label, self.arm_filter if arms == () else arms, self.mode)

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self) -> Iterator[Run]:
        return iter(self.runs)

    def __repr__(self) -> str:
        return f"RunSet({len(self.runs)} runs{', ' + self.label if self.label else ''})"

    # ------------------------------------------------------------------ configs
    @cached_property
    def arms(self) -> list[str]:
        """Union of the runs' arms (within the arm filter), canonical order."""
        arms = {a for r in self.runs for a in r.arms}
        return order_arms(arms if self.arm_filter is None else arms & set(self.arm_filter))

    def varying_keys(self, include_seed: bool = False) -> list[str]:
        """Config keys whose value differs across runs (bookkeeping keys excluded)."""
        keys = sorted({k for r in self.runs for k in r.config}, key=natural_key)
        out = []
        for k in keys:
            if k == "seed":
                if include_seed:
                    vals = {_fmt(r.config.get(k)) for r in self.runs}
                    if len(vals) > 1:
                        out.append(k)
                continue
            if _NOT_SWEPT.match(k):
                continue
            vals = {_fmt(r.config.get(k)) for r in self.runs}
            if len(vals) > 1:
                out.append(k)
        return out

    def swept_keys(self) -> list[str]:
        """The varying keys that vary on their own: a key whose value follows from a kept key's in
        every run is left out (``-m model=mlp,cnn`` changes model.depth, model.width and
        model.variant along with model.name, which alone is kept). Kept first: group names
        (``name``, ``*.name``), then keys with more distinct values, then in order."""
        keys = self.varying_keys()
        vals = {k: [_fmt(r.config.get(k)) for r in self.runs] for k in keys}
        kept: list[str] = []
        for k in sorted(keys, key=lambda k: (k.split(".")[-1] != "name", -len(set(vals[k])))):
            if not any(_follows(vals[k], vals[j]) for j in kept):
                kept.append(k)
        return [k for k in keys if k in kept]

    def config_frame(self) -> pd.DataFrame:
        """One row per run: ``run``, ``seed`` and the varying config keys."""
        keys = self.varying_keys()
        rows = []
        for r in self.runs:
            row = {"run": r.run_id, "seed": r.seed if r.seed is not None else r.run_id}
            row.update({k: r.config.get(k) for k in keys})
            rows.append(row)
        return pd.DataFrame(rows, columns=["run", "seed", *keys])

    def groups(self) -> list[RunSet]:
        """Runs split by the varying config keys other than the seed (one group per setting,
        labelled by its :meth:`swept_keys`); a single group when only seeds differ."""
        keys = self.swept_keys()
        if not keys:
            return [self._subset(self.runs)]
        buckets: dict[tuple, list[Run]] = {}
        for r in self.runs:
            buckets.setdefault(tuple(_fmt(r.config.get(k)) for k in keys), []).append(r)

        def order(item):
            vals = []
            for v in item[0]:
                try:
                    vals.append((0, float(v), ""))
                except ValueError:
                    vals.append((1, math.nan, v))
            return vals

        out = []
        for vals, runs in sorted(buckets.items(), key=order):
            label = ",".join(f"{k}={v}" for k, v in zip(keys, vals, strict=True))
            out.append(self._subset(runs, label))
        return out

    def where(self, conditions: dict[str, str]) -> RunSet:
        """Runs whose config matches every ``key=value`` (values compared as text or numbers)."""

        def match(r: Run, k: str, v: str) -> bool:
            have = r.config.get(k)
            if have is None:
                return False
            if _fmt(have) == v or str(have) == v:
                return True
            try:
                return math.isclose(float(have), float(v), rel_tol=1e-9)
            except (TypeError, ValueError):
                return False

        keep = [r for r in self.runs if all(match(r, k, v) for k, v in conditions.items())]
        return self._subset(keep)

    def in_mode(self, mode: str) -> RunSet:
        """Same runs, statistics read from ``mode``'s Recorder rows ('train', 'probe' or 'eval')."""
        if mode not in ROW_MODES:
            raise ValueError(f"mode must be 'train', 'probe' or 'eval', got {mode!r}")
        return RunSet(self.runs, self.label, self.arm_filter, mode)

    def only_arms(self, arms: Sequence[str]) -> RunSet:
        """Same runs, every table restricted to ``arms``."""
        return self._subset(self.runs, arms=arms)

    @property
    def name(self) -> str | None:
        """Experiment name of the first run that has one."""
        return next((r.name for r in self.runs if r.name), None)

    # ------------------------------------------------------------------ tables
    def attach(self, frames: list[tuple[Run, pd.DataFrame]]) -> pd.DataFrame:
        """Concatenate per-run frames, adding ``run``, ``seed`` and the swept config keys (arm filter applied)."""
        keys = self.varying_keys()
        out = []
        for r, df in frames:
            if df is None or df.empty:
                continue
            df = df.copy()
            if self.arm_filter is not None:
                df = df[df["arm"].isin(self.arm_filter)]
            df["run"] = r.run_id
            df["seed"] = r.seed if r.seed is not None else r.run_id
            for k in keys:
                df[k] = r.config.get(k)
            out.append(df)
        if not out:
            return pd.DataFrame()
        return pd.concat(out, ignore_index=True)

    def metrics(self, names: Sequence[str] | None = None) -> pd.DataFrame:
        """Training metrics of every run (``names`` filters the metric column)."""
        frames = []
        for r in self.runs:
            m = r.metrics
            if names is not None and len(m):
                m = m[m["metric"].isin(list(names))]
            frames.append((r, m))
        return self.attach(frames)

    def has_metric(self, name: str) -> bool:
        """Whether any run logged metric ``name``."""
        return any(len(r.metrics) and (r.metrics["metric"] == name).any() for r in self.runs)

    def stats(self, layers: Sequence[str] | None = None, stats: Sequence[str] | None = None) -> pd.DataFrame:
        """Recorder statistics of every run."""
        return self.attach([(r, r.stats(layers, stats, self.mode)) for r in self.runs])

    def hist(self, layers: Sequence[str] | None = None) -> pd.DataFrame:
        """Histograms of every run."""
        return self.attach([(r, r.hist(layers, self.mode)) for r in self.runs])

    def recorded(self) -> dict[str, set[str]]:
        """Layer -> statistic names recorded in any run/arm (from recorder.json; cheap)."""
        out: dict[str, set[str]] = {}
        for r in self.runs:
            for a in r.recorder_arms():
                meta = r.recorder_meta(a)
                outputs = set(meta.get("outputs") or [])
                for layer, info in (meta.get("layers") or {}).items():
                    s = out.setdefault(layer, set())
                    s |= outputs
                    if "hist_edges" in info:
                        s.add("hist")
        return out

    def layers_with(self, *stats: str) -> list[str]:
        """Recorded layers having all of ``stats``, naturally sorted."""
        rec = self.recorded()
        return sorted((layer for layer, s in rec.items() if set(stats) <= s), key=natural_key)

    def divergence(self) -> pd.DataFrame:
        """One row per (run, arm): ``run, seed, arm, status, diverged_step, last_step`` + swept keys."""
        keys = self.varying_keys()
        rows = []
        for r in self.runs:
            for a in r.arms:
                if self.arm_filter is not None and a not in self.arm_filter:
                    continue
                st = r.arm_state(a)
                row = {"run": r.run_id, "seed": r.seed if r.seed is not None else r.run_id, "arm": a,
                       "status": st.get("status"), "diverged_step": st.get("diverged_step"),
                       "last_step": st.get("last_step")}
                row.update({k: r.config.get(k) for k in keys})
                rows.append(row)
        return pd.DataFrame(rows, columns=["run", "seed", "arm", "status", "diverged_step", "last_step", *keys])


def collect_runs(paths: Iterable[str | Path], wandb_query: WandbQuery | None = None) -> RunSet:
    """Every run under ``paths`` (run folders, sweep folders, ``wandb:ENTITY/PROJECT[/RUN_ID]``), as a RunSet.

    Folder run ids are paths relative to the common parent, so ``sweep/0`` and ``sweep/1`` stay
    apart; wandb run ids are ``PROJECT/RUN_ID``, and ``wandb_query`` selects a project's runs.
    Raises NoRunsError naming the first path without runs, and WandbSourceError when wandb
    cannot be read."""
    from .wandb_source import fetch_runs, is_wandb_path  # imports wandb only when asked to

    dirs: list[Path] = []
    remote: dict[str, Run] = {}
    for p in paths:
        if is_wandb_path(p):
            for r in fetch_runs(str(p), wandb_query):
                remote.setdefault(r.info["wandb_path"], r)
        else:
            dirs.extend(find_run_dirs(Path(p)))
    uniq = list(dict.fromkeys(d.resolve() for d in dirs))
    ids = _short_ids(uniq)
    return RunSet([*(Run.open(d, i) for d, i in zip(uniq, ids, strict=True)), *remote.values()])


def _short_ids(dirs: list[Path]) -> list[str]:
    """Shortest distinct trailing path parts: ``0``, ``1`` or ``sweepA/0``, ``sweepB/0``."""
    for n in range(1, 8):
        ids = ["/".join(d.parts[-n:]) for d in dirs]
        if len(set(ids)) == len(ids):
            return ids
    return [d.as_posix() for d in dirs]
