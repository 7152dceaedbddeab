"""Fused one-pass CPU kernels (numba) for the per-unit "scan" statistics of conv activations.

On the CPU, torch computes each statistic as its own pass over the activation (plus a
single-threaded ``bincount`` for histograms): about 18 ms for the mean, var and histogram of a
128x64x32x32 conv output on 2 cores. :func:`scan` reads each unit's values once, row by row (a
row is one sample's S spatial values, small enough to stay in L1), and produces mean, var, min,
max, frac_sat, frac_zero, nonfinite and the histogram together, units split across threads
(about 8 ms for the same tensor; see reports/benchmarks.md).

Numerics: row sums are float32 around a per-unit shift (the mean of the unit's first row),
accumulated across rows in float64, so the one-pass variance does not cancel. Histogram bins
use exactly the float32 operations of :meth:`icsk.stats.Reducer._histogram`, so both paths put
every value in the same bin. NaN propagates to mean/var/min/max like torch's reductions.

numba is optional: without it (or with ``ICSK_FUSED=0``) icsk uses the torch path. Kernels
compile on first use (a few seconds, cached on disk afterwards).
"""

from __future__ import annotations

import os
import threading

import numpy as np

MIN_ROW = 16  # rows (spatial positions per sample) shorter than this stay on the torch path
_parallel_lock = threading.Lock()  # numba's default threading layer must not run two parallel kernels at once


try:
    import numba
    from numba import njit, prange
except ImportError:  # optional: the torch path is used instead
    numba = None


def available() -> bool:
    """Whether the fused kernels can run (numba importable and not disabled by ``ICSK_FUSED=0``)."""
    return numba is not None and os.environ.get("ICSK_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")


if numba is not None:

    @njit(cache=True, fastmath={"reassoc"}, nogil=True)
    def _row_sums(row, shift):  # pragma: no cover - compiled
        """Sum and sum of squares of ``row - shift`` (float32, vectorised)."""
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        for i in range(row.shape[0]):
            d = row[i] - shift
            a1 += d
            a2 += d * d
        return a1, a2

    @njit(cache=True, nogil=True)
    def _unit(x, k, c, flags, origin, scale, nbins, sat, eps, moments, extra, hist):  # pragma: no cover - compiled
        """Statistics of unit ``c`` at stacked step ``k`` of ``x`` [K, N, C, S]."""
        want_min_max, want_sat, want_zero, want_nonfinite, want_hist = flags[0], flags[1], flags[2], flags[3], flags[4]
        N, S = x.shape[1], x.shape[3]
        shift = np.float32(0.0)
        for i in range(S):
            shift += x[k, 0, c, i]
        shift /= np.float32(S)
        if not np.isfinite(shift):
            shift = np.float32(0.0)
        s1 = 0.0
        s2 = 0.0
        mn = np.inf
        mx = -np.inf
        n_sat = 0
        n_zero = 0
        n_nan = 0
        n_inf = 0
        top = np.float32(nbins + 1)
        drop = nbins + 2  # NaN's bin, left out of the counts
        codes = np.empty(S, dtype=np.int32)
        sub = np.zeros((4, nbins + 3), dtype=np.int64)
        for n in range(N):
            row = x[k, n, c]
            a1, a2 = _row_sums(row, shift)
            s1 += a1
            s2 += a2
            if want_min_max or want_nonfinite:
                for i in range(S):
                    v = row[i]
                    if v != v:
                        n_nan += 1
                    elif v == np.inf or v == -np.inf:
                        n_inf += 1
                    if v < mn:
                        mn = v
                    if v > mx:
                        mx = v
            if want_sat:
                for i in range(S):
                    if abs(row[i]) > sat:
                        n_sat += 1
            if want_zero:
                for i in range(S):
                    if abs(row[i]) <= eps:
                        n_zero += 1
            if want_hist:
                for i in range(S):
                    t = (row[i] - origin) * scale  # the same float32 ops as the torch path
                    t = min(max(t, np.float32(0.0)), top)
                    codes[i] = np.int32(t) if t == t else drop
                for i in range(S):  # four sub-histograms: neighbours rarely hit the same counter
                    sub[i & 3, codes[i]] += 1
        m = N * S
        moments[k, c, 0] = shift + s1 / m
        moments[k, c, 1] = (s2 - s1 * s1 / m) / (m - 1) if m > 1 else np.nan
        if n_nan > 0:
            mn = np.nan
            mx = np.nan
        extra[k, c, 0] = mn
        extra[k, c, 1] = mx
        extra[k, c, 2] = n_sat / m
        extra[k, c, 3] = n_zero / m
        extra[k, c, 4] = n_nan + n_inf
        if want_hist:
            for b in range(nbins + 2):
                hist[k, c, b] = sub[0, b] + sub[1, b] + sub[2, b] + sub[3, b]

    @njit(cache=True, nogil=True)
    def _scan_serial(x, flags, origin, scale, nbins, sat, eps, moments, extra, hist):  # pragma: no cover
        C = x.shape[2]
        for j in range(x.shape[0] * C):
            _unit(x, j // C, j % C, flags, origin, scale, nbins, sat, eps, moments, extra, hist)

    @njit(cache=True, nogil=True, parallel=True)
    def _scan_parallel(x, flags, origin, scale, nbins, sat, eps, moments, extra, hist):  # pragma: no cover
        C = x.shape[2]
        for j in prange(x.shape[0] * C):
            _unit(x, j // C, j % C, flags, origin, scale, nbins, sat, eps, moments, extra, hist)


def scan(x: np.ndarray, *, min_max: bool, sat: float | None, zero_eps: float | None, nonfinite: bool,
         hist: tuple[float, float, int] | None, threads: int = 1) -> dict[str, np.ndarray]:
    """Per-unit statistics of a C-contiguous float32 array ``x`` [K, N, C, S] in one pass.

    Returns ``mean``, ``var`` and those asked for (``min``/``max``, ``frac_sat``, ``frac_zero``,
    ``nonfinite``, ``hist``), each [K, C] float32 (``hist``: [K, C, B+2] with underflow and
    overflow bins). ``hist`` is ``(origin, scale, B)``: value v falls in bin
    ``clamp(int((v - origin) * scale), 0, B+1)`` computed in float32. ``threads`` > 1 splits
    units across numba threads (one parallel kernel at a time per process)."""
    if not available():
        raise RuntimeError("fused kernels unavailable: install numba (pip install numba) or unset ICSK_FUSED=0")
    K, _, C, _ = x.shape
    nbins = hist[2] if hist is not None else 0
    moments = np.empty((K, C, 2), np.float32)
    extra = np.empty((K, C, 5), np.float32)
    counts = np.empty((K, C, nbins + 2), np.float32)
    flags = np.array([min_max, sat is not None, zero_eps is not None, nonfinite, hist is not None])
    args = (x, flags, np.float32(hist[0] if hist else 0.0), np.float32(hist[1] if hist else 1.0), nbins,
            np.float32(sat if sat is not None else np.inf), np.float32(zero_eps if zero_eps is not None else -1.0),
            moments, extra, counts)
    threads = min(int(threads), numba.config.NUMBA_NUM_THREADS)
    if threads > 1 and _parallel_lock.acquire(blocking=False):
        try:
            numba.set_num_threads(threads)
            _scan_parallel(*args)
        finally:
            _parallel_lock.release()
    else:
        _scan_serial(*args)
    out = {"mean": moments[..., 0], "var": moments[..., 1]}
    if min_max:
        out["min"], out["max"] = extra[..., 0], extra[..., 1]
    if sat is not None:
        out["frac_sat"] = extra[..., 2]
    if zero_eps is not None:
        out["frac_zero"] = extra[..., 3]
    if nonfinite:
        out["nonfinite"] = extra[..., 4]
    if hist is not None:
        out["hist"] = counts
    return out
