"""Running a compiled CPU kernel on torch's own OpenMP team.

When torch's intra-op threads take every core, torch's idle OpenMP workers spin between
parallel regions, so a thread of anyone else's (a numba pool's, a second OpenMP runtime's)
only gets a core by displacing one of them, and training then waits for it. A kernel that
must run on the training thread can still use every core: handed to ``GOMP_parallel`` of the
OpenMP runtime torch itself uses, it runs on the training thread and on those same workers,
exactly as torch's own parallel regions do (measured: the staged reductions of the MLP
benchmark took 3.1 instead of 5.3 µs per layer and step on 2 cores, and take 2.0 instead of
3.0 µs since the sorting network runs in registers; reports/benchmarks.md).

:func:`torch_team` finds that runtime (Linux, torch built with OpenMP) and proves it is the one
torch uses: a thread count set in it must show through torch. Anywhere else it returns None
and callers run their kernel another way (the lanes kernel serially, the conv kernel on numba's
threads). ``ICSK_OMP_TEAM=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

from .kernels import env_flag

_RUNTIMES = ("libgomp", "libiomp5", "libomp")  # GNU's, Intel's and LLVM's; all three export GOMP_parallel


class Team:
    """torch's OpenMP runtime, loaded already: ``run`` starts a parallel region on it."""

    def __init__(self, lib: ctypes.CDLL, path: str):
        self.path = path
        self._parallel = lib.GOMP_parallel
        self._parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        self._parallel.restype = None

    def run(self, fn_address: int, data_address: int, threads: int) -> None:
        """Call the C function ``void fn(void *data)`` on ``threads`` threads of the team (this one
        included) and return when all have returned; the GIL is released meanwhile."""
        self._parallel(fn_address, data_address, threads, 0)


def _mapped_runtimes() -> list[str]:
    """Paths of OpenMP runtimes mapped into this process, torch's own directory first."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    paths = {line.split(None, 5)[5] for line in maps.splitlines() if line.count(" ") >= 5 and "/" in line}
    found = [p for p in paths if os.path.basename(p).startswith(_RUNTIMES) and ".so" in os.path.basename(p)]
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    return sorted(found, key=lambda p: (not p.startswith(torch_lib), p))


def _is_torchs(lib: ctypes.CDLL) -> bool:
    """Whether ``lib`` is the runtime torch runs on: a thread count set in it must show through
    torch (set back at once; nothing else, such as MKL's count, is touched)."""
    # (torch sets its count on this thread up first: _find_team asked torch for its parallel_info,
    # so ``before`` is torch's count here, not the runtime's default)
    get, put = lib.omp_get_max_threads, lib.omp_set_num_threads
    get.argtypes, get.restype = [], ctypes.c_int
    put.argtypes, put.restype = [ctypes.c_int], None
    before = get()
    probe = torch.get_num_threads() + 1
    put(probe)
    try:
        return torch.get_num_threads() == probe
    finally:
        put(before)


@functools.cache
def _find_team() -> Team | None:
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    for path in _mapped_runtimes():
        try:  # RTLD_NOLOAD: only a runtime that is loaded already
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            lib.GOMP_parallel  # noqa: B018 (raises AttributeError when missing)
        except (OSError, AttributeError):
            continue
        if _is_torchs(lib):
            return Team(lib, path)
    return None


def torch_team() -> Team | None:
    """torch's OpenMP team for the calling thread, or None (not found, or ``ICSK_OMP_TEAM=0``)."""
    if not env_flag("ICSK_OMP_TEAM", True) or not hasattr(os, "RTLD_NOLOAD"):
        return None
    return _find_team()
