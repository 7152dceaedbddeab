"""Worker threads for the Recorder's reductions and chunk writes that stay out of training's way.

A second OpenMP team (a worker's) next to the training thread's would spin on the same cores
and slow every training step down (2.5x measured on 2 cores), so workers run torch ops on one
thread. On Linux they also run at idle priority (``SCHED_IDLE``): they use cycles the training
threads leave free and never preempt them. When training keeps every core busy, a worker still
gets its turn the moment the training thread waits for it (a full staging buffer, a flush).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch


def _init_worker() -> None:
    torch.get_num_threads()  # initializes this thread's count first (else the next op resets it)
    torch.set_num_threads(1)
    if os.environ.get("ICSK_IDLE_WORKERS", "1") != "0" and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread only
        except OSError:  # not permitted in some containers: stay at normal priority
            pass


def background_pool(name: str) -> ThreadPoolExecutor:
    """A one-worker pool whose torch ops run single-threaded at idle priority.

    torch keeps the thread count per OS thread once a thread has initialized it, so the worker
    sets 1 for itself and the process-wide default is put back afterwards."""
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(1, thread_name_prefix=name, initializer=_init_worker)
    pool.submit(lambda: None).result()  # start the worker now
    torch.set_num_threads(threads)
    return pool
