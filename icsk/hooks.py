"""The activation Recorder: forward hooks that reduce activations to per-unit statistics.

Design:
* hooks exist only on scheduled steps (fastai ``every=N``): a skipped step costs nothing;
* no activation outlives its hook: small layers are copied into a staging buffer and reduced
  K steps at a time (one vectorised reduction instead of K small ones), large layers are
  reduced inside the hook; either way in-place ops after the hook cannot corrupt statistics;
* results stay on the tensor's device until a chunk is flushed: one host transfer per chunk,
  never a ``.item()`` per statistic;
* chunks stream to parquet in a run folder, so memory stays flat however long training runs.
"""

from __future__ import annotations

import atexit
import difflib
import itertools
import math
import os
import shutil
import tempfile
import threading
import warnings
import weakref
from concurrent.futures import Future
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import nn

from .background import background_pool, done_future, spare_core, wait_for
from .schedule import Schedule
from .stats import ALL_STATS, DEFAULT_STATS, Reducer, StatSpec
from .store import (ChunkWriter, FolderBusyError, FolderLease, hist_edges_of, last_recorded_step, names_matching,
                    read_histograms, read_recorder_meta, read_stats, values_column, write_json_atomic)

LayerSelector = str | type | nn.Module | Callable[[str, nn.Module], bool]
MODES = ("train", "eval")  # recorded by the module's training flag; "probe" inside Recorder.probe()
PROBE = "probe"


class RecorderError(ValueError):
    """Bad Recorder input: the message names the problem and the fix."""


def select_layers(model: nn.Module, layers: LayerSelector | Sequence[LayerSelector] | None) -> dict[str, nn.Module]:
    """Resolve selectors (exact names, glob patterns, module types, module instances, predicates)
    to named modules.

    ``None`` selects every Linear and Conv layer. A selector matching nothing raises
    RecorderError listing the nearest valid names."""
    named = dict(model.named_modules())
    named.pop("", None)
    if layers is None:
        layers = [_is_linear_or_conv]
    elif isinstance(layers, (str, type, nn.Module)) or callable(layers) and not isinstance(layers, Sequence):
        layers = [layers]
    elif not isinstance(layers, Iterable):
        raise RecorderError(f"layers={layers!r} is not a name, glob, nn.Module type, predicate(name, module) "
                            "or a list of them")
    layers = list(layers)
    if not layers:
        raise RecorderError("layers is an empty list, which would record nothing; pass names, or "
                            "layers=None for every Linear and Conv layer")
    chosen: dict[str, nn.Module] = {}
    for sel in layers:
        if isinstance(sel, str):
            hits = names_matching(sel, named)
        elif isinstance(sel, type) and issubclass(sel, nn.Module):
            hits = [n for n, m in named.items() if isinstance(m, sel)]
        elif isinstance(sel, nn.Module):  # a module instance: itself, under its first name
            hits = [n for n, m in named.items() if m is sel][:1]
        elif callable(sel):
            hits = [n for n, m in named.items() if sel(n, m)]
        else:
            raise RecorderError(f"layer selector {sel!r} is not a name, glob, nn.Module type, module or "
                                "predicate(name, module)")
        if not hits:
            raise RecorderError(_no_match_message(sel, list(named)))
        for n in hits:
            chosen.setdefault(n, named[n])
    return chosen


def _is_linear_or_conv(name: str, module: nn.Module) -> bool:
    """Default selection: every Linear and Conv layer."""
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))


def nearest_names(name: str, names: list[str]) -> list[str]:
    """Up to five of ``names`` closest to ``name``; the first five when none is close."""
    return difflib.get_close_matches(name, names, n=5, cutoff=0.3) or names[:5]


def _no_match_message(sel: Any, names: list[str]) -> str:
    if not names:
        return ("the model has no submodules to record; to record the model itself, select it in a "
                "wrapper: Recorder(nn.Sequential(model), layers=['0']) (the hooks go on the model, "
                "so calling model(x) as before records it)")
    if isinstance(sel, str):
        return f"layer {sel!r} matches no module of the model; nearest valid names: {nearest_names(sel, names)}"
    if isinstance(sel, nn.Module):
        return (f"the {type(sel).__name__} passed in layers is not a submodule of this model (a copy?); "
                f"pass one of its modules or its name, e.g. one of {names[:8]}")
    kind = sel.__name__ if isinstance(sel, type) else "predicate"
    return f"layer selector {kind} matches no module of the model; module names start with: {names[:8]}"


def _chunk_table(batches: list) -> pa.Table:
    """One parquet chunk from (layer, mode, steps, counts, results) batches; results may be
    futures of the reducer thread and device tensors (moved to the host here, once). Every
    statistic's values are copied once, straight into the chunk's flat values buffer."""
    batches = [(*b[:4], [r.result() if isinstance(r, Future) else r for r in b[4]]) for b in batches]
    # results may come from other CUDA streams (the hooks' ones): let them finish before copying
    for device in {t.device for b in batches for r in b[4] for t in r.values() if t.is_cuda}:
        torch.cuda.synchronize(device)
    blocks = []  # (steps, parts of one statistic [k, width] each, or counts [rows, 1], ids)
    for layer, mode, steps, counts, results in batches:
        steps = np.asarray(steps, dtype=np.int64)
        for stat in results[0]:
            blocks.append((steps, [r[stat] for r in results], (mode, layer, stat)))
        blocks.append((steps, [torch.as_tensor(np.asarray(counts, dtype=np.float32)).reshape(-1, 1)],
                       (mode, layer, "count")))
    widths = [parts[0].numel() // max(1, parts[0].shape[0]) for _, parts, _ in blocks]  # values per row
    rows = sum(len(b[0]) for b in blocks)
    flat = np.empty(sum(len(b[0]) * w for b, w in zip(blocks, widths, strict=True)), dtype=np.float32)
    out = torch.from_numpy(flat)
    row_widths = np.empty(rows, dtype=np.int64)
    labels: dict[str, dict[str, int]] = {"mode": {}, "layer": {}, "stat": {}}
    codes = {key: np.empty(rows, dtype=np.int32) for key in labels}
    at = row = 0
    for (steps, parts, ids), width in zip(blocks, widths, strict=True):
        n = len(steps)
        dest = out[at:at + n * width].view(n, width)
        parts = [t.reshape(-1, width) for t in parts]
        devices = {t.device for t in parts}
        if devices == {torch.device("cpu")}:
            torch.cat(parts, out=dest)
        else:  # one transfer per statistic; parts on several devices when the model moved within the chunk
            dest.copy_(torch.cat(parts) if len(devices) == 1 else torch.cat([t.cpu() for t in parts]))
        row_widths[row:row + n] = width
        for key, val in zip(labels, ids, strict=True):  # label codes: no Python string object per row
            codes[key][row:row + n] = labels[key].setdefault(val, len(labels[key]))
        at += n * width
        row += n
    offsets = np.concatenate([[0], np.cumsum(row_widths)])
    table = {"step": pa.array(np.concatenate([b[0] for b in blocks]))}
    for key, names in labels.items():
        table[key] = pa.DictionaryArray.from_arrays(codes[key], list(names)).cast(pa.string())
    table["values"] = values_column(flat, offsets)
    return pa.table(table)


def _checked_hist_range(value: Any) -> str | tuple[float, float]:
    """``"auto"`` or a finite ``(lo, hi)`` with lo < hi, else a RecorderError naming the fix."""
    if isinstance(value, str) and value == "auto":
        return value
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise RecorderError(f"hist_range must be \"auto\" or a pair (lo, hi) of numbers, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise RecorderError(f"hist_range needs finite lo < hi, got {value!r}")
    return (lo, hi)


def _default_stage_mb(device: torch.device) -> int:
    """Staging budget per layer and buffer: cache-sized on the CPU, larger on GPUs."""
    return 8 if device.type == "cpu" else 64


def _min_stage_steps(device: torch.device) -> int:
    """Fewest steps a staging buffer must hold for a layer to be staged: on the CPU staging pays
    off by batching (2+ steps), on GPUs already by moving the kernel launches off the training
    thread (1 step)."""
    return 2 if device.type == "cpu" else 1


def _stream_of(device: torch.device) -> torch.cuda.Stream | None:
    """The current CUDA stream of ``device`` (None off CUDA). A staged reduction runs on the
    stream the hooks copied into the staging buffer on, so it sees those copies, in order."""
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def _on_stream(stream: torch.cuda.Stream | None, fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` with ``stream`` as the current CUDA stream (as is, when None)."""
    if stream is None:
        return fn(*args)
    with torch.cuda.stream(stream):
        return fn(*args)


def _choices_of(value: Any) -> str:
    """What ``select`` can pick from ``value``, for an error message."""
    if hasattr(value, "keys"):
        return f"its keys are {list(value.keys())}"
    # named tuples, torch.return_types and dataclasses list their fields in __match_args__
    fields = getattr(type(value), "__match_args__", None) or list(getattr(value, "__dataclass_fields__", {}))
    if fields:
        return f"its fields are {list(fields)}"
    if isinstance(value, (tuple, list)) and value:
        return f"it has {len(value)} items: pass an index from 0 to {len(value) - 1}"
    return "pass a function that returns the tensor (select=lambda out: ...)"


class _LayerState:
    """Per (layer, mode): staging buffer or direct reduction, plus results awaiting flush."""

    def __init__(self, layer: str, mode: str):
        self.layer, self.mode = layer, mode
        self.units: int | None = None
        self.edges: tuple[float, float] | None = None
        self.last_step = -1
        # staging: two (stage [K, N, C, S] float32, per-step views shaped like the activation)
        # pairs; empty when the layer is reduced inside the hook
        self.buffers: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
        self.active = 0  # which of the buffers fills now
        self.slots: list[torch.Tensor] | None = None  # per-step views of the buffer that fills now
        self.move_units = False  # whether the unit axis must be moved to dim 1 (channels-last)
        self.warned_empty = False  # an empty batch was reported once
        self.pending: list[Future | None] = [None, None]  # reduction running on each buffer
        self.shape: torch.Size | None = None  # activation shape the slots were made for
        self.device: torch.device | None = None  # of the slots, or of the last reduction inside the hook
        self.stage_steps: list[int] = []
        self.steps: list[int] = []  # steps of the pending results
        self.counts: list[int] = []  # values per unit at each pending step
        self.results: list[dict[str, torch.Tensor]] = []  # each stat [k, C] on device

    @property
    def stage(self) -> torch.Tensor:
        return self.buffers[self.active][0]

    def switch(self, active: int) -> None:
        """Make staging buffer ``active`` the one that fills."""
        self.active = active
        self.slots = self.buffers[active][1] if self.buffers else None


# torch.func's transforms (vmap, grad, jacrev, ...) wrap the tensors a forward sees; a copy out
# of one is refused (vmap: a batched value into an unbatched buffer; grad: a captured mutation)
_functorch_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


_open: weakref.WeakSet[Recorder] = weakref.WeakSet()  # entered or attached, not closed yet


def _close_open_recorders() -> None:
    """At interpreter exit, close Recorders still open (``attach()`` without ``close()``, or a
    script ended by an exception outside a ``with``), so what they hold is written. A live
    non-daemon thread that opened one is joined first (the interpreter would join it next; it
    may still be recording)."""
    me = threading.current_thread()
    for rec in list(_open):
        owner = rec._owner
        if owner is not None and owner is not me and not owner.daemon and owner.is_alive():
            owner.join()
    for rec in list(_open):
        try:
            rec.close()
        except Exception as e:  # one failing Recorder must not keep the others from closing
            warnings.warn(f"icsk: closing the Recorder on {rec.path} at exit failed: {e}", RuntimeWarning, stacklevel=1)


# threading's exit hooks run before concurrent.futures stops its workers (registered earlier,
# called in reverse), which the flush still needs; plain atexit hooks would run after that
getattr(threading, "_register_atexit", atexit.register)(_close_open_recorders)
# a forked child (a DataLoader worker) has none of the parent's threads and shares its lease's
# lock: it must not close the parent's Recorders at its exit (it hung there, waiting on them)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_open.clear)


def _inert_hook(*args: Any, **kwargs: Any) -> None:
    """What a Recorder's hook becomes in a copy of the model (deepcopy, pickle): nothing."""


@torch.compiler.disable
def _on_forward_eagerly(recorder: Recorder, *args: Any) -> None:
    recorder._on_forward(*args)


class _Hook:
    """A Recorder's forward (pre-)hook on one module. It records only that module and
    DataParallel's replicas of it (a shallow copy that shares the hook is not recorded as the
    original); deep copies (an EMA, a snapshot) and pickles of the model carry an inert hook
    instead; under torch.compile it runs eagerly, outside the graph (tracing it would guard on
    the Recorder's state and recompile at every step)."""

    __slots__ = ("recorder", "name", "module")

    def __init__(self, recorder: Recorder, name: str, module: nn.Module):
        self.recorder, self.name, self.module = recorder, name, module

    def __call__(self, module: nn.Module, args: tuple, rest: Any) -> None:
        # output hook: (module, args, output); input hook with kwargs: (module, args, kwargs)
        # DataParallel's replicas are copies made for one forward: they share this hook and count
        if (module is not self.module and not getattr(module, "_is_replica", False)) or self.recorder._paused:
            return
        if torch.compiler.is_compiling():
            _on_forward_eagerly(self.recorder, self.name, module, args, rest)
        else:
            self.recorder._on_forward(self.name, module, args, rest)

    def __deepcopy__(self, memo: dict) -> Callable[..., None]:
        return _inert_hook

    def __reduce__(self) -> tuple:
        return (_inert_factory, ())


def _inert_factory() -> Callable[..., None]:
    return _inert_hook


class Recorder:
    """Records per-unit activation statistics of chosen layers of any ``nn.Module``.

    Use as a context manager; call :meth:`step` once per training step, then read
    :meth:`to_frame` (long format: ``step, layer, stat, unit, value``).

    Args:
        model: the network.
        layers: module names, glob patterns (``"block*.pre_act"``), module types, modules, or a
            predicate ``(name, module) -> bool``; a list mixes them. Default: Linear and Conv.
        capture: ``"output"`` (default) or ``"input"`` (first positional argument).
        stats: any of ``mean, var, min, max, quantiles, frac_sat, frac_zero, nonfinite, hist``.
        quantiles: levels for ``quantiles`` (names ``q0.15`` ...).
        hist_bins, hist_range: histogram bins; range ``(lo, hi)`` or ``"auto"`` (the first
            recorded batch's [min, max], widened by ``hist_margin`` of its span each side).
            Values outside the range land in an underflow and an overflow bin.
        sat_threshold, zero_eps: ``frac_sat`` = P(|x| > sat_threshold), ``frac_zero`` = P(|x| <= zero_eps).
        schedule: steps to record: int N (every N), list of steps, ``"log:K"``, or a Schedule.
        modes: ``("train",)`` records training-mode forwards only; add ``"eval"`` to also record
            eval-mode forwards, tagged ``mode="eval"`` (never mixed with training statistics).
            Forwards inside :meth:`probe` are tagged ``mode="probe"`` (a fixed probe batch).
        channel_dim: axis of units (1 for (N, C, ...) tensors; -1 for channels-last / tokens).
        select: how to pick the tensor from a non-tensor output: an index, a dict key, or a function.
        path: folder to stream statistics to (``<path>/stats``); default a temporary folder
            removed when the Recorder is garbage-collected.
        flush_every, flush_mb: a chunk is written after ``flush_every`` recorded steps or once
            it holds ``flush_mb`` MB of statistics, whichever comes first (memory holds at most
            one chunk; a killed process loses at most the chunk not yet written).
        stage_mb: staging budget per layer and buffer (two buffers), in MB; default 8 on the CPU
            (cache-sized) and 64 on GPUs. A layer is staged when 2 steps fit (1 on GPUs) and then
            reduced K steps at a time on a background thread, which on a GPU also takes the kernel
            launches off the training thread (on a CPU whose cores all run torch's threads, the
            training thread reduces a full buffer itself, dense layers on torch's OpenMP team);
            larger layers are reduced inside the hook.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSelector | Sequence[LayerSelector] | None = None,
        *,
        capture: str = "output",
        stats: Iterable[str] = DEFAULT_STATS,
        quantiles: Iterable[float] = (0.15, 0.5, 0.85),
        hist_bins: int = 32,
        hist_range: str | tuple[float, float] = "auto",
        hist_margin: float = 0.5,
        sat_threshold: float = 4.0,
        zero_eps: float = 1e-6,
        schedule: Schedule | int | str | Iterable[int] | None = None,
        modes: Iterable[str] = ("train",),
        channel_dim: int = 1,
        select: int | str | Callable[[Any], torch.Tensor] | None = None,
        path: str | Path | None = None,
        flush_every: int = 1024,
        flush_mb: float = 8.0,
        stage_mb: float | None = None,
        start_step: int = 0,
        max_stage_steps: int = 64,
    ):
        if capture not in ("output", "input"):
            raise RecorderError(f"capture must be 'output' or 'input', got {capture!r}")
        stats = (stats,) if isinstance(stats, str) else tuple(stats)
        modes = (modes,) if isinstance(modes, str) else modes
        bad = [s for s in stats if s not in ALL_STATS]
        if bad:
            raise RecorderError(f"unknown statistic(s) {bad}; choose from {list(ALL_STATS)}")
        self.modes = tuple(modes)
        if not self.modes or any(m not in MODES for m in self.modes):
            raise RecorderError(f"modes must be a non-empty subset of {MODES}, got {self.modes}")
        hist_range = _checked_hist_range(hist_range)
        if flush_every < 1 or not flush_mb > 0:
            raise RecorderError(f"flush_every must be >= 1 and flush_mb > 0, got {flush_every} and {flush_mb}")
        self.model = model
        try:
            self.spec = StatSpec(stats=stats, quantiles=tuple(float(q) for q in quantiles), hist_bins=int(hist_bins),
                                 sat_threshold=float(sat_threshold), zero_eps=float(zero_eps))
        except ValueError as e:  # a quantile outside [0, 1], hist_bins < 1, a negative threshold
            raise RecorderError(str(e)) from None
        self.layers = select_layers(model, layers)
        self.capture = capture
        self.hist_range = hist_range
        self.hist_margin = float(hist_margin)
        self.schedule = Schedule.parse(schedule)
        self.channel_dim = channel_dim
        self.select = select
        self.flush_every = int(flush_every)
        self.flush_bytes = flush_mb * 2**20
        self._step_bytes = 0  # bytes of statistics one recorded step adds (once layer sizes are known)
        self.stage_bytes = None if stage_mb is None else int(stage_mb * 2**20)
        self.max_stage_steps = int(max_stage_steps)
        self.current_step = int(start_step)
        self._pid = os.getpid()  # a forked child's copy must not clean up the parent's folders
        self._tmpdir = None
        if path is None:
            self._tmpdir = tempfile.mkdtemp(prefix="icsk-rec-")
            path = self._tmpdir
        self.path = Path(path)
        self.stats_dir = self.path / "stats"
        self._writer = ChunkWriter(self.stats_dir, background=True)
        self._lease = FolderLease(self.stats_dir)  # held while entered: one Recorder per path at a time
        self._reducer = Reducer(self.spec)  # large layers, inside the hook
        self._stage_reducer = Reducer(self.spec, threads=1)  # staged layers, on the single-threaded reducer thread
        self._reduce_pool = background_pool("icsk-reduce")
        self._states: dict[tuple[str, str], _LayerState] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._entered = False
        self._removed = False  # remove() was called: no hooks until attach()
        self._paused = 0
        self._owner: threading.Thread | None = None  # the thread that entered (joined before closing at exit)
        self._warned_transform = False  # a forward inside a torch.func transform was skipped
        self._lock = threading.Lock()  # held by a capture (DataParallel's replicas run in threads)
        self._forced_mode: str | None = None  # "probe" inside probe(): forwards tagged so, whatever the flag
        self._pending_steps = 0
        self._saved_meta: dict | None = None  # recorder.json as last written (rewritten only on change)
        self._path_checked = False  # whether path was checked for steps recorded before (first capture)
        self._prior_layers: dict[str, dict] = {}  # recorder.json layers of an earlier session on this path

    # ------------------------------------------------------------------ hooks
    def __enter__(self) -> Recorder:
        try:
            self._lease.acquire()
        except FolderBusyError as e:
            raise RecorderError(str(e)) from None
        self._entered = True
        self._removed = False
        self._owner = threading.current_thread()
        _open.add(self)
        self._sync_hooks()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def attach(self) -> Recorder:
        """Attach hooks (same as entering the context); pair it with :meth:`close`, which writes
        what is pending."""
        return self.__enter__()

    def remove(self) -> None:
        """Remove every hook this Recorder added and record nothing more: later steps attach no
        hooks until :meth:`attach` (to skip some forwards only, use :meth:`paused`). What was
        recorded stays readable; :meth:`close` writes what is pending. Idempotent."""
        self._removed = True
        self._detach()

    def _detach(self) -> None:
        """Take the hooks off the model (a step the schedule skips, or for good)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def close(self) -> None:
        """Remove hooks, flush everything recorded to the run folder and put it on the disk itself
        (``fsync``). Idempotent; Recorders left open are closed at interpreter exit."""
        self._entered = False
        self._detach()
        try:
            self.flush(wait=True, sync=True)
            _open.discard(self)  # (an interrupted flush is tried again at exit)
        finally:
            self._lease.release()

    @property
    def attached(self) -> bool:
        """Whether hooks are on the model right now (only on scheduled steps)."""
        return bool(self._handles)

    def _sync_hooks(self) -> None:
        want = self._entered and not self._removed and self.schedule(self.current_step)
        if want and not self._handles:
            self._attach_hooks()
        elif not want and self._handles:
            self._detach()

    def _attach_hooks(self) -> None:
        for name, mod in self.layers.items():
            hook = _Hook(self, name, mod)
            if self.capture == "output":
                h = mod.register_forward_hook(hook)
            else:
                h = mod.register_forward_pre_hook(hook, with_kwargs=True)
            self._handles.append(h)

    def _on_forward(self, name: str, module: nn.Module, args: tuple, rest: Any) -> None:
        """A hooked module ran: capture its output (``rest``), or its input (first positional
        argument, else the only keyword argument; ``rest`` holds the keyword arguments). One
        capture at a time: DataParallel runs its replicas' forwards in threads."""
        if self.capture == "output":
            value = rest
        elif args:
            value = args[0]
        elif len(rest) == 1:
            value = next(iter(rest.values()))
        else:
            raise RecorderError(f"layer {name!r} was called with keyword inputs {sorted(rest)} and no positional "
                                "one, so capture='input' cannot tell which to record; use capture='output'")
        with self._lock:
            self._capture(name, module, value)

    @contextmanager
    def probe(self) -> Iterator[None]:
        """Forwards inside this block are recorded as ``mode="probe"`` at the current step, also on
        steps the schedule skips: for a fixed probe batch, whose statistics then change only
        because the weights do, and by the noise stochastic layers draw (noisy BN, dropout);
        training batches add their sampling noise to every difference. As in training, only
        the first probe forward of a step is recorded: pass the whole probe batch at once."""
        if not self._entered or self._removed:
            raise RecorderError("probe() records through the Recorder's hooks: enter it first (with rec: ...), "
                                "or attach() it again after remove()")
        if self._forced_mode is not None or self._paused:
            raise RecorderError("probe() cannot be nested or used while the Recorder is paused")
        self._forced_mode = PROBE
        attached = bool(self._handles)
        if not attached:
            self._attach_hooks()
        try:
            yield
        finally:
            self._forced_mode = None
            if not attached:  # a step the schedule skips: step() will not count it
                self._detach()
                self._count_pending()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Forwards inside this block are not recorded (e.g. metric probes)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    # ------------------------------------------------------------------ capture
    def _selected(self, name: str, value: Any) -> Any:
        """``select`` applied to a non-tensor output: a function, a dict key or attribute name
        (named tuples, dataclasses), or an index."""
        sel = self.select
        try:
            if callable(sel):
                return sel(value)
            if isinstance(sel, str) and not hasattr(value, "keys") and hasattr(value, sel):
                return getattr(value, sel)
            return value[sel]
        except (KeyError, IndexError, TypeError) as e:
            raise RecorderError(f"layer {name!r}: select={sel!r} failed on its {type(value).__name__} ({e}); "
                                f"{_choices_of(value)}") from None

    def _tensor_of(self, name: str, module: nn.Module, value: Any) -> torch.Tensor:
        """``value`` (``select`` applied already) checked to be a recordable tensor."""
        if not isinstance(value, torch.Tensor):
            hint = "an index (select=0)" if isinstance(value, (tuple, list)) else (
                "a key (select='name')" if isinstance(value, dict) else "a function (select=lambda out: ...)")
            raise RecorderError(
                f"layer {name!r} ({type(module).__name__}) gives a {type(value).__name__}, not a tensor; "
                f"pass Recorder(..., select=...) with {hint} to pick the tensor to record"
            )
        if value.dim() < 2:
            raise RecorderError(
                f"layer {name!r} gives a tensor of shape {tuple(value.shape)}; icsk needs (N, C, ...) "
                "with a batch dimension; choose another layer or capture='input'"
            )
        if not value.is_floating_point():
            raise RecorderError(f"layer {name!r} gives a {value.dtype} tensor; only floating-point activations can be recorded")
        return value

    def _capture(self, name: str, module: nn.Module, value: Any) -> None:
        mode = self._forced_mode or ("train" if module.training else "eval")
        state = self._states.get((name, mode))
        if state is None:  # first forward in this mode: recorded at all?
            if mode not in self.modes and mode != PROBE:
                return
            state = self._states[(name, mode)] = _LayerState(name, mode)
        step = self.current_step
        if state.last_step == step:  # record the first forward of a step only
            return
        if self.select is not None and not isinstance(value, torch.Tensor):
            value = self._selected(name, value)
        if _functorch_wrapped is not None and isinstance(value, torch.Tensor) and _functorch_wrapped(value):
            self._skip_transformed(name)
            return
        slots = state.slots
        if (slots is not None and type(value) is torch.Tensor and value.shape == state.shape
                and value.device == state.device):
            # fast path (~3 us): one contiguous copy into the staging slot of this step
            state.last_step = step
            staged = state.stage_steps
            n = len(staged)
            if n == 0:
                self._await_buffer(state)
            x = value.detach()
            slots[n].copy_(x.movedim(self.channel_dim, 1) if state.move_units else x)
            staged.append(step)
            if n + 1 == len(slots):
                self._reduce_stage(state)
            return
        if getattr(module, "_is_replica", False) and isinstance(value, torch.Tensor):
            # DataParallel: every step records the replica on one device (its slice of the batch):
            # the model's own (device_ids[0], which always gets a slice), else the first recorded
            home = self._home_device(name) or state.device
            if home is not None and value.device != home:
                return
        x = (value if type(value) is torch.Tensor else self._tensor_of(name, module, value)).detach()
        self._capture_slow(state, name, module, x)

    def _home_device(self, name: str) -> torch.device | None:
        """Where layer ``name``'s own weights live (else the model's): the device DataParallel
        keeps the model on; None for a model without parameters or buffers."""
        for module in (self.layers[name], self.model):
            for t in itertools.chain(module.parameters(), module.buffers()):
                return t.device
        return None

    def _skip_transformed(self, name: str) -> None:
        """A forward inside a torch.func transform is not recorded; the first one warns."""
        if not self._warned_transform:
            self._warned_transform = True
            warnings.warn(f"icsk: layer {name!r} ran inside a torch.func transform (vmap, grad, jacrev, ...); such "
                          "forwards are not recorded. Run them inside rec.paused() to say so and silence this warning.",
                          RuntimeWarning, stacklevel=2)

    def _check_path_is_free(self) -> None:
        """Refuse to write steps into a folder that already holds them (a second Recorder on the
        same ``path`` would mix its rows with the first one's). A folder continued after its last
        step must have been recorded with the same statistics; its layers stay described in
        recorder.json, and its histogram ranges are reused so that bins stay comparable."""
        last = last_recorded_step(self.stats_dir)
        if last is not None:
            self._continue_path(last)
        self._path_checked = True

    def _continue_path(self, last: int) -> None:
        """Take over a folder recorded up to step ``last`` (see :meth:`_check_path_is_free`)."""
        if self.current_step <= last:
            raise RecorderError(
                f"{self.stats_dir} already holds statistics up to step {last}, and this Recorder would record "
                f"step {self.current_step} again; pass a new path, or Recorder(..., start_step={last + 1}) to "
                "continue that run")
        prior = read_recorder_meta(self.stats_dir)
        mine = self._meta()
        differ = [k for k in ("capture", "stats", "quantiles", "hist_bins", "sat_threshold", "zero_eps", "channel_dim")
                  if k in prior and prior[k] != mine[k]]
        if differ:
            raise RecorderError(
                f"{self.stats_dir} was recorded with " + ", ".join(f"{k}={prior[k]}" for k in differ) + "; this "
                "Recorder has " + ", ".join(f"{k}={mine[k]}" for k in differ) + "; continue it with the same "
                "settings or pass a new path")
        self._prior_layers = prior.get("layers") or {}
        known = self.hist_edges()  # the training job restores them from its checkpoint first
        self.restore_edges({(layer, mode): (edges[0], edges[-1])
                            for layer, info in self._prior_layers.items() if layer in self.layers
                            # a folder from before per-mode ranges holds its single range as training mode's
                            for mode in info.get("hist_edges_by_mode", ("train",))
                            if (layer, mode) not in known and (edges := hist_edges_of(info, mode)) is not None})

    def _units_at_1(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with its unit axis (``channel_dim``) moved to dim 1: (N, C, ...)."""
        cd = self.channel_dim % x.dim()
        return x if cd == 1 else x.movedim(cd, 1)

    def _capture_slow(self, state: _LayerState, name: str, module: nn.Module, x: torch.Tensor) -> None:
        """First capture of a layer, a changed shape or device, or a layer too large to stage."""
        x = self._tensor_of(name, module, x)
        if not self._path_checked:
            self._check_path_is_free()
        if not -x.dim() <= self.channel_dim < x.dim():
            raise RecorderError(f"channel_dim={self.channel_dim} is out of range for layer {name!r}'s tensor of "
                                f"shape {tuple(x.shape)}; use 1 for (N, C, ...) or -1 for channels-last / tokens")
        if x.numel() == 0:  # an empty batch has no statistics; the step stays unrecorded for this layer
            if not state.warned_empty:
                warnings.warn(f"icsk: layer {name!r} gave an empty tensor of shape {tuple(x.shape)} at step "
                              f"{self.current_step}; nothing is recorded for it at such steps", stacklevel=2)
                state.warned_empty = True
            return
        xc = self._units_at_1(x)
        n, c = xc.shape[0], xc.shape[1]
        x4 = xc.reshape(1, n, c, -1)
        if state.units is None:
            prior = self._prior_layers.get(name, {}).get("units")
            if prior is not None and prior != c:
                raise RecorderError(f"layer {name!r} has {c} units, but {self.stats_dir} holds its statistics of earlier "
                                    f"steps with {prior} units; continue that run with the same model, or pass a new path")
            state.units = c
            per_unit = len(self.spec.output_names()) + ("hist" in self.spec.stats) * (self.spec.hist_bins + 1)
            self._step_bytes += 4 * c * per_unit
            if "hist" in self.spec.stats and state.edges is None:
                state.edges = self._hist_edges(x4)
        elif c != state.units:
            raise RecorderError(f"layer {name!r} changed from {state.units} to {c} units between steps")
        state.last_step = self.current_step
        self._reduce_stage(state)  # shape or device changed: reduce what is staged first
        flats = [st.view(-1) for st, _ in state.buffers]
        state.buffers = []
        state.switch(0)
        m = x4.shape[1] * x4.shape[3]
        budget = self.stage_bytes if self.stage_bytes is not None else _default_stage_mb(x.device) * 2**20
        k = min(self.max_stage_steps, budget // (c * m * 4))
        if k < _min_stage_steps(x.device):
            state.results.append(self._reducer(x4, state.edges))  # reduce now, inside the hook
            state.device = x.device
            state.steps.append(self.current_step)
            state.counts.append(m)
            return
        # the activation's own layout [N, C, S...], so staging is a plain copy (a transposing
        # copy costs ~4x); the reduction reorders it where it needs to (block by block for dense layers).
        # Two buffers: one fills while the other is reduced. Their pending reductions are kept,
        # so a shape that changes every step (variable sequence lengths) still waits for the
        # reducer instead of queueing copies without bound; buffers large enough are reused.
        need = k * n * c * (m // n)
        for i in range(2):
            flat = flats[i] if i < len(flats) and flats[i].device == x.device and flats[i].numel() >= need else None
            if flat is None:
                self._await_pending(state, i)  # the old buffer is freed only after its reduction
                with torch.inference_mode(False):  # staged under inference_mode, it could not be refilled outside
                    flat = torch.empty(need, dtype=torch.float32, device=x.device)
            stage = flat[:need].view(k, n, c, m // n)
            state.buffers.append((stage, [stage[i].view(xc.shape) for i in range(k)]))
        state.switch(0)
        state.shape, state.device = x.shape, x.device
        state.move_units = xc is not x
        self._await_buffer(state)
        state.slots[0].copy_(xc)
        state.stage_steps.append(self.current_step)
        if k == 1:  # the stage is full already
            self._reduce_stage(state)

    def _hist_edges(self, x4: torch.Tensor) -> tuple[float, float]:
        if self.hist_range != "auto":
            return self.hist_range
        finite = x4[torch.isfinite(x4)]
        lo, hi = (torch.stack([finite.min(), finite.max()]).tolist() if finite.numel() else (-1.0, 1.0))
        span = hi - lo if hi > lo else max(abs(lo), 1.0)
        return (lo - self.hist_margin * span, hi + self.hist_margin * span)

    def hist_edges(self) -> dict[tuple[str, str], tuple[float, float]]:
        """Histogram range (lo, hi) of each (layer, mode) recorded so far."""
        return {k: st.edges for k, st in self._states.items() if st.edges is not None}

    def restore_edges(self, edges: dict[tuple[str, str], tuple[float, float]]) -> None:
        """Reuse histogram ranges of an earlier session (resume), so bins stay comparable."""
        for (layer, mode), e in edges.items():
            if mode not in self.modes and mode != PROBE:  # a state exists only for a recorded mode (see _capture)
                continue
            state = self._states.setdefault((layer, mode), _LayerState(layer, mode))
            state.edges = (float(e[0]), float(e[1]))

    def _reduce_stage(self, state: _LayerState) -> None:
        """Hand the filled staging buffer to the reducer thread and switch to the other one.

        The reduction (sorting for quantiles, mostly) then overlaps the next training steps;
        a buffer is refilled only after its previous reduction has finished (:meth:`_await_buffer`).
        On a CPU whose every core runs one of torch's threads, the reducer thread would get its
        turn only when training waits for it: the buffer is reduced here, on the training thread."""
        k = len(state.stage_steps)
        if k == 0:
            return
        st = state.stage
        inline = st.device.type == "cpu" and not spare_core()  # no core for the reducer thread: reduce here
        if inline:
            fut = done_future(self._reducer.reduce_staged, st[:k], state.edges)
        else:
            fut = self._reduce_pool.submit(_on_stream, _stream_of(st.device), self._stage_reducer.reduce_staged,
                                           st[:k], state.edges)
        state.results.append(fut)
        state.steps.extend(state.stage_steps)
        state.counts.extend([st.shape[1] * st.shape[3]] * k)
        state.stage_steps = []
        if not inline:  # (reduced here, the buffer is free again at once: one buffer stays in the cache)
            state.pending[state.active] = fut
            state.switch(1 - state.active)

    @staticmethod
    def _await_buffer(state: _LayerState) -> None:
        """Wait until the active staging buffer's previous reduction is done (before refilling
        it). An interrupted wait leaves it pending, so the next capture waits again."""
        Recorder._await_pending(state, state.active)

    @staticmethod
    def _await_pending(state: _LayerState, i: int) -> None:
        fut = state.pending[i]
        if fut is not None:
            wait_for(fut)
            state.pending[i] = None

    # ------------------------------------------------------------------ steps and flushing
    def step(self) -> None:
        """Mark one training step done; hooks appear only on steps the schedule selects."""
        if self.schedule(self.current_step):
            self._count_pending()
        self.current_step += 1
        self._sync_hooks()

    def _count_pending(self) -> None:
        """One more step with results waiting; a chunk is written every ``flush_every`` of them
        or once they hold ``flush_mb``."""
        self._pending_steps += 1
        if self._pending_steps >= self.flush_every or self._pending_steps * self._step_bytes >= self.flush_bytes:
            self._flush()

    def flush(self, wait: bool = False, sync: bool = False) -> None:
        """Reduce staged activations and write every pending result as one parquet chunk
        (in a background thread; ``wait=True`` returns once it is in the run folder, where any
        process can read it and a crash of this one cannot lose it; ``sync=True`` also puts
        every chunk and ``recorder.json`` on the disk itself, as :meth:`close` does)."""
        self._flush()
        if sync:
            self._writer.sync(also=[self.stats_dir / "recorder.json"])
        elif wait:
            self._writer.wait()

    def _flush(self) -> None:
        """Hand every pending result to the writer thread, which waits for the reductions,
        builds the chunk and writes it. The training thread waits here only for a chunk still
        being written. A signal (Ctrl-C, SIGTERM) cutting the hand-over short loses nothing:
        results not yet queued go back to their layers, for :meth:`close` to write."""
        for state in self._states.values():  # may wait for a reducer: nothing is handed over yet
            self._reduce_stage(state)
        taken = [(state, state.results, state.steps, state.counts) for state in self._states.values() if state.results]
        if not taken:
            self._pending_steps = 0
            return
        meta = self._meta()
        before = None if meta == self._saved_meta else (lambda: self._save_meta(meta))
        batches = [(state.layer, state.mode, steps, counts, results) for state, results, steps, counts in taken]
        queued_before = self._writer.chunks_queued
        handed = False
        try:
            for state, *_ in taken:
                state.results, state.steps, state.counts = [], [], []
            self._pending_steps = 0
            self._writer.write(lambda: _chunk_table(batches), before=before)  # queued before it waits
            handed = True
        finally:
            if not handed and self._writer.chunks_queued == queued_before:
                # cut short before the chunk was queued (Ctrl-C): the results go back, for close()
                for state, results, steps, counts in taken:
                    if state.results is not results:
                        state.results, state.steps, state.counts = (results + state.results, steps + state.steps,
                                                                    counts + state.counts)

    def _save_meta(self, meta: dict) -> None:
        """Write recorder.json (runs on the writer thread, before the chunk that needs it)."""
        write_json_atomic(self.stats_dir / "recorder.json", meta)
        self._saved_meta = meta

    def _meta(self) -> dict:
        """What a reader needs besides the chunks: layers, units, statistics, histogram edges."""
        # layers an earlier session recorded into this path (start_step continues it) stay described
        layers = {name: dict(info) for name, info in self._prior_layers.items()}
        for (layer, mode), st in sorted(self._states.items(), key=lambda kv: kv[0][1] != "train"):
            info = layers.setdefault(layer, {"units": st.units})
            info["units"] = st.units if st.units is not None else info.get("units")
            if st.edges is not None and "hist" in self.spec.stats:
                lo, hi = st.edges
                edges = np.linspace(lo, hi, self.spec.hist_bins + 1).tolist()
                info.setdefault("hist_edges", edges)  # training mode's, when recorded
                info["hist_edges_by_mode"] = {**info.get("hist_edges_by_mode", {}), mode: edges}
        return (
            {
                "layers": layers,
                "capture": self.capture,
                "stats": list(self.spec.stats),
                "outputs": self.spec.output_names(),
                "quantiles": list(self.spec.quantiles),
                "hist_bins": self.spec.hist_bins,
                "sat_threshold": self.spec.sat_threshold,
                "zero_eps": self.spec.zero_eps,
                "channel_dim": self.channel_dim,
                "schedule": repr(self.schedule),
            }
        )

    # ------------------------------------------------------------------ reading back
    def to_frame(self, layers=None, stats=None, steps=None, mode: str | None = "train") -> pd.DataFrame:
        """Long frame ``step, layer, stat, unit, value`` of everything recorded so far.

        Filters: ``layers``/``stats`` lists, ``steps`` a list or a ``(start, stop)`` range,
        ``mode`` 'train', 'eval', 'probe' or None (all, with a ``mode`` column). ``unit`` is -1 for
        statistics of a whole layer (``count``: values per unit at that step). Histograms are
        read with :meth:`histograms`."""
        self.flush(wait=True)
        return read_stats(self.stats_dir, layers, stats, steps, mode)

    def histograms(self, layers=None, steps=None, mode: str | None = "train") -> pd.DataFrame:
        """Histogram counts: ``step, layer, unit, bin, left, right, count``."""
        self.flush(wait=True)
        return read_histograms(self.stats_dir, layers, steps, mode)

    def __del__(self) -> None:
        if os.getpid() != getattr(self, "_pid", None):  # a forked child's copy (or a failed __init__)
            return
        try:
            self._detach()
            self._lease.release()
            if self._tmpdir is not None:
                shutil.rmtree(self._tmpdir, ignore_errors=True)
        except Exception:
            pass
