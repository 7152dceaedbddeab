"""Fused CPU kernels (numba): per-unit statistics of conv activations in one pass, and of
dense activations (one value per unit and sample) with quantiles from a sorting network.

On the CPU, torch computes each statistic as its own pass over the activation (plus a
single-threaded ``bincount`` for histograms): about 18 ms for the mean, var and histogram of a
128x64x32x32 conv output on 2 cores. :func:`scan` reads each unit's values once and produces
mean, var, min, max, frac_sat, frac_zero, nonfinite and the histogram together (about 5.5 ms for
the same tensor; see reports/benchmarks.md). It takes units in groups whose rows of one sample
(a row is one sample's S spatial values) are adjacent in memory, about 32 KB, and walks the
samples: the reads stream, where a row at a time jumped a page per row and ran at a third of
the speed. Groups are shared out across torch's OpenMP team (:mod:`icsk.omp_team`; numba's own
threads where there is none). Every statistic is a loop over a row that LLVM
vectorises, except the histogram's counting, which goes to eight sub-histograms in turn so that
neighbouring values rarely wait on the same counter (one, for units with fewer values than that
has counters). A finite row sum proves a row free of NaN and inf, so values are checked one by
one only in rows whose sums are not finite. Rows of a single value go to :func:`scan_lanes`
or the torch path instead.

Numerics: row sums are float32 around a per-unit shift (the mean of the unit's first row),
accumulated across rows in float64, so the one-pass variance does not cancel. Histogram bins
use exactly the float32 operations of :meth:`icsk.stats.Reducer._histogram`, so both paths put
every value in the same bin. NaN propagates to mean/var/min/max like torch's reductions.
:func:`scan_lanes` and the torch path use the corrected two-pass algorithm (the deviations from
the first mean are summed as well as squared), so their variance does not cancel either.

:func:`scan_lanes` handles the other common case, activations of shape (N, C) such as an MLP's
(``S == 1``): a unit's N values are strided by C, so it works on units as SIMD lanes instead. The
K stacked steps are copied a few at a time into a block [N, kb*C] of about 512 lanes (unit j of
the block's step s is lane s*C + j; the block stays in L2), every statistic is a pass over rows
vectorised across lanes, and quantiles come from a Batcher odd-even merge sorting network
(pruned to the order statistics the quantiles need) applied to all lanes at once: about 3 us
per step for 100 units of a batch of 60 (64 steps per call, the MLP benchmark's statistics),
against 25 us for the torch path's transposing copy, moments and NumPy's SIMD sort of each
unit's row. The network's first phases, which sort groups of 16 values, run in registers, 16
lanes by 16 lanes (:func:`_sort_group`, explicit vectors: one load and one store per value);
the merges that follow (:func:`sorting_network` with ``presorted=16``) compare rows a tile of
64 lanes at a time, so that a tile's rows stay in L1 through the whole merge. Rows are padded
to whole tiles and 64-byte aligned: a vector that straddles two cache lines costs twice. For
the MLP's 60 values the sorting went from 3.3 to 1.4 us per step and the whole kernel from 5.1
to 3.0 us (single-threaded; see reports/benchmarks.md). With ``threads`` > 1 the blocks are
shared out across torch's own OpenMP team (:mod:`icsk.omp_team`) by a compiled C callback
(:func:`_lane_worker_address`), each thread taking the next block from an atomic counter.

numba is optional: without it (or with ``ICSK_FUSED=0``, read when a Recorder or
:class:`icsk.stats.Reducer` is made) icsk uses the torch path. Kernels
compile on first use (seconds each, cached on disk afterwards; a first call that takes longer
than ``COMPILE_NOTICE_S`` prints why training stalls).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

MIN_ROW = 2  # rows (spatial positions per sample) shorter than this stay on the torch path (or go to scan_lanes)
MAX_NETWORK_ROWS = 256  # scan_lanes sorts up to this many values per unit with a network
_LANE_BLOCK = 512  # lanes per block: N x 512 float32 values stay in L2
SORT_GROUP = 16  # scan_lanes sorts groups of this many values per unit in registers, then merges them
_TILE = 64  # lanes per tile of the merges (a tile's rows stay in L1)
# sizes and arrays (the last two: flags and parameters, see _TeamCall) the team workers receive
_LANE_SIZES, _LANE_ARRAYS = 9, 9  # scan_lanes -> _lane_worker
_UNIT_SIZES, _UNIT_ARRAYS = 7, 6  # scan -> _unit_worker
_TEAM_SLOTS = 3  # after those: the work counter's address, the counter, the count of finished items
_GROUP_VALUES = 8192  # scan reads about this many adjacent values (32 KB) of one sample at a time
_GROUP_HIST_BYTES = 256 * 1024  # at most this much sub-histogram memory per group
_parallel_lock = threading.Lock()  # numba's default threading layer must not run two parallel kernels at once


try:
    import numba
    from llvmlite import ir
    from numba import carray, cfunc, njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic
except ImportError:  # optional: the torch path is used instead
    numba = None


def env_flag(name: str, default: bool) -> bool:
    """An on/off environment switch: unset or empty gives ``default``, 0/false/no/off (any case)
    False, anything else True."""
    value = os.environ.get(name, "").strip().lower()
    return default if not value else value not in ("0", "false", "no", "off")


def available() -> bool:
    """Whether icsk uses the fused kernels (numba importable and not disabled by ``ICSK_FUSED=0``;
    a :class:`icsk.stats.Reducer` reads this when it is made)."""
    return numba is not None and env_flag("ICSK_FUSED", True)


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

    @njit(cache=True, nogil=True, inline="always")
    def _running_min_max(row, lo, hi):  # pragma: no cover - compiled
        """``lo[i] = min(lo[i], row[i])`` and ``hi[i] = max(...)``, vectorised: a select plus
        "+ 0" keeps LLVM from masked stores (slow on AMD); it turns -0.0 into +0.0. NaN is
        skipped here (callers count it and report NaN)."""
        f0 = np.float32(0.0)
        for i in range(row.shape[0]):
            v = row[i]
            a = lo[i]
            b = hi[i]
            lo[i] = (v if v < a else a) + f0
            hi[i] = (v if v > b else b) + f0

    @njit(cache=True, nogil=True, inline="always")
    def _bin(v, origin, scale, top, drop):  # pragma: no cover - compiled
        """Histogram bin of v: the same float32 ops as the torch path; NaN -> ``drop``."""
        t = (v - origin) * scale
        t = min(max(t, np.float32(0.0)), top)
        return np.int32(t) if t == t else drop

    @njit(cache=True, nogil=True)
    def _row_nonfinite(row):  # pragma: no cover - compiled
        """NaN and +-inf counts of ``row`` (run only for rows whose sums are not finite)."""
        n_nan = 0
        n_inf = 0
        for i in range(row.shape[0]):
            v = row[i]
            n_nan += v != v
            n_inf += abs(v) == np.inf
        return n_nan, n_inf

    @njit(cache=True, nogil=True)
    def _units(x, k, c0, c1, nsub, flags, origin, scale, nbins, sat, eps, moments, extra, hist):  # pragma: no cover - compiled
        """Statistics of units ``c0 <= c < c1`` at stacked step ``k`` of ``x`` [K, N, C, S],
        sample by sample: the group's rows of one sample are adjacent in memory, so the scan
        streams instead of jumping a page per row."""
        want_min_max, want_sat, want_zero, want_nonfinite, want_hist = flags[0], flags[1], flags[2], flags[3], flags[4]
        N, S = x.shape[1], x.shape[3]
        G = c1 - c0
        f0 = np.float32(0.0)
        top = np.float32(nbins + 1)
        drop = nbins + 2  # NaN's bin, left out of the counts
        width = nbins + 3
        shift = np.zeros(G, dtype=np.float32)
        s1 = np.zeros(G)
        s2 = np.zeros(G)
        counts = np.zeros((G, 4), dtype=np.int64)  # |x| > sat, |x| <= eps, NaN, +-inf
        codes = np.empty(S, dtype=np.int32)
        sub = np.zeros((G, nsub * width if want_hist else 0), dtype=np.int64)
        mns = np.full((G, S if want_min_max else 0), np.inf, dtype=np.float32)  # running min / max
        mxs = np.full((G, S if want_min_max else 0), -np.inf, dtype=np.float32)  # per position in a row
        for g in range(G):
            t = np.float32(0.0)
            for i in range(S):
                t += x[k, 0, c0 + g, i]
            t /= np.float32(S)
            shift[g] = t if np.isfinite(t) else f0
        for n in range(N):
            for g in range(G):
                row = x[k, n, c0 + g]
                a1, a2 = _row_sums(row, shift[g])
                s1[g] += a1
                s2[g] += a2
                if (want_min_max or want_nonfinite) and not (np.isfinite(a1) and np.isfinite(a2)):
                    a, b = _row_nonfinite(row)  # a finite sum proves a finite row
                    counts[g, 2] += a
                    counts[g, 3] += b
                if want_min_max:
                    _running_min_max(row, mns[g], mxs[g])
                if want_sat:
                    m = 0
                    for i in range(S):
                        m += abs(row[i]) > sat
                    counts[g, 0] += m
                if want_zero:
                    m = 0
                    for i in range(S):
                        m += abs(row[i]) <= eps
                    counts[g, 1] += m
                if want_hist:
                    for i in range(S):
                        codes[i] = _bin(row[i], origin, scale, top, drop)
                    h = sub[g]
                    if nsub == 8:  # neighbours rarely hit the same counter; unsigned: no wraparound test
                        for i in range(S):  # (a constant mask: unrolled by 8, the offsets are constants)
                            h[np.uint64(codes[i]) + np.uint64(i & 7) * np.uint64(width)] += 1
                    else:
                        for i in range(S):
                            h[np.uint64(codes[i])] += 1
        m = N * S
        for g in range(G):
            c = c0 + g
            moments[k, c, 0] = shift[g] + s1[g] / m
            moments[k, c, 1] = (s2[g] - s1[g] * s1[g] / m) / (m - 1) if m > 1 else np.nan
            mn = np.float32(np.inf)
            mx = np.float32(-np.inf)
            if want_min_max:
                for i in range(S):
                    mn = min(mn, mns[g, i])
                    mx = max(mx, mxs[g, i])
            if counts[g, 2] > 0:
                mn = np.nan
                mx = np.nan
            extra[k, c, 0] = mn
            extra[k, c, 1] = mx
            extra[k, c, 2] = counts[g, 0] / m
            extra[k, c, 3] = counts[g, 1] / m
            extra[k, c, 4] = counts[g, 2] + counts[g, 3]
            if want_hist:
                for b in range(nbins + 2):
                    t = 0
                    for j in range(nsub):
                        t += sub[g, j * width + b]
                    hist[k, c, b] = t

    @njit(cache=True, nogil=True)
    def _scan_serial(x, group, nsub, flags, origin, scale, nbins, sat, eps, moments, extra, hist):  # pragma: no cover
        C = x.shape[2]
        per_step = -(-C // group)
        for j in range(x.shape[0] * per_step):
            c0 = (j % per_step) * group
            _units(x, j // per_step, c0, min(c0 + group, C), nsub, flags, origin, scale, nbins, sat, eps, moments, extra, hist)

    @njit(cache=True, nogil=True, parallel=True)
    def _scan_parallel(x, group, nsub, flags, origin, scale, nbins, sat, eps, moments, extra, hist):  # pragma: no cover
        C = x.shape[2]
        per_step = -(-C // group)
        for j in prange(x.shape[0] * per_step):
            c0 = (j % per_step) * group
            _units(x, j // per_step, c0, min(c0 + group, C), nsub, flags, origin, scale, nbins, sat, eps, moments, extra, hist)

    # The two intrinsics below read and write a block through raw addresses (its ``ctypes.data``,
    # which escapes), so LLVM must assume they touch the block; the kernels' own loops over it
    # are therefore never reordered across them.
    @intrinsic
    def _sort_group(typingctx, address, stride):  # pragma: no cover - compiled
        """Sort :data:`SORT_GROUP` rows of 16 float32 lanes each (row r at ``address + r * stride``
        bytes, 64-byte aligned) lane by lane, in registers: one load and one store per row instead
        of two of each per comparator. Comparators as in :func:`_lane_block`'s network (the
        smaller value first unless ``b < a`` holds, which NaN never does)."""
        def codegen(context, builder, sig, args):
            vec, i64 = ir.VectorType(ir.FloatType(), 16), ir.IntType(64)
            rows = [builder.inttoptr(builder.add(args[0], builder.mul(args[1], ir.Constant(i64, r))), vec.as_pointer())
                    for r in range(SORT_GROUP)]
            v = [builder.load(r, align=64) for r in rows]
            for a, b in sorting_network(SORT_GROUP).tolist():
                lt = builder.fcmp_ordered("<", v[b], v[a])
                v[a], v[b] = builder.select(lt, v[b], v[a]), builder.select(lt, v[a], v[b])
            for r, value in zip(rows, v):
                builder.store(value, r, align=64)
            return context.get_dummy_value()
        return types.void(address, stride), codegen

    @intrinsic
    def _compare_tile(typingctx, a, b):  # pragma: no cover - compiled
        """One comparator on a tile of 64 lanes (four vectors, 64-byte aligned) of the rows at
        addresses ``a`` and ``b``: the smaller value of each lane to ``a``, the larger to ``b``."""
        def codegen(context, builder, sig, args):
            vec, i64 = ir.VectorType(ir.FloatType(), 16), ir.IntType(64)
            for q in range(_TILE // 16):
                pa, pb = (builder.inttoptr(builder.add(r, ir.Constant(i64, 64 * q)), vec.as_pointer()) for r in args)
                u, w = builder.load(pa, align=64), builder.load(pb, align=64)
                lt = builder.fcmp_ordered("<", w, u)
                builder.store(builder.select(lt, w, u), pa, align=64)
                builder.store(builder.select(lt, u, w), pb, align=64)
            return context.get_dummy_value()
        return types.void(a, b), codegen

    @njit(cache=True, nogil=True)
    def _lane_scratch(N, W):  # pragma: no cover - compiled
        """A lane block and the per-lane sums and counts :func:`_lane_block` works in. The block
        has N rows of W lanes, padded: rows to whole sort groups with +inf (which sorts last, as
        if absent), lanes to whole tiles with zeros, and a row length 16 lanes more than that so
        that the rows of one tile do not all fall in the same few L1 cache sets; every row is
        64-byte aligned. Lanes past a short last block keep old values, whose results are dropped."""
        lanes = -(-W // _TILE) * _TILE
        rows = -(-N // SORT_GROUP) * SORT_GROUP
        raw = np.zeros(rows * (lanes + 16) + 16, np.float32)
        start = (-(raw.ctypes.data // 4)) % 16
        blk = raw[start:start + rows * (lanes + 16)].reshape((rows, lanes + 16))
        blk[N:] = np.inf
        return blk, np.empty((6, lanes + 16), np.float32), np.empty((4, lanes + 16), np.int32)

    @njit(cache=True, nogil=True)
    def _lane_block(x, b, kb, comps, qlo, qhi, qfrac, flags, origin, scale, nbins, sat, eps,
                    res, hist, blk, sums, counts):  # pragma: no cover - compiled
        """Statistics of block ``b`` (steps ``b*kb`` to ``b*kb + kb - 1``) of ``x`` [K, N, C] into
        ``res[s, k*C + c]`` (s runs over LANE_OUTPUTS, then the quantiles). The block is copied to
        ``blk`` (:func:`_lane_scratch`: N rows of kb*C lanes, padded; unit c of the block's step j
        is lane j*C + c), small enough to stay in cache, where every statistic is a pass over rows
        vectorised across lanes, and the sorting network reorders each lane in place: groups of
        SORT_GROUP rows sorted in registers, then merged by ``comps``, partial."""
        want_min_max, want_sat, want_zero, want_hist = flags[0], flags[1], flags[2], flags[4]
        K, N, C = x.shape
        W = kb * C
        R = blk.shape[1]  # lanes in a row (W, padded): the passes run over them all, without a remainder loop
        L = R - 16  # lanes of the network's tiles
        f0 = np.float32(0.0)
        top = np.float32(nbins + 1)
        drop = nbins + 2
        s1, s2, c1, mean, mn, mx = sums[0], sums[1], sums[2], sums[3], sums[4], sums[5]
        n_nan, n_inf, n_sat, n_zero = counts[0], counts[1], counts[2], counts[3]
        o = b * W
        for j in range(min(kb, K - b * kb)):  # the block's steps, side by side
            for n in range(N):
                src = x[b * kb + j, n]
                dst = blk[n]
                for c in range(C):
                    dst[j * C + c] = src[c]
        s1[:] = 0.0
        s2[:] = 0.0
        c1[:] = 0.0
        mn[:] = np.inf
        mx[:] = -np.inf
        n_nan[:] = 0
        n_inf[:] = 0
        n_sat[:] = 0
        n_zero[:] = 0
        for n in range(N):  # pass 1: sums and counts, vectorised across lanes
            r = blk[n]
            for i in range(R):
                s1[i] += r[i]
            if want_min_max:
                _running_min_max(r, mn, mx)
            if want_sat:
                for i in range(R):
                    n_sat[i] += abs(r[i]) > sat
            if want_zero:
                for i in range(R):
                    n_zero[i] += abs(r[i]) <= eps
            if want_hist:
                for i in range(W):
                    hist[o + i, _bin(r[i], origin, scale, top, drop)] += 1
        finite = True  # NaN and inf propagate into the sum: a finite sum proves a finite lane
        for i in range(W):
            finite &= np.isfinite(s1[i])
        if not finite:
            for n in range(N):
                r = blk[n]
                for i in range(R):
                    v = r[i]
                    n_nan[i] += v != v
                    n_inf[i] += abs(v) == np.inf
        for i in range(R):
            mean[i] = s1[i] / np.float32(N)
        for n in range(N):  # pass 2: sums of the deviations and their squares
            r = blk[n]
            for i in range(R):
                d = r[i] - mean[i]
                c1[i] += d
                s2[i] += d * d
        for i in range(W):
            # corrected two-pass (Chan, Golub & LeVeque): the deviations' own sum removes the
            # rounding of the first mean from both results, so the variance does not cancel
            # when |mean| >> std; a non-finite first mean is torch's result as it stands
            ok = np.isfinite(mean[i])
            res[0, o + i] = mean[i] + c1[i] / np.float32(N) if ok else mean[i]
            v = s2[i] - c1[i] * c1[i] / np.float32(N) if ok else s2[i]
            res[1, o + i] = v / np.float32(N - 1) if N > 1 else np.nan
            bad = n_nan[i] > 0
            res[2, o + i] = np.nan if bad else mn[i]
            res[3, o + i] = np.nan if bad else mx[i]
            res[4, o + i] = n_sat[i] / N
            res[5, o + i] = n_zero[i] / N
            res[6, o + i] = n_nan[i] + n_inf[i]
        if qlo.shape[0] > 0:  # the sorting network: groups of rows in registers, then the merges tile by tile
            base = blk.ctypes.data
            stride = blk.shape[1] * 4
            for g in range(0, N, SORT_GROUP):
                for i in range(0, L, 16):
                    _sort_group(base + g * stride + i * 4, stride)
            for t in range(0, L, _TILE):  # a tile's rows stay in L1 through the merges
                for p in range(comps.shape[0]):
                    _compare_tile(base + comps[p, 0] * stride + t * 4, base + comps[p, 1] * stride + t * 4)
        for j in range(qlo.shape[0]):
            lo = blk[qlo[j]]
            hi = blk[qhi[j]]
            f = qfrac[j]
            g = np.float32(1.0) - f
            for i in range(W):  # NumPy's lerp: from the nearer side (a finite value next to inf stays inf)
                if f == f0:
                    v = lo[i]
                elif f < np.float32(0.5):
                    v = lo[i] + (hi[i] - lo[i]) * f
                else:
                    v = hi[i] - (hi[i] - lo[i]) * g
                res[7 + j, o + i] = np.nan if n_nan[i] > 0 else v

    @njit(cache=True, nogil=True)
    def _scan_lane_blocks(x, kb, comps, qlo, qhi, qfrac, flags, origin, scale, nbins, sat, eps,
                          res, hist):  # pragma: no cover - compiled
        """Every lane block of ``x`` [K, N, C] in turn (see :func:`_lane_block`)."""
        blk, sums, counts = _lane_scratch(x.shape[1], kb * x.shape[2])
        for b in range(-(-x.shape[0] // kb)):
            _lane_block(x, b, kb, comps, qlo, qhi, qfrac, flags, origin, scale, nbins, sat, eps, res, hist,
                        blk, sums, counts)

    @intrinsic
    def _address(typingctx, value):  # pragma: no cover - compiled
        """An integer as a pointer (for :func:`numba.carray`)."""
        def codegen(context, builder, sig, args):
            return builder.inttoptr(args[0], cgutils.voidptr_t)
        return types.voidptr(value), codegen

    @intrinsic
    def _fetch_add(typingctx, address):  # pragma: no cover - compiled
        """Atomically add 1 to the int64 at ``address``; returns the value before."""
        def codegen(context, builder, sig, args):
            ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
            return builder.atomic_rmw("add", ptr, ir.Constant(ir.IntType(64), 1), "monotonic")
        return types.int64(address), codegen

    @functools.cache
    def _lane_worker_address() -> int:
        """Address of the compiled :func:`_lane_worker` (compiled, or loaded from numba's cache, on
        first use rather than at import)."""

        @cfunc(types.void(types.voidptr), cache=True)
        def _lane_worker(data):  # pragma: no cover - compiled
            """One thread's share of a parallel :func:`scan_lanes`, for ``GOMP_parallel``: ``data``
            is the int64 array :class:`_TeamCall` packs (sizes, addresses of the arrays, the
            counter's); each thread takes the next lane block from the counter until none is
            left (blocks are disjoint lanes of ``res`` and ``hist``, so threads never write the
            same value)."""
            a = carray(data, (_LANE_SIZES + _LANE_ARRAYS + _TEAM_SLOTS,), dtype=np.int64)
            K, N, C, kb, P, nq, lanes, hw, nbins = a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8]
            x = carray(_address(a[9]), (K, N, C), dtype=np.float32)
            comps = carray(_address(a[10]), (P, 2), dtype=np.int64)
            qlo = carray(_address(a[11]), (nq,), dtype=np.int64)
            qhi = carray(_address(a[12]), (nq,), dtype=np.int64)
            qfrac = carray(_address(a[13]), (nq,), dtype=np.float32)
            res = carray(_address(a[14]), (7 + nq, lanes), dtype=np.float32)
            hist = carray(_address(a[15]), (lanes if hw > 1 else 1, hw), dtype=np.float32)
            flags = carray(_address(a[16]), (5,), dtype=np.int64)
            par = carray(_address(a[17]), (4,), dtype=np.float32)  # origin, scale, sat, eps
            nb = -(-K // kb)
            blk, sums, counts = _lane_scratch(N, kb * C)
            b = _fetch_add(a[18])
            while b < nb:
                _lane_block(x, b, kb, comps, qlo, qhi, qfrac, flags, par[0], par[1], nbins, par[2], par[3], res, hist,
                            blk, sums, counts)
                _fetch_add(a[18] + 8)  # one more block done
                b = _fetch_add(a[18])

        return _lane_worker.address

    @functools.cache
    def _unit_worker_address() -> int:
        """Address of the compiled :func:`_unit_worker` (compiled or loaded on first use)."""

        @cfunc(types.void(types.voidptr), cache=True)
        def _unit_worker(data):  # pragma: no cover - compiled
            """One thread's share of a parallel :func:`scan` on torch's OpenMP team: the next
            group of units (of one stacked step) from the shared counter until none is left
            (groups write disjoint units)."""
            a = carray(data, (_UNIT_SIZES + _UNIT_ARRAYS + _TEAM_SLOTS,), dtype=np.int64)
            K, N, C, S, group, nsub, nbins = a[0], a[1], a[2], a[3], a[4], a[5], a[6]
            x = carray(_address(a[7]), (K, N, C, S), dtype=np.float32)
            moments = carray(_address(a[8]), (K, C, 2), dtype=np.float32)
            extra = carray(_address(a[9]), (K, C, 5), dtype=np.float32)
            hist = carray(_address(a[10]), (K, C, nbins + 2), dtype=np.float32)
            flags = carray(_address(a[11]), (5,), dtype=np.int64)
            par = carray(_address(a[12]), (4,), dtype=np.float32)  # origin, scale, sat, eps
            per_step = -(-C // group)
            j = _fetch_add(a[13])
            while j < K * per_step:
                c0 = (j % per_step) * group
                _units(x, j // per_step, c0, min(c0 + group, C), nsub, flags, par[0], par[1], nbins, par[2], par[3],
                       moments, extra, hist)
                _fetch_add(a[13] + 8)  # one more group done
                j = _fetch_add(a[13])

        return _unit_worker.address


COMPILE_NOTICE_S = 2.0  # a first call that takes longer than this is compiling: say so
_called: set = set()  # kernels called once in this process (compiled or loaded from numba's cache)
_noticed = False


def _call(kernel, *args):
    """``kernel(*args)``; its first call in a process compiles it (or loads it from the disk
    cache), which can take seconds per kernel after an install: a message says why training
    stalls then."""
    if kernel in _called:
        return kernel(*args)
    timer = threading.Timer(COMPILE_NOTICE_S, _compile_notice)
    timer.daemon = True
    timer.start()
    try:
        return kernel(*args)
    finally:
        timer.cancel()
        _called.add(kernel)


def _compile_notice() -> None:
    global _noticed
    if not _noticed:
        _noticed = True
        from tqdm import tqdm  # (above a progress bar, if one is showing)

        tqdm.write("icsk: compiling the CPU statistics kernels with numba (first use after an install or update, "
                   "up to a minute; cached on disk afterwards)", file=sys.stderr)


def _require_numba() -> None:
    if numba is None:
        raise RuntimeError("fused kernels unavailable: install numba (pip install numba)")


def _require_values(per_unit: int) -> None:
    if per_unit < 1:
        raise ValueError("a statistic needs at least one value per unit; got an empty batch")


def _hashable(sat, zero_eps, hist) -> tuple:
    """``sat``, ``zero_eps`` and ``hist`` as the cached plans take them: Python numbers, a tuple."""
    return (None if sat is None else float(sat), None if zero_eps is None else float(zero_eps),
            None if hist is None else (float(hist[0]), float(hist[1]), int(hist[2])))


@functools.lru_cache(maxsize=256)
def _kernel_args(min_max: bool, sat: float | None, zero_eps: float | None, nonfinite: bool,
                 hist: tuple[float, float, int] | None) -> tuple:
    """``(flags, origin, scale, nbins, sat, eps)`` as the kernels take them; a statistic not
    asked for gets a flag of False and a threshold that never counts. (Cached: the kernels only
    read them.)"""
    flags = np.array([min_max, sat is not None, zero_eps is not None, nonfinite, hist is not None])
    origin, scale, nbins = hist if hist is not None else (0.0, 1.0, 0)
    return (flags, np.float32(origin), np.float32(scale), nbins,
            np.float32(sat if sat is not None else np.inf), np.float32(zero_eps if zero_eps is not None else -1.0))


def scan(x: np.ndarray, *, min_max: bool, sat: float | None, zero_eps: float | None, nonfinite: bool,
         hist: tuple[float, float, int] | None, threads: int = 1) -> dict[str, np.ndarray]:
    """Per-unit statistics of a C-contiguous float32 array ``x`` [K, N, C, S] in one pass.

    Returns ``mean``, ``var`` and those asked for (``min``/``max``, ``frac_sat``, ``frac_zero``,
    ``nonfinite``, ``hist``), each [K, C] float32 (``hist``: [K, C, B+2] with underflow and
    overflow bins). ``hist`` is ``(origin, scale, B)``: value v falls in bin
    ``clamp(int((v - origin) * scale), 0, B+1)`` computed in float32. ``threads`` > 1 splits
    unit groups across torch's OpenMP team when called from the thread that runs torch's ops
    (:mod:`icsk.omp_team`), else across numba's threads (one such kernel at a time per process)."""
    _require_numba()
    K, N, C, S = x.shape
    _require_values(N * S)
    sat, zero_eps, hist = _hashable(sat, zero_eps, hist)
    nbins = hist[2] if hist is not None else 0
    moments = np.empty((K, C, 2), np.float32)
    extra = np.empty((K, C, 5), np.float32)
    counts = np.empty((K, C, nbins + 2), np.float32)
    threads = max(1, int(threads))
    group = min(_GROUP_VALUES // S, -(-K * C // (2 * threads)))  # about two groups per thread or more
    # eight sub-histograms per unit, or one when a unit has fewer values than eight would have counters
    nsub = 8 if N * S >= 8 * (nbins + 3) else 1  # _units handles exactly these two values
    if hist is not None:  # keep a group's int64 sub-histograms within L2
        group = min(group, _GROUP_HIST_BYTES // (8 * nsub * (nbins + 3)))
    group = max(1, group)
    kargs = _kernel_args(bool(min_max), sat, zero_eps, bool(nonfinite), hist)
    args = (x, group, nsub, *kargs, moments, extra, counts)
    groups = K * -(-C // group)
    team = _team_for(threads, groups, x)
    if team is not None:
        _TeamCall((K, N, C, S, group, nsub, nbins), (None,) * 4, kargs).run(
            team, _unit_worker_address, threads, groups, x, moments, extra, counts)
    elif threads > 1 and _parallel_lock.acquire(blocking=False):  # no team found: numba's own threads
        try:
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            _call(_scan_parallel, *args)
        finally:
            _parallel_lock.release()
    else:
        _call(_scan_serial, *args)
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


@functools.lru_cache(maxsize=64)
def sorting_network(n: int, ranks: tuple[int, ...] | None = None, presorted: int = 1) -> np.ndarray:
    """Comparators ``[P, 2]`` (i < j: min to i, max to j) of Batcher's odd-even merge sort of
    ``n`` values; with ``ranks``, only those that the order statistics at ``ranks`` depend on;
    with ``presorted`` (a power of two), without those that sort each group of that many values
    (indices ``g * presorted`` to ``g * presorted + presorted - 1``), for a caller that sorts the
    groups itself first: the merges of the groups follow.

    The network for the next power of two is cut to ``n`` inputs by dropping every comparator
    that touches an index >= n (as if those held +inf, which no comparator moves). Pruning only
    drops comparators that no needed position depends on, so putting back dropped comparators
    of the same full network, in its order (such as all of the group sorts), gives the same
    order statistics."""
    size = 1
    while size < n:
        size *= 2
    comps = []  # (a, b, size of the groups the comparator's merge produces)
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and b < n:
                        comps.append((a, b, 2 * p))
            k //= 2
        p *= 2
    if ranks is not None:  # walk backwards, keeping comparators that feed a needed position
        needed, kept = set(ranks), []
        for a, b, g in reversed(comps):
            if a in needed or b in needed:
                kept.append((a, b, g))
                needed.update((a, b))
        comps = kept[::-1]
    return np.array([(a, b) for a, b, g in comps if g > presorted], dtype=np.int64).reshape(-1, 2)


def quantile_positions(m: int, quantiles) -> tuple[list[int], list[int], list[float]]:
    """Order statistics and weights of linear-interpolation quantiles (NumPy's default) of m
    values: quantile q = v[lo] + (v[hi] - v[lo]) * frac, computed from v[hi] when frac >= 0.5
    (v[hi] - (v[hi] - v[lo]) * (1 - frac)), as NumPy does."""
    pos = [q * (m - 1) for q in quantiles]
    lo = [int(np.floor(p)) for p in pos]
    hi = [min(i + 1, m - 1) for i in lo]
    return lo, hi, [p - i for p, i in zip(pos, lo, strict=True)]


@functools.lru_cache(maxsize=64)
def _quantile_plan(n: int, quantiles: tuple[float, ...]) -> tuple[np.ndarray, ...]:
    """(comparators, lo, hi, frac) arrays of :func:`scan_lanes` for n values per unit: the
    comparators merge the groups of SORT_GROUP values that it sorts in registers first."""
    lo, hi, frac = quantile_positions(n, quantiles)
    comps = (sorting_network(n, tuple(sorted(set(lo + hi))), presorted=SORT_GROUP) if quantiles
             else np.zeros((0, 2), np.int64))
    return comps, np.array(lo, np.int64), np.array(hi, np.int64), np.array(frac, np.float32)


LANE_OUTPUTS = ("mean", "var", "min", "max", "frac_sat", "frac_zero", "nonfinite")


def scan_lanes(x: np.ndarray, *, quantiles: tuple[float, ...], min_max: bool, sat: float | None,
               zero_eps: float | None, hist: tuple[float, float, int] | None, threads: int = 1) -> dict[str, np.ndarray]:
    """Per-unit statistics of a float32 array ``x`` [K, N, C] (one value per unit and sample):
    the outputs of :func:`scan` plus ``q{q}`` for each of ``quantiles``, each [K, C].

    ``N`` must be at most :data:`MAX_NETWORK_ROWS`; ``x`` is left unchanged. ``threads`` > 1
    splits the lane blocks of a C-contiguous ``x`` across torch's OpenMP team
    (:mod:`icsk.omp_team`; serially where there is none): call it from the thread that runs
    torch's ops, whose team it borrows."""
    _require_numba()
    K, N, C = x.shape
    _require_values(N)
    if N > MAX_NETWORK_ROWS:
        raise ValueError(f"scan_lanes sorts at most {MAX_NETWORK_ROWS} values per unit, got {N}")
    plan = _lane_plan(K, N, C, tuple(quantiles), bool(min_max), *_hashable(sat, zero_eps, hist))
    res = np.empty((plan.rows, plan.lanes), np.float32)
    counts = np.zeros((plan.lanes, hist[2] + 3), np.float32) if hist is not None else _NO_HIST
    team = _team_for(threads, plan.blocks, x)
    if team is not None:
        plan.team_call.run(team, _lane_worker_address, threads, plan.blocks, x, res, counts)
    else:
        _call(_scan_lane_blocks, x, plan.kb, *plan.network, *plan.kargs, res, counts)
    n = K * C
    out = {name: res[row, :n].reshape(K, C) for name, row in plan.outputs}
    if hist is not None:  # its last column took the NaN values, which are dropped
        out["hist"] = counts[:n, : hist[2] + 2].reshape(K, C, hist[2] + 2)
    return out


_NO_HIST = np.zeros((1, 1), np.float32)  # the histogram counts of a scan_lanes call without one (never written)


class _LanePlan(NamedTuple):
    """What :func:`scan_lanes` needs besides the data, for one shape and set of statistics."""

    kb: int  # steps per lane block
    blocks: int
    lanes: int  # blocks * kb * C: the results' columns
    rows: int  # the results' rows: LANE_OUTPUTS, then the quantiles
    network: tuple[np.ndarray, ...]  # comparators, lo, hi, frac (:func:`_quantile_plan`)
    kargs: tuple
    outputs: tuple[tuple[str, int], ...]  # (name, row) of each output asked for
    team_call: _TeamCall  # its x, results and histogram counts given per call


@functools.lru_cache(maxsize=64)
def _lane_plan(K: int, N: int, C: int, quantiles: tuple[float, ...], min_max: bool, sat: float | None,
               zero_eps: float | None, hist: tuple[float, float, int] | None) -> _LanePlan:
    """The :class:`_LanePlan` of a call (cached: a Recorder makes the same call every K steps)."""
    kb, blocks = _lane_blocks(K, C)
    network = _quantile_plan(N, quantiles)
    kargs = _kernel_args(min_max, sat, zero_eps, True, hist)
    lanes = blocks * kb * C
    want = (True, True, min_max, min_max, sat is not None, zero_eps is not None, True)
    outputs = tuple((name, i) for i, name in enumerate(LANE_OUTPUTS) if want[i]) + tuple(
        (f"q{q:g}", len(LANE_OUTPUTS) + j) for j, q in enumerate(quantiles))
    nbins = hist[2] if hist is not None else 0
    sizes = (K, N, C, kb, len(network[0]), len(quantiles), lanes, nbins + 3 if hist is not None else 1, nbins)
    team_call = _TeamCall(sizes, (None, *network, None, None), kargs)
    return _LanePlan(kb, blocks, lanes, len(LANE_OUTPUTS) + len(quantiles), network, kargs, outputs, team_call)


def _team_for(threads: int, items: int, x: np.ndarray):
    """torch's OpenMP team for a parallel kernel over ``items`` work items of ``x``, or None."""
    if threads < 2 or items < 2 or not x.flags.c_contiguous or x.dtype != np.float32:  # (what the workers read)
        return None
    from .omp_team import torch_team  # (imports this module)

    return torch_team()


class _TeamCall:
    """The argument block of a compiled team worker, packed once: an int64 array of ``sizes``,
    the addresses of ``arrays`` (None marks one given to each :meth:`run`) and of the flags and
    float32 parameters (origin, scale, sat, eps) of ``kargs`` (:func:`_kernel_args`), the
    address of the work counter that follows, the counter (0) and the count of finished items.
    Packing it once matters: each address costs about a microsecond of Python, and in training
    the interpreter runs this code cold, several times slower."""

    def __init__(self, sizes: tuple[int, ...], arrays: tuple[np.ndarray | None, ...], kargs: tuple):
        flags, origin, scale, _, sat, eps = kargs
        arrays = (*arrays, flags.astype(np.int64), np.array([origin, scale, sat, eps], np.float32))
        self._keep = arrays  # (alive as long as their addresses are in the template)
        self._slots = [len(sizes) + i for i, a in enumerate(arrays) if a is None]
        self._n = len(sizes) + len(arrays)
        self._template = np.array([*sizes, *(0 if a is None else a.ctypes.data for a in arrays), 0, 0, 0], np.int64)

    def run(self, team, worker_address: Callable[[], int], threads: int, items: int, *arrays: np.ndarray) -> None:
        """Run the worker (its address from ``worker_address``) on up to ``threads`` threads of
        ``team`` over ``items`` work items, with ``arrays`` (C-contiguous, alive until this
        returns) in the open slots. The finished items must reach ``items``: an error inside a
        compiled callback is printed, not raised, and would otherwise leave results unwritten."""
        args = self._template.copy()
        for i, a in zip(self._slots, arrays, strict=True):
            args[i] = a.ctypes.data
        n = self._n
        args[n] = args.ctypes.data + 8 * (n + 1)
        team.run(_call(worker_address), args.ctypes.data, min(threads, items))
        if args[n + 2] != items:
            raise RuntimeError(f"icsk: a CPU statistics kernel stopped after {args[n + 2]} of {items} work items on "
                               "torch's OpenMP team (its error is printed above); set ICSK_OMP_TEAM=0 to run it "
                               "without the team and see the error raised")


def _lane_blocks(K: int, C: int) -> tuple[int, int]:
    """(steps per lane block, number of blocks): a block holds whole steps, ~_LANE_BLOCK lanes."""
    kb = max(1, min(K, _LANE_BLOCK // C))
    return kb, -(-K // kb)
