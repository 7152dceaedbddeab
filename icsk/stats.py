"""Per-unit statistics of activation tensors, computed on the tensor's device.

Everything here is pure tensor -> statistic. Input is a 4-D view ``[K, N, C, S]``: K stacked
steps, N batch, C units (neurons/channels), S spatial positions. A statistic of unit c at step k
is taken over the N*S values ``x[k, :, c, :]``; results are ``[K, C]`` (``[K, C, B+2]`` for
histograms). Speed notes, measured on a 2-core CPU (see reports/benchmarks.md):

* large temporaries are what costs on the CPU (page faults of fresh allocations cost ~8x the
  arithmetic), so every pass writes into scratch buffers that live as long as the Reducer;
* ``torch.var_mean`` has a slow path on small inputs; the corrected two-pass algorithm (mean,
  then the deviations' sum and sum of squares) is faster and as accurate;
* ``torch.sort`` over many short rows is ~9x slower than NumPy's SIMD sort on the CPU, so
  quantiles sort with NumPy there (zero-copy view, same memory) and with torch on GPUs;
* on GPUs every statistic but the quantiles comes from one fused Triton kernel
  (:mod:`icsk.gpu_kernels`: one read, two launches) when Triton is installed, unless
  ``ICSK_TRITON=0``; mean and variance alone come from one ``torch.var_mean`` pass. The torch
  path (no Triton) takes ``var_mean`` and one pass per other statistic, with histograms from
  ``index_add_``, since ``bincount`` syncs with the host;
* conv activations on the CPU (rows of >= 16 spatial values) get every statistic but the
  quantiles from one fused pass (:mod:`icsk.kernels`, numba) instead of one pass per statistic;
* dense activations on the CPU (one value per unit and sample, batches up to 256) get every
  statistic, quantiles included, from :func:`icsk.kernels.scan_lanes`, which treats units as
  SIMD lanes and selects the quantiles' order statistics with a sorting network; a Reducer
  without a fixed thread count (the training thread's) runs it on torch's own OpenMP team.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from . import kernels

SCALAR_STATS = ("mean", "var", "min", "max", "quantiles", "frac_sat", "frac_zero", "nonfinite")
ALL_STATS = (*SCALAR_STATS, "hist")
DEFAULT_STATS = ("mean", "var", "quantiles", "frac_sat", "frac_zero", "nonfinite")
_PARTITION_MIN_ROW = 4096  # rows at least this long select quantiles by partition, not sort


def quantile_name(q: float) -> str:
    """Column name of a quantile statistic: 0.15 -> 'q0.15'."""
    return f"q{q:g}"


@dataclass(frozen=True)
class StatSpec:
    """Which statistics to compute and their parameters."""

    stats: tuple[str, ...] = DEFAULT_STATS
    quantiles: tuple[float, ...] = (0.15, 0.5, 0.85)
    hist_bins: int = 32
    sat_threshold: float = 4.0
    zero_eps: float = 1e-6

    def __post_init__(self) -> None:
        unknown = [s for s in self.stats if s not in ALL_STATS]
        if unknown:
            raise ValueError(f"unknown statistic(s) {unknown}; choose from {list(ALL_STATS)}")
        if any(not 0.0 <= q <= 1.0 for q in self.quantiles):
            raise ValueError(f"quantiles must lie in [0, 1], got {self.quantiles}")
        if "quantiles" in self.stats and not self.quantiles:
            raise ValueError("'quantiles' requested but the quantiles list is empty")
        if self.hist_bins < 1:
            raise ValueError(f"hist_bins must be >= 1, got {self.hist_bins}")
        if not (self.sat_threshold >= 0 and self.zero_eps >= 0):  # (NaN fails too)
            raise ValueError(f"sat_threshold and zero_eps bound |x|, so they must be >= 0; got "
                             f"{self.sat_threshold} and {self.zero_eps}")

    def output_names(self) -> list[str]:
        """Names of the per-unit outputs, in order ('quantiles' expands to 'q0.15', ...)."""
        out: list[str] = []
        for s in self.stats:
            out.extend(quantile_name(q) for q in self.quantiles) if s == "quantiles" else out.append(s)
        return out


_triton_failed = False  # set when the Triton kernel failed while on by default: the torch path from then on


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None  # ~80 us when not imported yet: once


def triton_enabled() -> bool:
    """Whether CUDA reductions use the Triton kernel: ``ICSK_TRITON`` if set, else whether Triton
    is installed (and has not failed in this process)."""
    return kernels.env_flag("ICSK_TRITON", not _triton_failed and _triton_installed())


def _unit_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``[K, N, C, S]`` over N and S, as ``[K, C]``: over the contiguous S first, which
    is ~3x faster than one reduction over both dims; size-1 dims are skipped, since torch's
    reduction over one takes a slow path (~100x on a [64, 60, 100, 1] view)."""
    K, N, C, S = x.shape
    if S > 1:
        x = x.sum(3)
    else:
        x = x.reshape(K, N, C)
    return x.sum(1) if N > 1 else x.reshape(K, C).clone()


class Reducer:
    """Computes a StatSpec's statistics of ``[K, N, C, S]`` views; owns reusable scratch memory."""

    def __init__(self, spec: StatSpec, threads: int | None = None, fused: bool = True):
        """``threads``: CPU threads of the fused kernel (default: torch's count at call time);
        ``fused=False`` keeps every statistic on the torch path."""
        self.spec = spec
        self.threads = threads
        self.fused = fused
        self._kernels_on = kernels.available()  # ICSK_FUSED, read once (the environment costs microseconds a call)
        self._outputs = frozenset(spec.output_names())
        self._lane_quantiles = spec.quantiles if "quantiles" in spec.stats else ()
        # the Triton kernel takes two launches: it pays when the torch path needs more than
        # var_mean's one, that is for any statistic besides mean and var (quantiles aside)
        self._triton_pays = any(s not in ("mean", "var", "quantiles") for s in spec.stats)
        self._scratch: dict[tuple, torch.Tensor] = {}
        self._offsets: dict[tuple, torch.Tensor] = {}

    def _buf(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous scratch tensor of ``shape``; grown, never shrunk, reused across calls."""
        key = (name, dtype, device)
        numel = math.prod(shape)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < numel:
            with torch.inference_mode(False):  # made under inference_mode, it could not be written outside it
                buf = torch.empty(numel, dtype=dtype, device=device)
            self._scratch[key] = buf
        return buf[:numel].view(shape)

    def __call__(self, x: torch.Tensor, edges: tuple[float, float] | None = None) -> dict[str, torch.Tensor]:
        """Statistics of ``x`` ([K, N, C, S]), left unchanged; ``edges`` = (lo, hi) of the histogram."""
        return self._reduce(x, edges, sortable=False)

    def reduce_staged(self, x: torch.Tensor, edges: tuple[float, float] | None = None) -> dict[str, torch.Tensor]:
        """Like calling the reducer, but ``x`` is a scratch staging buffer it may overwrite."""
        return self._reduce(x, edges, sortable=True)

    def _reduce(self, x: torch.Tensor, edges, sortable: bool) -> dict[str, torch.Tensor]:
        spec, stats = self.spec, self.spec.stats
        if x.dim() != 4:
            raise ValueError(f"expected a [K, N, C, S] view, got shape {tuple(x.shape)}")
        if "hist" in stats and edges is None:
            raise ValueError("histogram requested without a range")
        if x.dtype != torch.float32:  # reduce in float32 even for fp16/bf16 activations
            xf = self._buf("xf", tuple(x.shape), torch.float32, x.device)
            xf.copy_(x)
            x, sortable = xf, True
        on_cpu = self.fused and self._kernels_on and x.device.type == "cpu"
        if on_cpu and x.shape[3] == 1 and x.shape[1] <= kernels.MAX_NETWORK_ROWS:
            return self._scan_lanes(x, edges)
        fused = on_cpu and x.is_contiguous() and x.shape[3] >= kernels.MIN_ROW
        if fused:
            out = self._scan_fused(x, edges)
        elif self.fused and x.device.type == "cuda" and self._triton_pays and triton_enabled():
            out = self._scan_triton(x, edges)
        else:
            out = self._scan_torch(x, edges)
        if "quantiles" in stats:  # last: sorting may reorder a staging buffer in place
            for q, v in zip(spec.quantiles, self._quantiles(x, sortable), strict=True):
                out[quantile_name(q)] = v
        return out

    def _scan_torch(self, x: torch.Tensor, edges) -> dict[str, torch.Tensor]:
        """Every statistic but the quantiles with torch ops, one pass each, into scratch buffers."""
        spec, stats = self.spec, self.spec.stats
        K, N, C, S = x.shape
        m = N * S
        out: dict[str, torch.Tensor] = {}
        need_t = any(s in stats for s in ("var", "frac_sat", "frac_zero", "nonfinite", "hist"))
        t = self._buf("t", tuple(x.shape), torch.float32, x.device) if need_t else None
        mean_known = "mean" in stats or "var" in stats
        if mean_known and x.device.type != "cpu" and m > 1:  # one fused pass (Welford) on GPUs
            var, mean = torch.var_mean(x, dim=(1, 3), correction=1)
            out.update((k, v) for k, v in (("mean", mean), ("var", var)) if k in stats)
        elif mean_known and m == 1:
            mean = x.reshape(K, C).clone()
            out.update((k, v) for k, v in (("mean", mean), ("var", torch.full_like(mean, float("nan")))) if k in stats)
        elif "mean" in stats and "var" not in stats:
            out["mean"] = mean = _unit_sum(x).div_(m)
        elif "var" in stats:
            # corrected two-pass (Chan, Golub & LeVeque): the deviations from the first mean are
            # summed as well as squared, which removes that mean's rounding from both results, so
            # the variance does not cancel when |mean| >> std. A non-finite first mean (inf, NaN,
            # overflow) is torch's result as it stands.
            m0 = _unit_sum(x).div_(m)
            torch.sub(x, m0[:, None, :, None], out=t)
            c1 = _unit_sum(t)
            t.mul_(t)
            s2 = _unit_sum(t)
            ok = torch.isfinite(m0)
            mean = torch.where(ok, m0 + c1 / m, m0)
            if "mean" in stats:
                out["mean"] = mean
            out["var"] = torch.where(ok, s2 - c1 * c1 / m, s2).div_(m - 1)
        dims = tuple(d for d in (1, 3) if x.shape[d] != 1) or (3,)
        if "min" in stats:
            out["min"] = x.amin(dims).view(K, C)
        if "max" in stats:
            out["max"] = x.amax(dims).view(K, C)
        if "frac_sat" in stats or "frac_zero" in stats:
            mask = self._buf("mask", tuple(x.shape), torch.bool, x.device)
            torch.abs(x, out=t)
            if "frac_sat" in stats:
                out["frac_sat"] = torch.gt(t, spec.sat_threshold, out=mask).sum(dims, dtype=torch.float32).div_(m).view(K, C)
            if "frac_zero" in stats:
                out["frac_zero"] = torch.le(t, spec.zero_eps, out=mask).sum(dims, dtype=torch.float32).div_(m).view(K, C)
        if "nonfinite" in stats:
            mask = self._buf("mask", tuple(x.shape), torch.bool, x.device)
            torch.sub(x, x, out=t)  # NaN exactly where x is +-inf or NaN
            out["nonfinite"] = torch.ne(t, t, out=mask).sum(dims, dtype=torch.float32).view(K, C)
        if "hist" in stats:
            # on the CPU a finite per-unit sum proves the batch NaN-free (NaN and inf propagate)
            maybe_nan = not (x.device.type == "cpu" and mean_known and bool(torch.isfinite(mean).all()))
            out["hist"] = self._histogram(x, t, edges, maybe_nan)
        return out

    def _scan_fused(self, x: torch.Tensor, edges) -> dict[str, torch.Tensor]:
        """Every statistic but the quantiles in one fused pass (:func:`icsk.kernels.scan`)."""
        stats = self.spec.stats
        res = kernels.scan(x.numpy(), **self._kernel_options(edges), nonfinite="nonfinite" in stats,
                           threads=self.threads or torch.get_num_threads())
        return {s: torch.from_numpy(v) for s, v in res.items() if s in stats}

    def _scan_triton(self, x: torch.Tensor, edges) -> dict[str, torch.Tensor]:
        """Every statistic but the quantiles in one read on the GPU (:func:`icsk.gpu_kernels.scan`).

        If Triton fails to import or compile while on by default (a broken install, no compiler
        for this GPU), this warns once and the process keeps to the torch path; with
        ``ICSK_TRITON=1`` the error is raised."""
        global _triton_failed
        try:
            from . import gpu_kernels  # imports Triton: only when used

            res = gpu_kernels.scan(x, **self._kernel_options(edges), nonfinite="nonfinite" in self.spec.stats)
        except torch.cuda.OutOfMemoryError:
            raise  # not the kernel's fault, and the torch path needs more memory
        except Exception as e:
            if kernels.env_flag("ICSK_TRITON", False):
                raise RuntimeError(f"ICSK_TRITON=1, but the Triton kernel failed ({type(e).__name__}: {e}); "
                                   "fix the Triton install, or set ICSK_TRITON=0 for the torch path") from e
            _triton_failed = True
            warnings.warn(f"icsk: the Triton kernel failed ({type(e).__name__}: {e}); GPU statistics use the "
                          "torch path from now on (set ICSK_TRITON=0 to skip Triton)", RuntimeWarning, stacklevel=2)
            return self._scan_torch(x, edges)
        return {s: v for s, v in res.items() if s in self.spec.stats}

    def _scan_lanes(self, x: torch.Tensor, edges) -> dict[str, torch.Tensor]:
        """Every statistic, quantiles included, of a [K, N, C, 1] view with units as SIMD lanes
        (:func:`icsk.kernels.scan_lanes`; on torch's OpenMP team unless ``threads`` is 1)."""
        # numpy indexing, not a torch op: on the reducer thread every torch op hands the GIL over
        res = kernels.scan_lanes(x.numpy()[..., 0], quantiles=self._lane_quantiles, **self._kernel_options(edges),
                                 threads=self.threads or torch.get_num_threads())
        return {s: torch.from_numpy(v) for s, v in res.items() if s in self._outputs}

    def _kernel_options(self, edges) -> dict:
        """The statistics options :func:`icsk.kernels.scan` and ``scan_lanes`` share."""
        spec, stats = self.spec, self.spec.stats
        return {"min_max": "min" in stats or "max" in stats,
                "sat": spec.sat_threshold if "frac_sat" in stats else None,
                "zero_eps": spec.zero_eps if "frac_zero" in stats else None,
                "hist": self._hist_transform(edges) if "hist" in stats else None}

    def _hist_transform(self, edges: tuple[float, float]) -> tuple[float, float, int]:
        """``(origin, scale, B)``: value v lies in bin clamp(int((v - origin) * scale), 0, B+1).

        The origin sits one bin below ``lo``, so every bin index is >= 0 after clamping and the
        integer conversion (truncation) is the floor."""
        lo, hi = edges
        B = self.spec.hist_bins
        scale = B / (hi - lo)
        return lo - 1.0 / scale, scale, B

    def _histogram(self, x: torch.Tensor, t: torch.Tensor, edges: tuple[float, float],
                   maybe_nan: bool = True) -> torch.Tensor:
        """Per-unit counts in B equal bins over [lo, hi) plus an underflow (first) and an
        overflow (last) bin: ``[K, C, B+2]``. Bin of v: floor((v - lo) * B / (hi - lo)) + 1,
        clamped to [0, B+1]; NaN is dropped (it is counted by 'nonfinite'). ``maybe_nan=False``
        (known NaN-free input) skips the pass that sets NaN aside."""
        K, N, C, S = x.shape
        origin, scale, B = self._hist_transform(edges)
        torch.sub(x, origin, out=t)
        t.mul_(scale).clamp_(0.0, B + 1.0)
        if maybe_nan:
            t.nan_to_num_(nan=B + 2.0)
        codes = self._buf("codes", tuple(x.shape), torch.int32, x.device)
        codes.copy_(t)
        key = (K, C, B, x.device)
        off = self._offsets.get(key)
        if off is None:
            off = (torch.arange(K * C, dtype=torch.int32, device=x.device) * (B + 3)).view(K, 1, C, 1)
            self._offsets[key] = off
        codes.add_(off)
        if x.device.type == "cpu":
            counts = torch.bincount(codes.view(-1), minlength=K * C * (B + 3))
        else:  # bincount syncs with the host on GPUs (it reads the largest code); index_add_ does not
            counts = torch.zeros(K * C * (B + 3), dtype=torch.int32, device=x.device)
            counts.index_add_(0, codes.view(-1), torch.ones((), dtype=torch.int32, device=x.device).expand(codes.numel()))
        return counts.view(K, C, B + 3)[..., : B + 2].to(torch.float32)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """A scratch copy of ``x`` [K, N, C, S] as [K, 1, C, N*S]: each unit's values in one row."""
        K, N, C, S = x.shape
        rows = self._buf("rows", (K, C, N, S), torch.float32, x.device)
        rows.copy_(x.permute(0, 2, 1, 3))
        return rows.view(K, 1, C, N * S)

    def _quantiles(self, x: torch.Tensor, sortable: bool) -> list[torch.Tensor]:
        """Exact per-unit quantiles with linear interpolation (NumPy's default method); NaN
        for a unit with a NaN value, as ``np.quantile`` and ``torch.quantile`` give."""
        K, N, C, S = x.shape
        m = N * S
        rows = (x if sortable and N == 1 and x.is_contiguous() else self._rows(x)).view(K * C, m)
        lo_idx, hi_idx, frac = kernels.quantile_positions(m, self.spec.quantiles)
        if rows.device.type == "cpu":
            arr = rows.numpy()  # same memory
            if m >= _PARTITION_MIN_ROW:  # the last index too: it holds NaN if the row has one
                arr.partition(sorted(set(lo_idx + hi_idx + [m - 1])), axis=-1)
            else:
                arr.sort(axis=-1)
            srt = rows
        else:
            srt = torch.sort(rows, dim=-1).values
        has_nan = srt[:, m - 1].isnan()  # NaN sorts last; a unit with NaN has NaN quantiles
        res = []
        for i, j, f in zip(lo_idx, hi_idx, frac, strict=True):
            a, b = srt[:, i], srt[:, j]
            # NumPy's lerp, in float32 as the lanes kernel: from the nearer side, so a finite
            # value next to inf interpolates to inf, not inf - inf = NaN
            f32 = np.float32(f)
            if f == 0:
                v = a.clone()
            elif f32 < 0.5:
                v = a + (b - a) * float(f32)
            else:
                v = b - (b - a) * float(np.float32(1) - f32)
            res.append(v.masked_fill_(has_nan, float("nan")).view(K, C))
        return res
