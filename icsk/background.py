"""Worker threads for the Recorder's reductions and chunk writes that stay out of training's way.

A second OpenMP team (a worker's) next to the training thread's would spin on the same cores
and slow every training step down (2.5x measured on 2 cores), so workers run torch ops on one
thread. On Linux they also run at idle priority (``SCHED_IDLE``): they use cycles the training
threads leave free and never preempt them. When training keeps every core busy, a worker still
gets its turn the moment the training thread waits for it (a full staging buffer, a flush);
the Recorder then reduces on the training thread instead (:func:`spare_core`).
Other processes keeping every core busy would starve it, and training with it: a wait longer
than ``STARVED_S`` during which the workers sit on the run queue (waiting for a core, not
working or sleeping: a first Triton compile is slow but not starved) moves them to normal
priority for the rest of the process (or, where that is not permitted, warns to set
``ICSK_IDLE_WORKERS=0``).
"""

from __future__ import annotations

import functools
import os
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable
from typing import Any

import torch

STARVED_S = 0.5  # a wait for a worker this long may mean it is starved at idle priority ...
_SAMPLE_S = 0.1  # ... if in a window this long it then waits for a core for half of it or more
_idle_workers: set[int] = set()  # native ids of workers running at idle priority
_lock = threading.Lock()
_promoted = False  # workers were starved: new ones start at normal priority too


def _init_worker() -> None:
    torch.get_num_threads()  # initializes this thread's count first (else the next op resets it)
    torch.set_num_threads(1)
    if os.environ.get("ICSK_IDLE_WORKERS", "1") != "0" and hasattr(os, "SCHED_IDLE") and not _promoted:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread only
        except OSError:  # not permitted in some containers: stay at normal priority
            return
        with _lock:
            _idle_workers.add(threading.get_native_id())


def background_pool(name: str) -> ThreadPoolExecutor:
    """A one-worker pool whose torch ops run single-threaded at idle priority.

    torch keeps the thread count per OS thread once a thread has initialized it, so the worker
    sets 1 for itself and the process-wide default is put back afterwards."""
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(1, thread_name_prefix=name, initializer=_init_worker)
    pool.submit(lambda: None).result()  # start the worker now
    torch.set_num_threads(threads)
    return pool


@functools.cache
def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def spare_core() -> bool:
    """Whether the process may use a core beside torch's intra-op threads, for a worker to run
    on while training goes on. Without one, an idle-priority worker runs only once the training
    thread waits for it, and then on data gone cold in the cache: work the training thread
    needs soon (a staging buffer's reduction) is faster done on that thread right away
    (reports/benchmarks.md)."""
    return torch.get_num_threads() < _usable_cores()


def done_future(fn: Callable[..., Any], *args: Any) -> Future:
    """``fn(*args)`` run now, on this thread, as a finished future (its result or its error, as a
    pool's would hold it; an interrupt such as Ctrl-C propagates)."""
    fut: Future = Future()
    try:
        fut.set_result(fn(*args))
    except Exception as e:
        fut.set_exception(e)
    return fut


def wait_for(fut: Future) -> Any:
    """``fut.result()`` for the training thread: a wait past ``STARVED_S`` on workers that are
    kept from running (not merely busy) promotes them."""
    if not _idle_workers:
        return fut.result()
    t0 = time.perf_counter()
    try:
        return fut.result(timeout=STARVED_S)
    except TimeoutError:
        pass
    before = _runqueue_wait_ns()
    while True:
        try:
            return fut.result(timeout=_SAMPLE_S)
        except TimeoutError:
            pass
        after = _runqueue_wait_ns()
        if before is None or after is None or after - before >= _SAMPLE_S * 1e9 / 2:
            break  # starved (or no way to tell: as before, a long wait counts as starved)
        before = after  # one read of the workers' schedstat per window
    _promote_workers()
    result = fut.result()
    _warn_if_idle(time.perf_counter() - t0)
    return result


def _runqueue_wait_ns() -> int | None:
    """Nanoseconds the idle-priority workers have spent runnable but waiting for a core, from
    Linux's ``/proc/self/task/<tid>/schedstat``; None where that cannot be read."""
    total, read = 0, 0
    for tid in list(_idle_workers):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
        except FileNotFoundError:  # that worker has ended
            continue
        except (OSError, ValueError, IndexError):
            return None
        read += 1
    return total if read else None


def _promote_workers() -> None:
    """Move the idle-priority workers to normal priority (where permitted), for good."""
    global _promoted
    with _lock:
        _promoted = True
        for tid in list(_idle_workers):
            try:
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            except ProcessLookupError:  # that worker has ended
                _idle_workers.discard(tid)
            except OSError:  # not permitted (no CAP_SYS_NICE, RLIMIT_NICE): stays idle
                continue
            else:
                _idle_workers.discard(tid)


_warned = False


def _warn_if_idle(waited: float) -> None:
    global _warned
    if _idle_workers and not _warned:
        _warned = True
        warnings.warn(f"icsk: training waited {waited:.1f} s for a background worker at idle priority: other "
                      "processes keep the CPU busy, and raising its priority is not permitted here. Set "
                      "ICSK_IDLE_WORKERS=0 to run icsk's workers at normal priority.", RuntimeWarning, stacklevel=3)
