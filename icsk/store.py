"""Run folders: append-only parquet chunks (the source of truth) and small JSON sidecars.

Layout of a run folder::

    run.json                      status, arms, per-arm state (written atomically)
    config.yaml                   resolved config (training jobs)
    stats/                        a single Recorder's statistics ...
    arms/<arm>/stats/             ... or one folder per arm of a paired run
        recorder.json             layers, units, statistic names, histogram edges
        chunk-000000.parquet      rows (step, mode, layer, stat, values: float32 bytes)
    metrics/chunk-*.parquet       long table: step, arm, metric, layer, value

A row's ``values`` are one layer's per-unit results of one statistic at one step, stored as the
little-endian float32 bytes of the array (``np.frombuffer(v, "<f4")``): about 4x cheaper to
write than a parquet list column, which matters because chunks are written while training runs.
Folders written with the older ``list<float32>`` column read the same.

Every chunk is written to a temporary file and renamed, so a killed process leaves whole
chunks only; ``load_run`` reads finished and interrupted folders alike. Chunks are synced to
the disk at checkpoints and at the end of a run (:meth:`ChunkWriter.sync`), not one by one while
training waits.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import socket
import threading
import warnings
from concurrent.futures import Future
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: writers are not locked out
    fcntl = None

from .background import background_pool, wait_for

CHUNK_GLOB = "chunk-*.parquet"
_CHUNK_RE = re.compile(r"chunk-(\d+)\.parquet$")
STATS_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("mode", pa.string()),
        ("layer", pa.string()),
        ("stat", pa.string()),
        ("values", pa.large_binary()),  # float32 little-endian bytes
    ]
)
METRICS_COLUMNS = {"step": "int64", "arm": "object", "metric": "object", "layer": "object", "value": "float64"}
LONG_COLUMNS = {"step": "int64", "layer": "category", "stat": "category", "unit": "int64", "value": "float32"}
LAYER_STATS = frozenset({"count"})  # statistics of a whole layer: unit = -1


class RunFolderError(RuntimeError):
    """A run folder is missing, empty, or has a corrupt file; the message names the file."""


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON via a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def fsync_files(paths: Iterable[str | os.PathLike], folders: Iterable[str | os.PathLike] = ()) -> None:
    """Put files on the disk itself (``fsync``), then the folders holding their names; files or
    folders deleted meanwhile are skipped."""
    for path in [*paths, *folders]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON sidecar, naming the file when it is corrupt."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise RunFolderError(f"{path}: not valid JSON ({e}); the file is corrupt") from None


class FolderBusyError(RuntimeError):
    """A folder another live writer holds: the message names it and the fix."""


class FolderLease:
    """An exclusive claim on a folder by one writer: an advisory lock (``flock``) on its
    ``.writer`` file, which also names the holder (host, pid). The kernel drops the lock when
    the holder's process dies, so a killed writer's claim needs no cleaning up. On file systems
    without locks (and without ``fcntl``) the claim is not enforced."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / ".writer"
        self._fd: int | None = None
        self._pid = os.getpid()  # the holder: a forked child shares the lock but must not give it up

    def acquire(self) -> None:
        """Claim the folder (idempotent); FolderBusyError when a live writer holds it."""
        if self._fd is not None or fcntl is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise FolderBusyError(
                    f"{self.path.parent} is being written by another writer ({holder}); two writers on one "
                    "folder would mix their rows: wait for it to finish, or pass another path") from None
            except OSError as e:  # no locks on this file system
                os.close(fd)
                warnings.warn(f"icsk: cannot lock {self.path} ({e}); a second writer on this folder is not refused",
                              stacklevel=3)
                return
            try:  # its last holder may have removed the file between our open and our lock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
                self._fd, self._pid = fd, os.getpid()
                return
            os.close(fd)
        raise FolderBusyError(f"could not claim {self.path.parent}: {self.path} keeps being replaced")

    def release(self) -> None:
        """Give the claim up (idempotent): the file goes first, then the lock. In a forked child,
        which shares the holder's lock, only the child's descriptor is closed."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if os.getpid() != self._pid:
            os.close(fd)
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class ChunkWriter:
    """Appends parquet chunks to a folder, atomically; continues numbering after existing ones.

    A chunk appears under its final name complete (written to a hidden file, then renamed), so a
    crash of the process leaves every chunk whole. Chunks reach the disk itself when the kernel
    writes its cache back (within about 30 s on Linux) or at :meth:`sync`; an operating-system
    crash before then can leave the newest ones unreadable, which the readers name.
    With ``background=True`` each chunk is encoded and written by one worker thread while the
    caller goes on; at most two chunks are held (memory stays flat), :meth:`wait` joins them."""

    def __init__(self, folder: str | os.PathLike, background: bool = False):
        self.folder = Path(folder)
        self._next: int | None = None  # the folder is created and numbered at the first write
        self._pool = background_pool("icsk-writer") if background else None
        self._pending: Future | None = None
        self._unsynced: list[Path] = []  # chunks written since the last sync()
        self.chunks_queued = 0  # handed to the worker so far (a write cut short by a signal may not have got there)

    def write(self, table: pa.Table | Callable[[], pa.Table], before: Callable[[], None] | None = None) -> Path:
        """Write one chunk (or queue it, in background mode); returns its final path.

        ``table`` may be a function that builds the table (run on the writer thread), and
        ``before`` a function run just before writing (e.g. a sidecar the chunk relies on)."""
        if self._next is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            found = {int(m.group(1)): p for p in self.folder.glob(CHUNK_GLOB) if (m := _CHUNK_RE.search(p.name))}
            self._next = max(found, default=-1) + 1
            self._unsynced.extend(found.values())  # an earlier attempt's (killed: maybe never synced)
        path = self.folder / f"chunk-{self._next:06d}.parquet"
        self._next += 1
        if self._pool is None:
            self._write(table, path, before)
            return path
        # queue first, then wait for the chunk before it (one worker: chunks stay in order, at
        # most two are held). A signal arriving during the wait (SIGTERM raises
        # KeyboardInterrupt) then cannot lose this chunk: close() waits for it.
        previous = self._queue(table, path, before)
        if previous is not None:
            wait_for(previous)
        return path

    def _queue(self, table, path: Path, before) -> Future | None:
        previous, self._pending = self._pending, self._pool.submit(self._write, table, path, before)
        self.chunks_queued += 1
        return previous

    def _write(self, table, path: Path, before) -> None:
        _write_chunk(table, path, before)
        self._unsynced.append(path)

    def wait(self) -> None:
        """Block until the chunks in flight are written; re-raises a write error, if any."""
        pending = self._pending
        if pending is None:
            return
        try:
            wait_for(pending)
        finally:
            if pending.done():  # an interrupted wait keeps it, so close() still waits for it
                self._pending = None

    def sync(self, also: Iterable[str | os.PathLike] = ()) -> None:
        """Wait for the chunks in flight, then put every chunk written since the last sync on
        the disk itself, with the files ``also`` (a sidecar written with them), then the folder,
        which holds their names: for the end of a run and for checkpoints, which count chunks."""
        self.wait()
        done, self._unsynced = self._unsynced, []
        if not done:
            return
        try:
            fsync_files([*done, *also], [self.folder])
        except BaseException:
            self._unsynced = done + self._unsynced  # tried again by the next sync
            raise


def _write_chunk(table: pa.Table | Callable[[], pa.Table], path: Path, before: Callable[[], None] | None) -> None:
    if callable(table):
        table = table()
    if before is not None:
        before()
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    strings = [f.name for f in table.schema if pa.types.is_string(f.type)]
    # dictionary-encoding the float lists costs ~4x the write; only the id columns gain from it.
    # The values column (float32 bytes) is written as it is: min/max statistics would serve no
    # filter and cost a fifth of the write, and snappy shrinks it by 2 % for a tenth
    others = [f.name for f in table.schema if f.name != "values"]
    pq.write_table(table, tmp, compression={**dict.fromkeys(others, "snappy"), "values": "none"},
                   use_dictionary=strings, write_statistics=others)
    os.replace(tmp, path)


def values_column(flat: np.ndarray, offsets: np.ndarray) -> pa.Array:
    """The ``values`` column: row i holds ``flat[offsets[i]:offsets[i + 1]]`` as float32 bytes."""
    data = np.ascontiguousarray(flat, dtype="<f4")
    byte_offsets = np.asarray(offsets, dtype=np.int64) * 4
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(byte_offsets) - 1,
                                            [None, pa.py_buffer(byte_offsets), pa.py_buffer(data)])


def flat_values(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(flat float32 values, start of each row in them)``, plus the end: row i is
    ``flat[starts[i]:starts[i + 1]]``; reads the float32-bytes column and the older list column."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = np.asarray(arr.value_lengths().to_numpy(zero_copy_only=False), dtype=np.int64)
        flat = np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
        return flat, np.concatenate([[0], np.cumsum(lengths)])
    arr = arr.cast(pa.large_binary())
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset: arr.offset + n + 1]
    if n == 0:
        return np.zeros(0, np.float32), np.zeros(1, np.int64)
    data = arr.buffers()[2]
    first = int(offsets[0])
    flat = np.frombuffer(data, dtype="<f4", count=(int(offsets[-1]) - first) // 4, offset=first)
    return flat.astype(np.float32, copy=False), (offsets - first) // 4


def chunk_files(folder: str | os.PathLike) -> list[Path]:
    """The whole chunks in a folder, in write order (temporary files are ignored)."""
    return sorted(Path(folder).glob(CHUNK_GLOB))


def _unreadable_chunk(path: Path, error: Exception) -> RunFolderError:
    return RunFolderError(f"{path}: unreadable parquet chunk ({error}); delete it to load the rest")


def last_recorded_step(folder: str | os.PathLike) -> int | None:
    """The largest step in a folder's chunks (from parquet's column statistics), None if none."""
    last = None
    for path in chunk_files(folder):
        try:
            meta = pq.ParquetFile(path).metadata
        except (pa.ArrowInvalid, OSError) as e:
            raise _unreadable_chunk(path, e) from None
        col = meta.schema.names.index("step")
        for i in range(meta.num_row_groups):
            st = meta.row_group(i).column(col).statistics
            top = int(st.max) if st is not None and st.has_min_max else int(pq.read_table(path, columns=["step"])["step"].to_numpy().max())
            last = top if last is None else max(last, top)
    return last


def read_chunks(folder: str | os.PathLike, filters=None, columns: Sequence[str] | None = None) -> pa.Table | None:
    """Concatenate a folder's chunks (None when there are none); a corrupt chunk raises
    RunFolderError naming it."""
    tables = []
    for path in chunk_files(folder):
        try:
            table = pq.read_table(path, filters=filters, columns=columns)
        except (pa.ArrowInvalid, OSError) as e:
            raise _unreadable_chunk(path, e) from None
        if "values" in table.column_names and not pa.types.is_large_binary(table.schema.field("values").type):
            flat, starts = flat_values(table.column("values"))  # an older list chunk: one type to concatenate
            i = table.column_names.index("values")
            table = table.set_column(i, "values", values_column(flat, starts))
        tables.append(table)
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="default")


def stats_filters(
    layers: Iterable[str] | None = None,
    stats: Iterable[str] | None = None,
    steps: Iterable[int] | tuple[int | None, int | None] | None = None,
    mode: str | None = None,
) -> list | None:
    """pyarrow filters: layers, statistics, mode, and steps as a list, a ``range`` or a
    ``(start, stop)`` tuple (either end may be None)."""
    f: list = []
    if layers is not None:
        f.append(("layer", "in", list(layers)))
    if stats is not None:
        f.append(("stat", "in", list(stats)))
    if mode is not None:
        f.append(("mode", "=", mode))
    if steps is not None:
        if isinstance(steps, (tuple, range)) and (isinstance(steps, range) or len(steps) == 2):
            if isinstance(steps, range):
                if steps.step != 1:
                    return f + [("step", "in", list(steps))]
                steps = (steps.start, steps.stop)
            start, stop = steps
            if start is not None:
                f.append(("step", ">=", int(start)))
            if stop is not None:
                f.append(("step", "<", int(stop)))
        else:
            f.append(("step", "in", [int(s) for s in steps]))
    return f or None


def explode_stats(table: pa.Table | None, keep_mode: bool = False) -> pd.DataFrame:
    """Long frame ``step, layer, stat, unit, value`` (+ ``mode``) from stored list rows."""
    if table is None or table.num_rows == 0:
        return _empty_frame({**LONG_COLUMNS, **({"mode": "category"} if keep_mode else {})})
    flat, offsets = flat_values(table.column("values"))
    lengths = np.diff(offsets)
    unit = np.arange(flat.size, dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    stat = table.column("stat").to_numpy(zero_copy_only=False)
    whole_layer = np.isin(stat, list(LAYER_STATS))
    unit = np.where(np.repeat(whole_layer, lengths), -1, unit)
    data = {
        "step": np.repeat(table.column("step").to_numpy(), lengths),
        "layer": pd.Categorical(np.repeat(table.column("layer").to_numpy(zero_copy_only=False), lengths)),
        "stat": pd.Categorical(np.repeat(stat, lengths)),
        "unit": unit,
        "value": flat,
    }
    if keep_mode:
        data["mode"] = pd.Categorical(np.repeat(table.column("mode").to_numpy(zero_copy_only=False), lengths))
    return pd.DataFrame(data)




def _empty_frame(columns: dict[str, str]) -> pd.DataFrame:
    """A frame with no rows but the right columns and dtypes."""
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in columns.items()})


# the ``mode`` of stored rows: the module's training flag, or a forward inside Recorder.probe()
ROW_MODES = ("train", "eval", "probe")


def names_matching(pattern: str, names: Iterable[str]) -> list[str]:
    """``names`` equal to ``pattern``, or matching it as a glob when it has ``*?[``."""
    glob = any(c in pattern for c in "*?[")
    return [n for n in names if n == pattern or (glob and fnmatch.fnmatchcase(n, pattern))]


def hist_edges_of(layer_info: dict, mode: str) -> list[float] | None:
    """A layer's histogram edges for ``mode`` from recorder.json: per mode since modes got
    ranges of their own; folders written before hold one range for the layer (None: no
    histograms)."""
    return (layer_info.get("hist_edges_by_mode") or {}).get(mode, layer_info.get("hist_edges"))


def resolve_selection(metas: Sequence[dict], layers=None, stats=None, steps=None, mode: str | None = "train",
                      strict: bool = True) -> tuple[list[str] | None, list[str] | None, Any]:
    """``(layers, stats, steps)`` as the readers filter on, checked against what was recorded
    (``metas``: recorder.json contents; empty ones check nothing).

    A single name or step may stand for a list; layer globs (``"block*"``) expand to the
    recorded layers; ``"quantiles"`` expands to the recorded ``q...`` statistics. A name that
    matches nothing recorded raises ValueError listing what was (``strict=False`` drops it)."""
    if mode is not None and mode not in ROW_MODES:
        raise ValueError(f"mode must be 'train', 'eval', 'probe' or None (all), got {mode!r}")
    if isinstance(steps, (int, np.integer)):
        steps = [int(steps)]
    known_layers = list(dict.fromkeys(name for m in metas for name in (m.get("layers") or {})))
    known_stats = list(dict.fromkeys([*(o for m in metas for o in (m.get("outputs") or []) if o != "hist"),
                                      *LAYER_STATS]))  # (histograms are read apart)
    if stats is not None:
        stats = [stats] if isinstance(stats, str) else list(stats)
        if "hist" in stats:
            raise ValueError("histograms are not part of the statistics frame; read them with "
                             "Recorder.histograms() or load_run(path, 'hist')")

    recorded = any(metas)  # no recorder.json yet: nothing to check against

    def expand(kind: str, names: list[str], known: list[str], match: Callable[[str], list[str]]) -> list[str]:
        out: list[str] = []
        for name in names:
            hits = match(name) if recorded else [name]
            if not hits and strict:
                raise ValueError(f"{kind} {name!r} was not recorded here; recorded {kind}s: {known}")
            out.extend(hits)
        return list(dict.fromkeys(out))

    if layers is not None:
        layers = expand("layer", [layers] if isinstance(layers, str) else list(layers), known_layers,
                        lambda n: names_matching(n, known_layers))
    if stats is not None:
        quantiles = [k for k in known_stats if k.startswith("q") and k[1:2].isdigit()]
        stats = expand("statistic", stats, known_stats,
                       lambda n: quantiles if n == "quantiles" else [n] if n in known_stats else [])
    return layers, stats, steps


def _selects_nothing(*filters) -> bool:
    """Whether a filter is an empty list (pyarrow rejects ``in []``; no row matches it anyway)."""
    return any(isinstance(f, (list, tuple, set)) and len(f) == 0 for f in filters)


def read_stats(
    stats_dir: str | os.PathLike,
    layers=None,
    stats=None,
    steps=None,
    mode: str | None = "train",
    strict: bool = True,
) -> pd.DataFrame:
    """The long-format frame of one Recorder's stats folder (histograms excluded); the
    filters are those of :func:`resolve_selection`."""
    layers, want, steps = resolve_selection([read_recorder_meta(stats_dir)], layers, stats, steps, mode, strict)
    table = None if _selects_nothing(layers, want, steps) else read_chunks(stats_dir, filters=stats_filters(layers, want, steps, mode))
    if table is not None and want is None:
        table = table.filter(pa.compute.not_equal(table.column("stat"), "hist"))
    return explode_stats(table, keep_mode=mode is None)


def read_recorder_meta(stats_dir: str | os.PathLike) -> dict:
    """The recorder.json of a stats folder ({} when it has none yet)."""
    p = Path(stats_dir) / "recorder.json"
    return read_json(p) if p.exists() else {}


def check_hist_recorded(metas: Sequence[dict]) -> None:
    """Raise ValueError when recorder.json files say histograms were not recorded (none there
    yet checks nothing)."""
    recorded = [m["stats"] for m in metas if m.get("stats")]
    if recorded and not any("hist" in stats for stats in recorded):
        raise ValueError(f"histograms were not recorded here (stats: {recorded[0]}); record them with "
                         "Recorder(..., stats=[..., 'hist']) or recorder.stats=[...,hist] in the training job")


def read_histograms(stats_dir: str | os.PathLike, layers=None, steps=None, mode: str | None = "train",
                    strict: bool = True) -> pd.DataFrame:
    """Histograms as ``step, layer, unit, bin, left, right, count`` (plus ``mode`` when
    ``mode`` is None); bin 0 is the underflow bin (left = -inf) and bin B+1 the overflow bin
    (right = +inf). The edges are nominal: values were binned in float32, so one within
    float32 rounding of an edge may be counted in the neighbouring bin."""
    meta = read_recorder_meta(stats_dir)
    if strict:
        check_hist_recorded([meta])
    layers, _, steps = resolve_selection([meta], layers, None, steps, mode, strict)
    table = None if _selects_nothing(layers, None, steps) else read_chunks(stats_dir, filters=stats_filters(layers, ["hist"], steps, mode))
    cols = ["step", "layer", "unit", "bin", "left", "right", "count"] + (["mode"] if mode is None else [])
    if table is None or table.num_rows == 0:
        return pd.DataFrame(columns=cols)
    frames = []
    flat, offsets = flat_values(table.column("values"))
    layer_of = table.column("layer").to_numpy(zero_copy_only=False)
    mode_of = table.column("mode").to_numpy(zero_copy_only=False)
    step_of = table.column("step").to_numpy()
    for layer, row_mode in dict.fromkeys(zip(layer_of, mode_of)):  # in order of appearance
        rows = np.flatnonzero((layer_of == layer) & (mode_of == row_mode))
        # each mode has its own range ("auto" sets it from that mode's first batch)
        edges = np.asarray(hist_edges_of(meta["layers"][layer], row_mode), dtype=np.float64)
        nb = edges.size + 1
        width = int(offsets[rows[0] + 1] - offsets[rows[0]])  # units x bins, the same in every row
        counts = flat[offsets[rows][:, None] + np.arange(width)].reshape(len(rows), -1, nb)
        k, c, _ = counts.shape
        left = np.concatenate([[-np.inf], edges])
        right = np.concatenate([edges, [np.inf]])
        frames.append(
            pd.DataFrame(
                {
                    "step": np.repeat(step_of[rows], c * nb),
                    "layer": layer,
                    "unit": np.tile(np.repeat(np.arange(c), nb), k),
                    "bin": np.tile(np.arange(nb), k * c),
                    "left": np.tile(left, k * c),
                    "right": np.tile(right, k * c),
                    "count": counts.reshape(-1),
                    "mode": row_mode,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)[cols]


def arms_of(run_dir: str | os.PathLike) -> list[str]:
    """Arm names of a paired run folder (empty for a single-recorder folder)."""
    d = Path(run_dir) / "arms"
    return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []


def _check_run_dir(run_dir: Path) -> None:
    if not run_dir.exists():
        raise RunFolderError(f"{run_dir}: no such run folder")
    if not ((run_dir / "stats").is_dir() or (run_dir / "arms").is_dir() or (run_dir / "metrics").is_dir()):
        raise RunFolderError(
            f"{run_dir}: not an icsk run folder (expected 'stats/', 'arms/' or 'metrics/' inside); "
            "pass the folder a training job or Recorder(path=...) wrote"
        )


def load_run(
    path: str | os.PathLike,
    table: str = "stats",
    *,
    layers=None,
    stats=None,
    steps=None,
    mode: str | None = "train",
    strict: bool = True,
) -> pd.DataFrame:
    """Read a finished or interrupted run folder back as a long frame.

    ``table="stats"``: the Recorder contract ``step, layer, stat, unit, value`` (plus ``arm``
    for a paired run); ``table="metrics"``: training metrics ``step, arm, metric, layer, value``;
    ``table="hist"``: histograms (see :func:`read_histograms`). ``layers``, ``stats``, ``steps``
    and ``mode`` filter as in :func:`resolve_selection`: a name recorded in no arm raises
    ValueError (``strict=False``: it is ignored)."""
    run_dir = Path(path)
    _check_run_dir(run_dir)
    if table == "metrics":
        return read_metrics(run_dir)
    if table not in ("stats", "hist"):
        raise ValueError(f"table must be 'stats', 'metrics' or 'hist', got {table!r}")
    arms = arms_of(run_dir)
    if not arms:
        if table == "hist":
            return read_histograms(run_dir / "stats", layers, steps, mode, strict)
        return read_stats(run_dir / "stats", layers, stats, steps, mode, strict)
    dirs = [run_dir / "arms" / arm / "stats" for arm in arms]
    metas = [read_recorder_meta(d) for d in dirs]
    if table == "hist" and strict:
        check_hist_recorded(metas)
    # checked against every arm at once: a layer recorded in one arm only is no error
    layers, stats, steps = resolve_selection(metas, layers, None if table == "hist" else stats, steps, mode, strict)
    frames = []
    for arm, sd in zip(arms, dirs, strict=True):
        df = (read_histograms(sd, layers, steps, mode, strict=False) if table == "hist"
              else read_stats(sd, layers, stats, steps, mode, strict=False))
        df.insert(0, "arm", arm)
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    for c in ("arm", "layer", "stat"):
        if c in out:
            out[c] = out[c].astype("category")
    return out


class MetricsWriter:
    """Buffers training metrics (long rows) and appends them to ``metrics/`` in chunks."""

    def __init__(self, run_dir: str | os.PathLike, flush_rows: int = 20_000):
        self._writer = ChunkWriter(Path(run_dir) / "metrics")
        self._rows: list[tuple] = []
        self.flush_rows = flush_rows

    def log(self, step: int, arm: str, metrics: dict[str, float], layer: str = "") -> None:
        """Record scalar metrics of one arm at one step (``layer`` for per-layer metrics)."""
        for k, v in metrics.items():
            self._rows.append((int(step), arm, k, layer, float(v)))
        if len(self._rows) >= self.flush_rows:
            self.flush()

    def flush(self, sync: bool = False) -> None:
        """Write buffered rows as one chunk; ``sync`` then puts every chunk on the disk itself."""
        self._write_rows()
        if sync:
            self._writer.sync()

    def _write_rows(self) -> None:
        if not self._rows:
            return
        step, arm, metric, layer, value = zip(*self._rows, strict=True)
        self._writer.write(
            pa.table(
                {
                    "step": pa.array(step, pa.int64()),
                    "arm": pa.array(arm, pa.string()),
                    "metric": pa.array(metric, pa.string()),
                    "layer": pa.array(layer, pa.string()),
                    "value": pa.array(value, pa.float64()),
                }
            )
        )
        self._rows = []


def read_metrics(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Training metrics of a run folder: ``step, arm, metric, layer, value``."""
    table = read_chunks(Path(run_dir) / "metrics")
    if table is None:
        return _empty_frame(METRICS_COLUMNS)
    return table.to_pandas()
