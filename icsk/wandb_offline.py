"""Read an offline wandb run back from its ``run-<id>.wandb`` file (no network, no wandb API).

wandb writes offline runs as a transaction log: a 7-byte header (``:W&B``, magic 0xBEE1, version
0), then the LevelDB log format in 32 KiB blocks (the header counts in the first block). Each
physical record has a 7-byte header ``crc32 u32 | length u16 | type u8`` (full=1, first=2,
middle=3, last=4; a record never straddles a block, a block tail shorter than 7 bytes is zero
padding); the crc is zlib's crc32 of the payload seeded with the crc of the type byte. A
payload is a serialized ``wandb.proto.wandb_internal_pb2.Record``.

    run = read_offline_run("runs/demo/.../wandb")      # a wandb dir, run folder or .wandb file
    run["history"]    # DataFrame, one row per wandb history row (icsk: per training step)
    run["history_rows"]  # the same rows as dicts holding only the keys logged in each
    run["config"], run["summary"], run["run_id"]

Use it in tests and to check what a sweep will upload before ``wandb sync``.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HEADER_LEN = 7
BLOCK_LEN = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
IDENT = b":W&B"
MAGIC = 0xBEE1
_TYPE_CRC = {t: zlib.crc32(bytes([t])) & 0xFFFFFFFF for t in (FULL, FIRST, MIDDLE, LAST)}


class WandbFileError(ValueError):
    """Not a wandb transaction log, or a corrupt one."""


def find_run_files(path: str | Path) -> list[Path]:
    """The ``run-*.wandb`` files under ``path`` (a .wandb file, an ``offline-run-*`` folder, a
    ``wandb/`` folder or a run folder holding one), oldest first."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.exists():
        raise FileNotFoundError(p)
    files = sorted(p.glob("run-*.wandb")) or sorted(p.glob("*run-*/run-*.wandb")) \
        or sorted(p.glob("wandb/*run-*/run-*.wandb"))
    # folders are [offline-]run-<time>-<id>: by time, whether the attempt ran offline or online
    return sorted(files, key=lambda f: (f.parent.name.removeprefix("offline-"), f.name))


def iter_records(path: str | Path, *, strict: bool = False) -> Iterator[bytes]:
    """Payloads (serialized Records) of a ``.wandb`` file in order.

    A truncated or corrupt tail (a job killed mid-write) ends the iteration quietly unless ``strict``."""
    data = Path(path).read_bytes()
    if len(data) < HEADER_LEN:
        raise WandbFileError(f"{path}: too short for a wandb header")
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER_LEN])
    if ident != IDENT or magic != MAGIC:
        raise WandbFileError(f"{path}: not a wandb run file (header {data[:HEADER_LEN]!r})")
    if version != 0:
        raise WandbFileError(f"{path}: unsupported wandb log version {version}")
    pos, n = HEADER_LEN, len(data)
    parts: list[bytes] | None = None

    def bad(msg: str) -> None:
        if strict:
            raise WandbFileError(f"{path}: {msg} at byte {pos}")

    while pos < n:
        left = BLOCK_LEN - pos % BLOCK_LEN
        if left < HEADER_LEN:  # block trailer: zero padding
            pos += left
            continue
        if pos + HEADER_LEN > n:
            bad("truncated record header")
            return
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if crc == 0 and length == 0 and kind == 0:  # preallocated / zero tail
            pos += left
            continue
        start, end = pos + HEADER_LEN, pos + HEADER_LEN + length
        if end > n or kind not in _TYPE_CRC:
            bad("truncated or invalid record")
            return
        payload = data[start:end]
        if zlib.crc32(payload, _TYPE_CRC[kind]) & 0xFFFFFFFF != crc:
            bad("checksum mismatch")
            return
        pos = end
        if kind == FULL:
            parts = None
            yield payload
        elif kind == FIRST:
            parts = [payload]
        elif kind == MIDDLE and parts is not None:
            parts.append(payload)
        elif kind == LAST and parts is not None:
            parts.append(payload)
            yield b"".join(parts)
            parts = None
        else:
            bad("fragment without a first part")
            parts = None


def _loads(s: str) -> Any:
    try:
        return json.loads(s)
    except (TypeError, ValueError):
        return s


def _item_value(item) -> Any:
    """A history/summary/config item's value: ``value_json``, or the typed ``value`` oneof that
    newer wandb versions may use in history items."""
    if item.value_json:
        return _loads(item.value_json)
    which = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if which in ("boolean", "integer", "number", "text"):
        return getattr(item, which)
    if which == "json":
        return _loads(item.json)
    return None


def _set_nested(d: dict[str, Any], keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        nxt = d.get(k)
        if not isinstance(nxt, dict):
            nxt = d[k] = {}
        d = nxt
    d[keys[-1]] = value


def _del_nested(d: dict[str, Any], keys: list[str]) -> None:
    for k in keys[:-1]:
        d = d.get(k)
        if not isinstance(d, dict):
            return
    d.pop(keys[-1], None)


def _apply(target: dict[str, Any], record) -> None:
    for item in record.update:
        keys = [item.key] if item.key else list(item.nested_key)
        if keys:
            _set_nested(target, keys, _item_value(item))
    for item in record.remove:
        keys = [item.key] if item.key else list(item.nested_key)
        if keys:
            _del_nested(target, keys)


def read_offline_run(path: str | Path, *, strict: bool = False, wait: float = 0.0) -> dict[str, Any]:
    """An offline wandb run read from disk.

    ``path`` is a ``run-*.wandb`` file, its ``offline-run-*`` folder, a ``wandb/`` folder or a run
    folder holding one wandb run (several: pass the file). The attempts of a resumed run (one
    run id in several ``offline-run-*`` folders) are read as one run: their history rows attempt
    after attempt, each attempt's sorted by its own ``_step`` (which starts again at 0; a step
    logged by two attempts appears twice, the later one being the resumed run's), the last
    attempt's exit code, and ``attempts`` (their files). Returns a dict with
    ``run_id``, ``project``, ``group``, ``job_type``, ``tags``, ``name``, ``config`` (plain values,
    wandb's own ``_wandb`` entry dropped), ``summary`` (final), ``history`` (pandas DataFrame,
    one row per wandb history row, sorted by ``_step`` within an attempt, columns = logged keys; a histogram or
    image is one column holding its JSON dict), ``history_rows`` (the same rows as dicts with only
    the keys logged in each, like the wandb API's ``scan_history``: a logged NaN stays apart from a
    missing key), ``exit_code`` (None while the run is unfinished) and ``path``.

    wandb's service writes the log in the background and may still be flushing it for a moment
    after ``run.finish()`` returns (it is complete once the process has exited); ``wait`` > 0
    re-reads for up to that many seconds until the run's exit record is there.
    """
    deadline = time.monotonic() + wait
    while True:
        run = _read_run(path, strict=strict)
        if run["exit_code"] is not None or time.monotonic() >= deadline:
            return run
        time.sleep(0.1)


def _read_run(path: str | Path, *, strict: bool) -> dict[str, Any]:
    import pandas as pd

    files = find_run_files(path)
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file under {path}")
    if len({f.name for f in files}) > 1:
        raise WandbFileError(f"{path} holds {len(files)} wandb runs ({', '.join(f.parent.name for f in files)}); "
                             "pass one of their .wandb files")
    # one run id in several folders: the attempts of a resumed run (oldest first), read as one run
    parts = [_read_file(f, strict) for f in files]
    # an earlier attempt killed (SIGKILL) before wandb's service wrote anything holds nothing:
    # skipped. The last one stays (it may be starting: its exit code is not known yet)
    parts = [p for i, p in enumerate(parts)
             if p["run_id"] is not None or p["history_rows"] or i == len(parts) - 1]
    if len({p["project"] for p in parts if p["project"] is not None}) > 1:
        raise WandbFileError(f"{path} holds runs of one id in different projects "
                             f"({', '.join(str(p['project']) for p in parts)}); pass one of their .wandb files")
    # what the run is (id, project, group, ...) from the last attempt that said; how it ended from the last one
    out = {**next((p for p in reversed(parts) if p["run_id"] is not None), parts[-1]),
           "exit_code": parts[-1]["exit_code"], "path": parts[-1]["path"]}
    if len(parts) > 1:
        rows = [row for p in parts for row in p["history_rows"]]
        config = {k: v for p in parts for k, v in p["config"].items()}
        summary = {k: v for p in parts for k, v in p["summary"].items()}
        out.update(config=config, summary=summary, history=pd.DataFrame(rows), history_rows=rows,
                   attempts=[p["path"] for p in parts])
    return out


def _read_file(file: Path, strict: bool) -> dict[str, Any]:
    """One ``run-*.wandb`` file (one attempt of a run)."""
    import pandas as pd
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict[str, Any] = {"path": str(file), "run_id": None, "project": None, "group": None, "job_type": None,
                           "tags": [], "name": None, "exit_code": None}
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for payload in iter_records(file, strict=strict):
        rec = pb.Record()
        try:
            rec.ParseFromString(payload)
        except Exception as e:
            if strict:
                raise WandbFileError(f"{file}: undecodable record: {e}") from e
            continue
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row: dict[str, Any] = {}
            for it in rec.history.item:  # media and histograms come as nested keys: rebuild their dicts
                keys = [it.key] if it.key else list(it.nested_key)
                if keys:
                    _set_nested(row, keys, _item_value(it))
            if "_step" not in row and rec.history.HasField("step"):
                row["_step"] = rec.history.step.num
            rows.append(row)
        elif kind == "run":
            r = rec.run
            out.update(run_id=r.run_id or out["run_id"], project=r.project or None, group=r.run_group or None,
                       job_type=r.job_type or None, tags=list(r.tags), name=r.display_name or None)
            if r.HasField("config"):
                _apply(config, r.config)
            if r.HasField("summary"):
                _apply(summary, r.summary)
        elif kind == "config":
            _apply(config, rec.config)
        elif kind == "summary":
            _apply(summary, rec.summary)
        elif kind == "exit":
            out["exit_code"] = int(rec.exit.exit_code)
    config.pop("_wandb", None)
    summary.pop("_wandb", None)
    rows.sort(key=lambda r: (r.get("_step") is None, r.get("_step") or 0))  # stable; rows without a step last
    out.update(config=config, summary=summary, history=pd.DataFrame(rows), history_rows=rows)
    return out


def offline_runs(root: str | Path) -> list[Path]:
    """Every ``offline-run-*`` folder under ``root`` (e.g. a sweep folder): what ``wandb sync`` would upload."""
    return sorted(p.parent for p in Path(root).rglob("offline-run-*/run-*.wandb"))
