"""The fused Triton kernel (icsk.gpu_kernels) against a float64 reference and the torch path.

On a machine with a GPU these run compiled on CUDA tensors. Without one, conftest.py sets
``TRITON_INTERPRET=1``, so the same kernel source runs in Triton's interpreter on CPU tensors;
a separate test then compiles the kernels for an H100 (sm_90) in a subprocess, which needs no
GPU, so code that the interpreter accepts but the compiler would not is caught here too."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from icsk import stats
from icsk.stats import Reducer, StatSpec
from test_kernels import BINS, EDGES, awkward, ref_of

gpu_kernels = pytest.importorskip("icsk.gpu_kernels", reason="triton not installed")
INTERPRETED = gpu_kernels.triton.knobs.runtime.interpret
DEVICE = "cpu" if INTERPRETED else "cuda"
pytestmark = [
    pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(), reason="no GPU and not interpreted"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),  # NaN/inf inputs
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),  # the interpreter's min/max
    pytest.mark.filterwarnings("ignore:Degrees of freedom:RuntimeWarning"),
]

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SCALAR = ["mean", "var", "min", "max", "frac_sat", "frac_zero", "nonfinite"]
SPEC = StatSpec(stats=(*SCALAR, "hist"), hist_bins=BINS, sat_threshold=1.5)


def run(x: torch.Tensor, spec: StatSpec = SPEC, edges=EDGES) -> dict[str, torch.Tensor]:
    """The Reducer's Triton path on ``x`` (on the GPU, or interpreted on the CPU), results on the CPU."""
    out = Reducer(spec)._scan_triton(x.to(DEVICE), edges if "hist" in spec.stats else None)
    return {k: v.cpu() for k, v in out.items()}


@pytest.mark.parametrize("shape", [(1, 6, 3, 16), (2, 5, 4, 49), (1, 3, 2, 2500), (2, 9, 13, 2), (3, 40, 6, 1)])
@pytest.mark.parametrize("programs_per_sm", [4, 64], ids=["few-slices", "many-slices"])
def test_triton_kernel_matches_float64_reference(monkeypatch, shape, programs_per_sm):
    """Shapes with partial tiles, rows longer than a tile (2500 > 1024) and dense units (S = 1);
    more programs per SM splits each unit's batch into slices that the second kernel merges."""
    monkeypatch.setattr(gpu_kernels, "_PROGRAMS_PER_SM", programs_per_sm)
    x = awkward(*shape, seed=shape[1])
    out = run(x)
    assert out["hist"].shape == (shape[0], shape[2], BINS + 2) and out["hist"].dtype == torch.float32
    for k in range(shape[0]):
        ref = ref_of(x, k)
        for stat in SCALAR:
            np.testing.assert_allclose(out[stat][k].double().numpy(), ref[stat], rtol=2e-5, atol=2e-5,
                                       equal_nan=True, err_msg=f"{stat} step {k}")
        np.testing.assert_array_equal(out["hist"][k].numpy(), ref["hist"], err_msg=f"hist step {k}")


def test_triton_kernel_and_torch_path_agree_bin_for_bin(monkeypatch):
    """Values on the bin edges and their float32 neighbours land in the torch path's bins; a
    strided (channels-last-like) view reads the same as its contiguous copy."""
    monkeypatch.setattr(gpu_kernels, "_PROGRAMS_PER_SM", 16)
    x = awkward(2, 12, 5, 40, seed=3, at_edges=True)
    plain = Reducer(SPEC, fused=False)._scan_torch(x, EDGES)
    view = x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    assert not view.is_contiguous()
    for got in (run(x), run(view)):
        assert torch.equal(got["hist"], plain["hist"])
        for stat in ("min", "max", "frac_sat", "frac_zero", "nonfinite"):
            torch.testing.assert_close(got[stat], plain[stat], rtol=0, atol=0, equal_nan=True, msg=stat)
        for stat in ("mean", "var"):
            torch.testing.assert_close(got[stat], plain[stat], rtol=1e-5, atol=1e-6, equal_nan=True, msg=stat)


def test_triton_kernel_variance_does_not_cancel(monkeypatch):
    """std 0.02 around 1e4, with an outlier first value in unit 1 and infs in unit 0 (which keeps
    torch's mean, inf, and a NaN variance), merged across slices."""
    monkeypatch.setattr(gpu_kernels, "_PROGRAMS_PER_SM", 64)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 3, 50, generator=gen) * 0.02 + 1e4
    x[:, :, 1, :] = torch.rand(x[:, :, 1, :].shape, generator=gen) * 3
    x[:, 0, 1, 0] = 1e8
    x[0, :, 0, :] += torch.tensor(float("inf"))
    out = run(x, StatSpec(stats=("mean", "var")))
    ref = x.double()
    assert out["mean"][0, 0] == float("inf") and torch.isnan(out["var"][0, 0])
    np.testing.assert_allclose(out["mean"].double()[:, 1:], ref.mean((1, 3))[:, 1:], rtol=1e-6)
    np.testing.assert_allclose(out["var"].double()[:, 1:], ref.var((1, 3))[:, 1:], rtol=1e-5)


@pytest.mark.parametrize("programs_per_sm", [4, 64], ids=["few-slices", "many-slices"])
def test_triton_kernel_overflow_and_nan_give_what_torch_gives(monkeypatch, programs_per_sm):
    """With many slices, 3e38 and -3e38 land in different slices, whose means' difference
    overflows float32 when merged (a GPU's 132 SMs give one sample per slice here)."""
    monkeypatch.setattr(gpu_kernels, "_PROGRAMS_PER_SM", programs_per_sm)
    n = 60
    big = 3e38
    cols = [[big, -big] + [0.0] * (n - 2), [float("inf")] + [1.0] * (n - 1), [float("nan")] + [1.0] * (n - 1)]
    x = torch.tensor(cols, dtype=torch.float32).T.reshape(1, n, len(cols), 1)
    out = run(x, StatSpec(stats=("mean", "var", "min", "max")))
    np.testing.assert_array_equal(out["mean"][0].numpy(), x[0, :, :, 0].mean(0).numpy())
    np.testing.assert_array_equal(out["var"][0].numpy(), x[0, :, :, 0].var(0).numpy())
    np.testing.assert_array_equal(out["min"][0].numpy(), np.float32([-big, 1.0, np.nan]))
    np.testing.assert_array_equal(out["max"][0].numpy(), np.float32([big, np.inf, np.nan]))


def test_triton_kernel_edges_of_masks_and_thresholds():
    """All-negative units in partial tiles (masked lanes must not count as 0 in max, min or the
    counts), values exactly at zero_eps and at the saturation threshold."""
    x = -1.0 - torch.rand(2, 3, 2, 37, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0, :4] = torch.tensor([0.25, -0.25, 3.0, -3.0])
    out = gpu_kernels.scan(x.to(DEVICE), min_max=True, sat=3.0, zero_eps=0.25, nonfinite=True, hist=None)
    ref = x.permute(0, 2, 1, 3).reshape(2, 2, -1).double()
    torch.testing.assert_close(out["max"].cpu().double(), ref.amax(-1), rtol=0, atol=0)
    torch.testing.assert_close(out["min"].cpu().double(), ref.amin(-1), rtol=0, atol=0)
    torch.testing.assert_close(out["frac_zero"].cpu().double(), (ref.abs() <= 0.25).double().mean(-1))
    torch.testing.assert_close(out["frac_sat"].cpu().double(), (ref.abs() > 3.0).double().mean(-1))
    assert out["frac_zero"][0, 0] > 0 and out["frac_sat"][0, 0] == 0  # |v| = eps counts, |v| = sat does not


def test_triton_kernel_returns_only_what_was_asked():
    x = awkward(1, 4, 3, 8)
    out = run(x, StatSpec(stats=("var", "frac_zero")))
    assert set(out) == {"var", "frac_zero"}
    got = gpu_kernels.scan(x.to(DEVICE), min_max=False, sat=None, zero_eps=0.1, nonfinite=False, hist=None)
    assert set(got) == {"mean", "var", "frac_zero"}
    with pytest.raises(ValueError, match="float32"):
        gpu_kernels.scan(x.double(), min_max=False, sat=None, zero_eps=None, nonfinite=False, hist=None)


COMPILE = """
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from icsk import gpu_kernels as g

ints = dict.fromkeys(("N", "C", "S", "s_k", "s_n", "s_c", "s_s", "per", "n_split"), "i32")
sig = {"x_ptr": "*fp32", "p_ptr": "*fp32", "h_ptr": "*i32", **ints,
       **dict.fromkeys(("origin", "scale", "sat", "eps"), "fp32"),
       **dict.fromkeys(("BN", "BS", "NB", "NBP", "MIN_MAX", "SAT", "ZERO", "HIST"), "constexpr")}
target = GPUTarget("cuda", 90, 32)
for bn, bs, nb, nbp in [(1, 1024, 32, 64), (64, 1, 0, 32), (8, 128, 254, 256)]:
    consts = {"BN": bn, "BS": bs, "NB": nb, "NBP": nbp, "MIN_MAX": True, "SAT": True, "ZERO": True, "HIST": nb > 0}
    assert g.triton.compile(ASTSource(fn=g._partials, signature=sig, constexprs=consts), target=target).asm["cubin"]
sig = {"p_ptr": "*fp32", "h_ptr": "*i32", "out_ptr": "*fp32", "hist_ptr": "*fp32", "n_units": "i32",
       "n_split": "i32", "NB": "constexpr", "NBP": "constexpr", "HIST": "constexpr"}
consts = {"NB": 32, "NBP": 64, "HIST": True}
assert g.triton.compile(ASTSource(fn=g._combine, signature=sig, constexprs=consts), target=target).asm["cubin"]
print("compiled")
"""


def test_triton_kernels_compile_for_an_h100(tmp_path):
    """Lowering to PTX and a cubin for sm_90 needs no GPU, but needs Triton imported without
    the interpreter: a subprocess (its own kernel cache, so the compiler really runs)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(COMPILE)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


@needs_cuda
def test_reducer_uses_the_triton_kernel_on_cuda_by_default(monkeypatch):
    monkeypatch.delenv("ICSK_TRITON", raising=False)
    x = awkward(2, 16, 6, 64, seed=5).cuda()
    calls = []
    real = gpu_kernels.scan
    monkeypatch.setattr(gpu_kernels, "scan", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec = StatSpec(stats=(*SCALAR, "hist", "quantiles"), hist_bins=BINS, sat_threshold=1.5)
    got, plain = Reducer(spec)(x, EDGES), Reducer(spec, fused=False)(x, EDGES)
    assert calls
    Reducer(StatSpec(stats=("mean", "var", "quantiles")))(x)  # one var_mean launch beats the kernel's two
    assert len(calls) == 1
    assert torch.equal(got["hist"], plain["hist"])
    for stat in plain:
        torch.testing.assert_close(got[stat], plain[stat], rtol=1e-5, atol=1e-6, equal_nan=True, msg=stat)
    monkeypatch.setenv("ICSK_TRITON", "0")  # the switch back to the torch path
    Reducer(spec)(x, EDGES)
    assert len(calls) == 1


def test_triton_is_on_when_installed_unless_switched_off(monkeypatch):
    monkeypatch.setattr(stats, "_triton_failed", False)
    monkeypatch.delenv("ICSK_TRITON", raising=False)
    assert stats.triton_enabled()
    monkeypatch.setenv("ICSK_TRITON", "0")
    assert not stats.triton_enabled()
    monkeypatch.delenv("ICSK_TRITON")
    monkeypatch.setattr(stats, "_triton_installed", lambda: False)
    assert not stats.triton_enabled()


def test_a_failing_triton_kernel_falls_back_to_torch_unless_forced(monkeypatch):
    """On by default, a kernel that fails (broken install, no compiler) warns once and the torch
    path takes over for the process; with ICSK_TRITON=1 the error is raised, naming the switch."""
    monkeypatch.setattr(stats, "_triton_failed", False)
    monkeypatch.delenv("ICSK_TRITON", raising=False)

    def broken(*a, **k):
        raise RuntimeError("PTX assembler not found")

    monkeypatch.setattr(gpu_kernels, "scan", broken)
    x = awkward(1, 8, 3, 20, seed=2)
    with pytest.warns(RuntimeWarning, match="torch path from now on"):
        got = Reducer(SPEC)._scan_triton(x, EDGES)
    plain = Reducer(SPEC, fused=False)._scan_torch(x, EDGES)
    assert got.keys() == plain.keys()
    for stat in plain:
        torch.testing.assert_close(got[stat], plain[stat], rtol=0, atol=0, equal_nan=True, msg=stat)
    assert not stats.triton_enabled()  # for the rest of the process
    monkeypatch.setenv("ICSK_TRITON", "1")
    with pytest.raises(RuntimeError, match="ICSK_TRITON=0"):
        Reducer(SPEC)._scan_triton(x, EDGES)


def test_out_of_memory_in_the_triton_kernel_is_raised_and_keeps_it_on(monkeypatch):
    """Out of memory is not the kernel's fault (and the torch path needs more memory): raised
    as it is, and Triton stays on for the next reductions."""
    monkeypatch.setattr(stats, "_triton_failed", False)
    monkeypatch.delenv("ICSK_TRITON", raising=False)

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(gpu_kernels, "scan", oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        Reducer(SPEC)._scan_triton(awkward(1, 8, 3, 20, seed=2), EDGES)
    assert stats.triton_enabled()
