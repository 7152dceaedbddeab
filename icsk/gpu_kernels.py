"""Fused GPU kernel (Triton): per-unit statistics of activations in one read, histogram included.

On GPUs the torch path takes one ``var_mean`` pass for the moments, and six elementwise passes,
a zero fill, ``index_add_`` and a cast for a histogram, each its own kernel launch: about ten
launches per conv layer and step from the reducer thread for the VGG benchmark's statistics, a
step that the CPU's launches already bound (see reports/benchmarks.md, "Recorder overhead on a
GPU"). :func:`scan` reads each value once, in two launches:

1. ``_partials``: a program per (unit, slice of the batch) walks its samples in tiles of about
   1,024 values and keeps the count, mean and sum of squared deviations (the corrected two-pass
   algorithm within a tile, Chan, Golub & LeVeque's pairwise formula across tiles, with means
   kept as a shift plus a small offset, so the variance does not cancel), the plain sum,
   min/max, saturated, near-zero, NaN and non-finite counts, and a ``tl.histogram`` of bin codes.
2. ``_combine``: a program per unit merges its slices the same way and writes the results.

Results are those of :func:`icsk.kernels.scan` and the CPU torch path: a unit with an inf or NaN
gets the plain sum's mean (inf for infinities of one sign, where the GPU torch path's
``var_mean`` gives NaN) and a NaN variance, NaN gives NaN min/max, and histogram bins use
the float32 operations of :meth:`icsk.stats.Reducer._histogram`, so every value lands in the
same bin. :class:`icsk.stats.Reducer` uses it on CUDA tensors when Triton is installed (unless
``ICSK_TRITON=0``), for statistics besides mean and variance, which ``var_mean`` gives in one
launch: on an H100 it reduced the VGG benchmark's conv outputs 1.7x (mean, variance and a
histogram) to 2.5x (every statistic but the quantiles) faster than the torch path
(reports/benchmarks.md). Importing this module imports Triton; with ``TRITON_INTERPRET=1`` set before
Triton is first imported, the kernels run in Triton's interpreter on CPU tensors, which is how
the tests check them on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch
import triton
import triton.language as tl

_TILE = 1024  # values per tile: a program's registers hold one tile
_PROGRAMS_PER_SM = 4  # batch slices are chosen so that a launch has about this many programs per SM
_NP = 11  # partial results per (unit, slice): cnt, shift, off, m2, sum, min, max, sat, zero, nonfinite, nan
OUTPUTS = ("mean", "var", "min", "max", "frac_sat", "frac_zero", "nonfinite")
# Triton's launcher and JIT cache are not made for concurrent use; the training thread (large
# layers) and the reducer thread (staged ones) may both launch: one at a time
_launch_lock = threading.Lock()


@triton.jit
def _merge(cnt, shift, off, m2, b_cnt, b_shift, b_off, b_m2):
    """Chan et al.'s pairwise update of (count, mean, M2) by a part with b_cnt > 0 values.

    A mean is kept as ``shift + off``: ``shift`` a float32 near it (the first tile's mean), ``off``
    a small correction. The difference of two means is then (b_shift - shift) + (b_off - off),
    exact to float32 rounding of the small terms; one float32 mean per part would carry an error
    of half an ulp of the mean (5e-4 at 1e4), a few % of the variance of data with std 0.02."""
    new = cnt + b_cnt
    delta = (b_shift - shift) + (b_off - off)
    first = cnt == 0
    shift = tl.where(first, b_shift, shift)
    off = tl.where(first, b_off, off + delta * (b_cnt / new))
    m2 = tl.where(first, b_m2, m2 + b_m2 + delta * delta * (cnt * (b_cnt / new)))
    return new, shift, off, m2


@triton.jit
def _partials(x_ptr, p_ptr, h_ptr, N, C, S, s_k, s_n, s_c, s_s, per, n_split,
              origin, scale, sat, eps,
              BN: tl.constexpr, BS: tl.constexpr, NB: tl.constexpr, NBP: tl.constexpr,
              MIN_MAX: tl.constexpr, SAT: tl.constexpr, ZERO: tl.constexpr, HIST: tl.constexpr):
    """Partial results of unit ``program_id(0)`` (= k * C + c) over samples of slice ``program_id(1)``."""
    unit = tl.program_id(0)
    part = tl.program_id(1)
    k = unit // C
    base = x_ptr + k.to(tl.int64) * s_k + (unit - k * C).to(tl.int64) * s_c
    n_lo = part * per
    n_hi = tl.minimum(n_lo + per, N)
    rn = tl.arange(0, BN)
    rs = tl.arange(0, BS)
    zero = tl.sum(tl.zeros([BS], tl.float32), 0)  # a float32 scalar to start the accumulators
    cnt, shift, off, m2, total = zero, zero, zero, zero, zero
    # counts and extremes accumulate elementwise over the tiles and are reduced once at the end
    n_sat = tl.zeros([BN, BS], tl.float32)
    n_zero = tl.zeros([BN, BS], tl.float32)
    n_bad = tl.zeros([BN, BS], tl.float32)
    n_nan = tl.zeros([BN, BS], tl.float32)
    lo = tl.full([BN, BS], float("inf"), tl.float32)
    hi = tl.full([BN, BS], float("-inf"), tl.float32)
    h = tl.zeros([NBP], tl.int32)
    for n0 in range(n_lo, n_hi, BN):
        n = n0 + rn
        for s0 in range(0, S, BS):
            s = s0 + rs
            mask = (n < n_hi)[:, None] & (s < S)[None, :]
            v = tl.load(base + n.to(tl.int64)[:, None] * s_n + s.to(tl.int64)[None, :] * s_s,
                        mask=mask, other=0.0)
            t_cnt = (tl.minimum(n_hi - n0, BN) * tl.minimum(S - s0, BS)).to(tl.float32)
            t_sum = tl.sum(tl.sum(v, 1), 0)
            t_shift = t_sum / t_cnt
            d = tl.where(mask, v - t_shift, 0.0)  # corrected two-pass within the tile:
            c1 = tl.sum(tl.sum(d, 1), 0)  # the deviations' sum removes t_shift's rounding
            t_off = c1 / t_cnt
            t_m2 = tl.sum(tl.sum(d * d, 1), 0) - c1 * t_off
            cnt, shift, off, m2 = _merge(cnt, shift, off, m2, t_cnt, t_shift, t_off, t_m2)
            total += t_sum
            n_nan += (v != v).to(tl.float32)  # masked-off values load as 0: never NaN or inf
            diff = v - v  # NaN exactly where v is +-inf or NaN
            n_bad += (diff != diff).to(tl.float32)
            if MIN_MAX:
                lo = tl.where(mask & (v < lo), v, lo)
                hi = tl.where(mask & (v > hi), v, hi)
            if SAT:
                n_sat += (mask & (tl.abs(v) > sat)).to(tl.float32)
            if ZERO:
                n_zero += (mask & (tl.abs(v) <= eps)).to(tl.float32)
            if HIST:
                code = tl.minimum(tl.maximum((v - origin) * scale, 0.0), NB + 1.0).to(tl.int32)
                keep = mask & (v == v)  # NaN is counted by 'nonfinite', not binned
                h += tl.histogram(tl.reshape(code, [BN * BS], can_reorder=True), NBP,
                                  mask=tl.reshape(keep, [BN * BS], can_reorder=True))
    row = (unit * n_split + part).to(tl.int64)
    p = p_ptr + row * 11  # _NP partial results per row, in this order
    tl.store(p, cnt)
    tl.store(p + 1, shift)
    tl.store(p + 2, off)
    tl.store(p + 3, m2)
    tl.store(p + 4, total)
    tl.store(p + 5, tl.min(tl.min(lo, 1), 0))
    tl.store(p + 6, tl.max(tl.max(hi, 1), 0))
    tl.store(p + 7, tl.sum(tl.sum(n_sat, 1), 0))
    tl.store(p + 8, tl.sum(tl.sum(n_zero, 1), 0))
    tl.store(p + 9, tl.sum(tl.sum(n_bad, 1), 0))
    tl.store(p + 10, tl.sum(tl.sum(n_nan, 1), 0))
    if HIST:
        tl.store(h_ptr + row * NBP + tl.arange(0, NBP), h)


@triton.jit
def _combine(p_ptr, h_ptr, out_ptr, hist_ptr, n_units, n_split,
             NB: tl.constexpr, NBP: tl.constexpr, HIST: tl.constexpr):
    """Merges the slices of unit ``program_id(0)`` and writes its results (rows of ``OUTPUTS``)."""
    unit = tl.program_id(0)
    zero = tl.sum(tl.zeros([NBP], tl.float32), 0)
    cnt, shift, off, m2, total = zero, zero, zero, zero, zero
    n_sat, n_zero, n_bad, n_nan = zero, zero, zero, zero
    lo, hi = zero + float("inf"), zero - float("inf")
    h = tl.zeros([NBP], tl.int32)
    for j in range(0, n_split):
        row = (unit * n_split + j).to(tl.int64)
        p = p_ptr + row * 11
        cnt, shift, off, m2 = _merge(cnt, shift, off, m2, tl.load(p), tl.load(p + 1), tl.load(p + 2), tl.load(p + 3))
        total += tl.load(p + 4)
        lo = tl.minimum(lo, tl.load(p + 5))
        hi = tl.maximum(hi, tl.load(p + 6))
        n_sat += tl.load(p + 7)
        n_zero += tl.load(p + 8)
        n_bad += tl.load(p + 9)
        n_nan += tl.load(p + 10)
        if HIST:
            h += tl.load(h_ptr + row * NBP + tl.arange(0, NBP))
    finite = n_bad == 0  # else torch's results: the plain sum's mean (inf or NaN), a NaN variance
    nan = zero + float("nan")
    # finite values whose means differ by more than float32's range (3e38 and -3e38 in two
    # slices) overflow the merge: then the plain sum's mean, and an infinite variance
    merged = shift + off
    mean_ok = merged - merged == 0
    var_ok = mean_ok & (m2 - m2 == 0)  # squared deviations past float32's range: inf too
    # results divide with IEEE rounding (div_rn): a compiled '/' is an approximate division
    # (div.full.f32, up to 2 ulp), which made fractions differ from the torch path's in the last bit
    tl.store(out_ptr + unit, tl.where(finite & mean_ok, merged, tl.div_rn(total, cnt)))
    tl.store(out_ptr + n_units + unit,
             tl.where(finite, tl.where(var_ok, tl.div_rn(m2, cnt - 1.0), zero + float("inf")), nan))
    tl.store(out_ptr + 2 * n_units + unit, tl.where(n_nan > 0, nan, lo))
    tl.store(out_ptr + 3 * n_units + unit, tl.where(n_nan > 0, nan, hi))
    tl.store(out_ptr + 4 * n_units + unit, tl.div_rn(n_sat, cnt))
    tl.store(out_ptr + 5 * n_units + unit, tl.div_rn(n_zero, cnt))
    tl.store(out_ptr + 6 * n_units + unit, n_bad)
    if HIST:
        b = tl.arange(0, NBP)
        tl.store(hist_ptr + unit.to(tl.int64) * (NB + 2) + b, h.to(tl.float32), mask=b < NB + 2)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _f32(v: float) -> float:
    """``v`` rounded to float32, so compiled kernels (float32 arguments) and the interpreter agree."""
    return float(np.float32(v))


def _slices(x: torch.Tensor, units: int) -> int:
    """Samples per batch slice: enough slices for about ``_PROGRAMS_PER_SM`` programs per SM."""
    N = x.shape[1]
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    want = max(1, -(-_PROGRAMS_PER_SM * sms // units))
    return -(-N // min(N, want))


def scan(x: torch.Tensor, *, min_max: bool, sat: float | None, zero_eps: float | None, nonfinite: bool,
         hist: tuple[float, float, int] | None) -> dict[str, torch.Tensor]:
    """Per-unit statistics of a float32 tensor ``x`` [K, N, C, S] (any strides) on its device.

    Same arguments and results as :func:`icsk.kernels.scan`, as tensors on ``x``'s device: ``mean``,
    ``var`` and those asked for, each [K, C] (``hist``: [K, C, B+2]). Two kernel launches, no
    host synchronisation."""
    if x.dim() != 4 or x.dtype != torch.float32:
        raise ValueError(f"expected a float32 [K, N, C, S] tensor, got {x.dtype} of shape {tuple(x.shape)}")
    K, N, C, S = x.shape
    units = K * C
    per = _slices(x, units)
    n_split = -(-N // per)
    BS = min(_pow2(S), _TILE)
    BN = min(_pow2(per), max(1, _TILE // BS))
    B = hist[2] if hist is not None else 0
    NBP = max(32, _pow2(B + 2))  # tl.histogram: a power of two, at least a warp's width
    origin, scale = (_f32(hist[0]), _f32(hist[1])) if hist is not None else (0.0, 1.0)
    part = torch.empty((units, n_split, _NP), dtype=torch.float32, device=x.device)
    part_h = torch.empty((units, n_split, NBP) if hist is not None else (1,), dtype=torch.int32, device=x.device)
    out = torch.empty((len(OUTPUTS), K, C), dtype=torch.float32, device=x.device)
    counts = torch.empty((K, C, B + 2) if hist is not None else (1,), dtype=torch.float32, device=x.device)
    # Triton launches on the thread's current device, which the reducer thread never set
    with _launch_lock, torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _partials[(units, n_split)](
            x, part, part_h, N, C, S, *x.stride(), per, n_split, origin, scale,
            _f32(sat if sat is not None else np.inf), _f32(zero_eps if zero_eps is not None else -1.0),
            BN=BN, BS=BS, NB=B, NBP=NBP, MIN_MAX=min_max, SAT=sat is not None, ZERO=zero_eps is not None,
            HIST=hist is not None)
        _combine[(units,)](part, part_h, out, counts, units, n_split, NB=B, NBP=NBP, HIST=hist is not None)
    asked = {"min": min_max, "max": min_max, "frac_sat": sat is not None, "frac_zero": zero_eps is not None,
             "nonfinite": nonfinite}
    res = {name: out[i] for i, name in enumerate(OUTPUTS) if asked.get(name, True)}
    if hist is not None:
        res["hist"] = counts
    return res

