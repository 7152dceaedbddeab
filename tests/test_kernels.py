"""The fused numba scan kernel against a float64 reference and against the torch path."""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np
import pytest
import torch

from icsk import kernels
from icsk.stats import ALL_STATS, Reducer, StatSpec
from test_recorder import QS, reference

pytestmark = [
    pytest.mark.skipif(not kernels.available(), reason="numba not installed (fused kernels off)"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),  # the reference on NaN/inf
    pytest.mark.filterwarnings("ignore:Degrees of freedom:RuntimeWarning"),  # var of one value
]

EDGES = (-2.0, 2.5)
BINS = 9
SCALAR = ["mean", "var", "min", "max", "frac_sat", "frac_zero", "nonfinite", *(f"q{q:g}" for q in QS)]


def awkward(k: int, n: int, c: int, s: int, seed: int = 0, at_edges: bool = False) -> torch.Tensor:
    """[K, N, C, S] values with NaN, +-inf and exact zeros; ``at_edges`` adds the bin edges and
    their float32 neighbours (binned by float32 arithmetic, so only the paths agree there)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k, n, c, s, generator=g) * 2 + 0.3
    if at_edges:
        edges = torch.linspace(*EDGES, BINS + 1)
        near = torch.cat([edges, torch.nextafter(edges, edges + 1), torch.nextafter(edges, edges - 1)])
        x[0].view(-1)[: len(near)] = near  # spread over the first units of step 0
    x[-1, 0, c - 1, :5] = 0.0
    x[0, 0, 1 % c, 3 % s] = float("nan")
    x[-1, n - 1, 0, 2 % s] = float("inf")
    x[-1, n - 1, 0, 4 % s] = -float("inf")
    return x


def ref_of(x4: torch.Tensor, k: int) -> dict[str, np.ndarray]:
    """Float64 reference of stacked step ``k`` of a [K, N, C, S] tensor (NaN left out of the
    histogram, as icsk counts it under ``nonfinite`` instead)."""
    a = x4[k].numpy()
    ref = reference(a, np.linspace(*EDGES, BINS + 1), sat=1.5)
    nan_per_unit = np.isnan(a).sum(axis=(0, 2))
    ref["hist"][:, -1] -= nan_per_unit  # searchsorted puts NaN in the overflow bin
    return ref


@pytest.mark.parametrize("shape", [(1, 6, 3, 16), (2, 5, 4, 49), (3, 2, 7, 1024), (2, 5, 11, 64), (2, 9, 13, 2), (1, 4, 6, 5)])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_matches_float64_reference(shape, threads):
    """Unit groups of the kernel end short of C in several of these shapes (one seed per thread
    count: fresh outputs cannot inherit right answers from the previous case's freed memory)."""
    x = awkward(*shape, seed=threads)
    spec = StatSpec(stats=ALL_STATS, quantiles=QS, hist_bins=BINS, sat_threshold=1.5)
    out = Reducer(spec, threads=threads)(x, EDGES)
    assert out["hist"].dtype == torch.float32 and out["hist"].shape == (shape[0], shape[2], BINS + 2)
    for k in range(shape[0]):
        ref = ref_of(x, k)
        for stat in SCALAR:
            got, want = out[stat][k].double().numpy(), ref[stat]
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, equal_nan=True, err_msg=f"{stat} step {k}")
        np.testing.assert_array_equal(out["hist"][k].numpy(), ref["hist"], err_msg=f"hist step {k}")


def test_fused_and_torch_paths_agree_bin_for_bin():
    """Same bin for every value (float32 bin arithmetic is shared), moments to float32 rounding."""
    x = awkward(2, 64, 8, 256, seed=3, at_edges=True)
    spec = StatSpec(stats=ALL_STATS, quantiles=QS, hist_bins=BINS)
    fused, plain = Reducer(spec)(x, EDGES), Reducer(spec, fused=False)(x, EDGES)
    assert torch.equal(fused["hist"], plain["hist"])
    for stat in ("min", "max", "frac_sat", "frac_zero", "nonfinite", "q0.5"):
        torch.testing.assert_close(fused[stat], plain[stat], rtol=0, atol=0, equal_nan=True, msg=stat)
    for stat in ("mean", "var"):
        torch.testing.assert_close(fused[stat], plain[stat], rtol=1e-5, atol=1e-6, equal_nan=True)


def test_variance_survives_a_large_offset():
    """One-pass sums around a per-unit shift: no cancellation when |mean| >> std."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(1, 32, 2, 64, generator=g, dtype=torch.float64) * 1e-2 + 1e4).float()
    out = Reducer(StatSpec(stats=("mean", "var")))(x)
    want = x.double().permute(0, 2, 1, 3).reshape(2, -1).var(1)
    torch.testing.assert_close(out["var"][0].double(), want, rtol=1e-4, atol=0)


def test_rows_whose_sums_overflow_are_counted_exactly():
    """A finite row sum proves a row finite; a sum that overflows on finite values must still
    give nonfinite 0 and exact min/max (the kernel then counts NaN and inf value by value)."""
    x = torch.zeros(1, 4, 3, 32)
    x[0, 1, 0, :8] = 3e38  # finite values whose sum overflows float32
    x[0, 2, 1, 5] = float("nan")
    x[0, 3, 2, 7] = -float("inf")
    out = kernels.scan(x.numpy(), min_max=True, sat=None, zero_eps=None, nonfinite=True, hist=None, threads=1)
    np.testing.assert_array_equal(out["nonfinite"][0], [0, 1, 1])
    np.testing.assert_array_equal(out["max"][0], [np.float32(3e38), np.nan, 0.0])
    np.testing.assert_array_equal(out["min"][0], [0.0, np.nan, -np.inf])


def test_min_max_are_nan_for_a_unit_with_nan_without_nonfinite():
    x = np.zeros((1, 2, 3, 32), np.float32)
    x[0, 1, 1, 5] = np.nan
    out = kernels.scan(x, min_max=True, sat=None, zero_eps=None, nonfinite=False, hist=None, threads=1)
    np.testing.assert_array_equal(out["min"][0], [0.0, np.nan, 0.0])
    np.testing.assert_array_equal(out["max"][0], [0.0, np.nan, 0.0])


@pytest.mark.parametrize("shape", [(2, 4, 5, 16), (3, 40, 6, 1)])
def test_many_bins_match_the_reference(shape):
    """More bins than values per unit (the conv kernel then counts into one sub-histogram per
    unit instead of eight), in both kernels."""
    bins, edges = 200, (-2.0, 2.5)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(7)) * 1.5
    x[0, 0, 0, 0] = float("nan")
    out = Reducer(StatSpec(stats=("mean", "hist"), hist_bins=bins))(x, edges)
    for k in range(shape[0]):
        want = reference(x[k].numpy(), np.linspace(*edges, bins + 1))["hist"]
        want[:, -1] -= np.isnan(x[k].numpy()).sum(axis=(0, 2))  # NaN is not counted in a bin
        np.testing.assert_array_equal(out["hist"][k].numpy(), want, err_msg=f"step {k}")


def test_small_rows_channels_last_and_disabled_use_the_torch_path(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("fused kernel used")

    spec = StatSpec(stats=("mean", "var", "hist"), hist_bins=4)
    monkeypatch.setattr(kernels, "scan", boom)
    Reducer(spec)(torch.randn(1, kernels.MAX_NETWORK_ROWS + 1, 3, kernels.MIN_ROW - 1), (-1.0, 1.0))  # rows too short
    Reducer(spec)(torch.randn(1, 8, 20, 3).transpose(2, 3), (-1.0, 1.0))  # not contiguous
    Reducer(spec, fused=False)(torch.randn(1, 8, 3, 64), (-1.0, 1.0))
    monkeypatch.setenv("ICSK_FUSED", "0")
    assert not kernels.available()
    Reducer(spec)(torch.randn(1, 8, 3, 64), (-1.0, 1.0))
    monkeypatch.delenv("ICSK_FUSED")
    with pytest.raises(AssertionError, match="fused kernel used"):
        Reducer(spec)(torch.randn(1, 8, 3, 64), (-1.0, 1.0))


def test_parallel_kernels_from_several_threads_are_safe():
    """numba's default threading layer runs one parallel kernel at a time; others go serial."""
    xs = [awkward(1, 16, 6, 256, seed=s) for s in range(4)]
    spec = StatSpec(stats=("mean", "var", "min", "max", "hist"), hist_bins=BINS)
    want = [Reducer(spec, threads=1)(x, EDGES) for x in xs]
    got: dict[int, dict] = {}

    def work(i: int) -> None:
        r = Reducer(spec, threads=2)
        for _ in range(5):
            got[i] = r(xs[i], EDGES)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for i in range(4):
        for stat, v in want[i].items():
            torch.testing.assert_close(got[i][stat], v, rtol=0, atol=0, equal_nan=True, msg=stat)


# ---------------------------------------------------------------- dense activations (S == 1)
def awkward_dense(k: int, n: int, c: int, seed: int = 0, at_edges: bool = False) -> torch.Tensor:
    """[K, N, C, 1] values with NaN, +-inf (at the extremes of a unit: NumPy's interpolation
    between a finite value and inf gives NaN or inf depending on the side), exact zeros and
    ties; ``at_edges`` fills step 0
    with the bin edges and their float32 neighbours."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(k, n, c, 1, generator=g) * 2 + 0.3).round(decimals=1)  # rounding makes ties
    if at_edges:
        edges = torch.linspace(*EDGES, BINS + 1)
        near = torch.cat([edges, torch.nextafter(edges, edges + 1), torch.nextafter(edges, edges - 1)])
        flat = x[0].view(-1)
        flat[: min(len(near), flat.numel())] = near[: flat.numel()]
    x[-1, :, c - 1] = 0.0
    x[0, 0, 1 % c] = float("nan")
    if n > 1:  # (np.quantile of a lone inf is NaN: its interpolation computes inf - inf)
        x[-1, n - 1, 0] = float("inf")
        x[-1, 0, 0] = -float("inf")
    return x


@pytest.mark.parametrize("n", [*range(1, 70), 100, 127, 128, 129, 255, 256])
def test_sorting_network_sorts_and_pruned_networks_select(n):
    """Every comparator list sorts random inputs with many ties (and 0/1 inputs, whose sorting
    proves a network by the 0-1 principle when all are tried); pruned ones give the ranks."""
    rng = np.random.default_rng(n)
    trials = np.concatenate([rng.integers(0, 4, (n, 300)), rng.integers(0, 2, (n, 300)),
                             rng.standard_normal((n, 100))], axis=1)
    ranks = tuple(sorted({0, n // 7, n // 2, n - 1}))
    want = np.sort(trials, axis=0)
    for comps, check in ((kernels.sorting_network(n), slice(None)), (kernels.sorting_network(n, ranks), list(ranks))):
        v = trials.copy()
        for a, b in comps:
            lo, hi = np.minimum(v[a], v[b]), np.maximum(v[a], v[b])
            v[a], v[b] = lo, hi
        np.testing.assert_array_equal(v[check], want[check])
    if n > 8:
        assert len(kernels.sorting_network(n, ranks)) < len(kernels.sorting_network(n))
    # groups of 16 sorted first (as scan_lanes does in registers), then only the merges
    v = trials.copy()
    for g in range(0, n, 16):
        v[g:g + 16] = np.sort(v[g:g + 16], axis=0)
    for a, b in kernels.sorting_network(n, ranks, presorted=16):
        v[a], v[b] = np.minimum(v[a], v[b]), np.maximum(v[a], v[b])
    np.testing.assert_array_equal(v[list(ranks)], want[list(ranks)])
    assert len(kernels.sorting_network(n, ranks, presorted=16)) <= len(kernels.sorting_network(n, ranks))


@pytest.mark.parametrize("shape", [(1, 1, 3), (3, 2, 5), (7, 60, 100), (2, 37, 600), (1, 256, 4), (130, 9, 2)])
def test_lanes_kernel_matches_float64_reference(shape):
    """Dense (N, C) activations, K stacked steps: every statistic, quantiles included."""
    k_, n, c = shape
    x = awkward_dense(*shape)
    spec = StatSpec(stats=ALL_STATS, quantiles=QS, hist_bins=BINS, sat_threshold=1.5)
    out = Reducer(spec)(x, EDGES)
    assert out["hist"].shape == (k_, c, BINS + 2) and out["q0.5"].shape == (k_, c)
    for k in range(k_):
        ref = ref_of(x, k)
        for stat in SCALAR:
            if n == 1 and stat == "var":
                assert out[stat][k].isnan().all()
                continue
            np.testing.assert_allclose(out[stat][k].double().numpy(), ref[stat], rtol=2e-5, atol=2e-5,
                                       equal_nan=True, err_msg=f"{stat} step {k}")
        np.testing.assert_array_equal(out["hist"][k].numpy(), ref["hist"], err_msg=f"hist step {k}")


def test_lanes_kernel_and_torch_path_agree_exactly():
    """Same order statistics, same float32 interpolation, same bin arithmetic."""
    x = awkward_dense(5, 48, 40, seed=4, at_edges=True)
    spec = StatSpec(stats=ALL_STATS, quantiles=(0.0, 0.1, *QS, 0.99, 1.0), hist_bins=BINS)
    lanes, plain = Reducer(spec)(x, EDGES), Reducer(spec, fused=False)(x, EDGES)
    assert lanes.keys() == plain.keys()
    for stat in lanes:
        if stat in ("mean", "var"):
            torch.testing.assert_close(lanes[stat], plain[stat], rtol=1e-5, atol=1e-6, equal_nan=True)
        else:
            torch.testing.assert_close(lanes[stat], plain[stat], rtol=0, atol=0, equal_nan=True, msg=stat)


@pytest.mark.parametrize("n", [*range(1, 70), 127, 128, 129, 255, 256])
def test_lanes_kernel_quantiles_are_exact_for_every_batch_size(n):
    """Every batch size (sort groups of 16 padded with +inf, merges tile by tile, lanes past a
    tile's end, three lane blocks of 6 steps with a short last one), serially and on torch's
    team: the same quantiles as the torch path's sort, with ties, NaN and +-inf."""
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(13, n, 75, 1, generator=g) * 2).round()  # many ties
    x[0, n // 2, 3] = float("nan")
    x[7, 0, 70] = float("inf")
    x[12, n - 1, 74] = -float("inf")
    spec = StatSpec(stats=("quantiles",), quantiles=(0.0, 0.15, 0.5, 0.85, 1.0))
    plain = Reducer(spec, fused=False)(x)
    for threads in (1, 2):
        lanes = Reducer(spec, threads=threads)(x)
        for stat in plain:
            torch.testing.assert_close(lanes[stat], plain[stat], rtol=0, atol=0, equal_nan=True, msg=stat)


def test_kernels_take_any_sequence_and_numbers_for_their_parameters():
    """Parameters go into cached plans: a list histogram range and NumPy numbers work like tuples
    and floats (and give the same results)."""
    x = awkward_dense(4, 20, 30, seed=3).numpy()
    kw = dict(min_max=True, zero_eps=1e-6)
    want = kernels.scan_lanes(x[..., 0], quantiles=(0.5,), sat=1.5, hist=(-2.0, 2.0, 5), **kw)
    got = kernels.scan_lanes(x[..., 0], quantiles=[0.5], sat=np.float32(1.5), hist=[-2.0, 2.0, np.int64(5)], **kw)
    for stat in want:
        np.testing.assert_array_equal(got[stat], want[stat], err_msg=stat)
    x4 = np.ascontiguousarray(np.repeat(x, 4, axis=3))
    want = kernels.scan(x4, sat=1.5, nonfinite=True, hist=(-2.0, 2.0, 5), **kw)
    got = kernels.scan(x4, sat=np.float64(1.5), nonfinite=True, hist=[-2.0, 2.0, 5], **kw)
    for stat in want:
        np.testing.assert_array_equal(got[stat], want[stat], err_msg=stat)


def test_lanes_kernel_reads_strided_views():
    """A non-contiguous [K, N, C, 1] view (every other unit) gives what its contiguous copy gives."""
    wide = awkward_dense(6, 30, 90, seed=5)
    view = wide[:, :, ::2]
    assert not view.is_contiguous()
    spec = StatSpec(stats=ALL_STATS, quantiles=QS, hist_bins=BINS)
    got, want = Reducer(spec)(view, EDGES), Reducer(spec)(view.contiguous(), EDGES)
    for stat in want:
        torch.testing.assert_close(got[stat], want[stat], rtol=0, atol=0, equal_nan=True, msg=stat)


def test_lanes_kernel_leaves_its_input_and_skips_large_batches(monkeypatch):
    x = awkward_dense(3, 20, 7)
    before = x.clone()
    out = Reducer(StatSpec(stats=("mean", "quantiles")))(x)
    assert set(out) == {"mean", *(f"q{q:g}" for q in QS)}
    torch.testing.assert_close(x, before, rtol=0, atol=0, equal_nan=True)

    def boom(*a, **k):
        raise AssertionError("lanes kernel used")

    monkeypatch.setattr(kernels, "scan_lanes", boom)
    spec = StatSpec(stats=("mean", "quantiles"))
    Reducer(spec)(torch.randn(2, kernels.MAX_NETWORK_ROWS + 1, 3, 1))  # a network that large is not worth it
    Reducer(spec, fused=False)(x)
    with pytest.raises(AssertionError, match="lanes kernel used"):
        Reducer(spec)(x)


@pytest.mark.parametrize("shape", [(3, 60, 10, 1), (2, 300, 10, 1), (2, 8, 6, 50)], ids=["lanes", "dense-torch", "conv"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch"])
def test_variance_does_not_cancel_when_the_mean_dwarfs_the_spread(shape, fused):
    """std 0.02 around 1e4: a float32 mean off by one ulp (~1e-3) would put ~1e-6 into every
    centred square, a few % of the variance (4e-4); float32 torch.var is ~1e-7 off here. Unit 1
    has an outlier first (1e8, the rest within 3): the mean must not suffer from it either."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen) * 0.02 + 1e4
    x[:, :, 1, :] = torch.rand(x[:, :, 1, :].shape, generator=gen) * 3
    x[:, 0, 1, 0] = 1e8
    x[0, :, 0, :] += torch.tensor(float("inf"))  # a unit with infs keeps torch's mean and var
    out = Reducer(StatSpec(stats=("mean", "var")), fused=fused)(x)
    ref = x.double()
    mean, var = ref.mean((1, 3)), ref.var((1, 3))
    assert out["mean"][0, 0] == float("inf") and torch.isnan(out["var"][0, 0])
    np.testing.assert_allclose(out["mean"].double()[:, 1:], mean[:, 1:], rtol=1e-6)  # a few float32 ulps
    np.testing.assert_allclose(out["var"].double()[:, 1:], var[:, 1:], rtol=1e-5)


@pytest.mark.parametrize("n", [60, 300], ids=["lanes", "dense-torch"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch"])
def test_overflowing_units_give_what_torch_gives(n, fused):
    """Squares that overflow give an infinite variance (not NaN), and inf / NaN give what torch's
    float32 reductions give."""
    big = 3e38
    cols = [[big, -big] + [0.0] * (n - 2), [float("inf")] + [1.0] * (n - 1), [float("nan")] + [1.0] * (n - 1)]
    x = torch.tensor(cols, dtype=torch.float32).T.reshape(1, n, len(cols), 1)
    out = Reducer(StatSpec(stats=("mean", "var")), fused=fused)(x)
    np.testing.assert_array_equal(out["mean"][0].numpy(), x[0, :, :, 0].mean(0).numpy())
    np.testing.assert_array_equal(out["var"][0].numpy(), x[0, :, :, 0].var(0).numpy())


@pytest.mark.parametrize("n", [6, 60, 300], ids=["lanes-6", "lanes-60", "dense-torch"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch"])
def test_quantiles_next_to_inf_interpolate_as_numpy_does(n, fused):
    """NumPy interpolates from the nearer order statistic: between -inf and 0 at weight >= 0.5 it
    gives -inf (masked attention scores), between 2 and inf NaN; a + (b - a) f gave NaN and inf."""
    k = n // 2
    cols = [[-np.inf] * k + list(range(n - k)), list(range(n - k)) + [np.inf] * k]
    x = torch.tensor(cols, dtype=torch.float32).T.reshape(1, n, 2, 1)
    qs = (0.15, 0.3, 0.5, 0.7, 0.85)
    out = Reducer(StatSpec(stats=("quantiles",), quantiles=qs), fused=fused)(x)
    ref = np.quantile(np.array(cols, dtype=np.float64), qs, axis=1)  # [q, unit]
    assert np.isneginf(ref[2, 0]) and np.isnan(ref[2, 1])  # the cases in question are in there
    for i, q in enumerate(qs):
        np.testing.assert_allclose(out[f"q{q:g}"][0].double().numpy(), ref[i], rtol=1e-6, equal_nan=True,
                                   err_msg=f"q{q}")


def test_a_slow_first_kernel_call_says_it_is_compiling(monkeypatch, capsys):
    """A fresh install compiles the kernels on first use (about 20 s for the demo), while the
    progress bar showed an hour to go: a line says why, once, and only for a slow first call."""
    import time

    from icsk import kernels as K

    monkeypatch.setattr(K, "COMPILE_NOTICE_S", 0.05)
    monkeypatch.setattr(K, "_called", set())
    monkeypatch.setattr(K, "_noticed", False)

    def fast(x):
        return x + 1

    def slow(x):
        time.sleep(0.3)  # like a compile
        return x * 2

    assert K._call(fast, 1) == 2
    time.sleep(0.1)
    assert "compiling" not in capsys.readouterr().err
    assert K._call(slow, 2) == 4 and K._call(slow, 3) == 6
    err = capsys.readouterr().err
    assert err.count("icsk: compiling the CPU statistics kernels with numba") == 1


def _team_or_skip():
    from icsk.omp_team import torch_team

    team = torch_team()
    if team is None:
        pytest.skip("torch's OpenMP runtime not found here (not Linux, or torch built without OpenMP)")
    return team


@pytest.fixture
def team_runs(monkeypatch) -> list[int]:
    """Thread counts of the parallel regions started on torch's team (skipped where there is none)."""
    team = _team_or_skip()
    runs: list[int] = []
    run = type(team).run
    monkeypatch.setattr(type(team), "run", lambda self, *a: (runs.append(a[2]), run(self, *a))[1])
    return runs


def _same_on_the_team_as_serially(kernel, x: np.ndarray, runs: list[int], **kw) -> None:
    """``kernel`` on 2 threads of torch's team gives what it gives serially, bit for bit, and
    leaves its input as it was; the parallel region really was started."""
    before = x.copy()
    serial = kernel(x, **kw, threads=1)
    assert runs == []
    parallel = kernel(x, **kw, threads=2)
    assert runs == [2]
    np.testing.assert_array_equal(x, before)
    assert serial.keys() == parallel.keys()
    for stat in serial:
        np.testing.assert_array_equal(parallel[stat], serial[stat], err_msg=stat)


@pytest.mark.parametrize("shape", [(7, 60, 100), (64, 60, 100), (13, 37, 250), (100, 256, 7), (9, 2, 600)])
def test_lanes_kernel_on_torchs_team_matches_it_serially(team_runs, shape):
    """Lane blocks split across torch's OpenMP threads: every statistic (histograms, NaN and inf
    included) equals the serial kernel's."""
    _same_on_the_team_as_serially(kernels.scan_lanes, awkward_dense(*shape, seed=7).numpy()[..., 0], team_runs,
                                  quantiles=(0.0, *QS, 1.0), min_max=True, sat=1.5, zero_eps=1e-6,
                                  hist=Reducer(StatSpec(hist_bins=BINS))._hist_transform(EDGES))


@pytest.mark.parametrize("shape", [(2, 5, 11, 64), (3, 2, 7, 1024), (1, 40, 64, 16), (2, 9, 13, 2)])
def test_conv_kernel_on_torchs_team_matches_it_serially(team_runs, shape):
    """The fused conv kernel's unit groups shared out on torch's team, likewise."""
    _same_on_the_team_as_serially(kernels.scan, np.ascontiguousarray(awkward(*shape, seed=9).numpy()), team_runs,
                                  min_max=True, sat=1.5, zero_eps=1e-6, nonfinite=True,
                                  hist=Reducer(StatSpec(hist_bins=BINS))._hist_transform(EDGES))


def test_reducer_on_the_training_thread_uses_torchs_team(team_runs, monkeypatch):
    """Reducer() (threads from torch) borrows the team for dense layers; Reducer(threads=1), the
    reducer thread's, never does; both give the float64 reference's quantiles."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    calls = team_runs
    x = awkward_dense(64, 60, 100, seed=3)
    spec = StatSpec(stats=("mean", "var", "quantiles"), quantiles=QS)
    single = Reducer(spec, threads=1)(x)
    assert calls == []
    shared = Reducer(spec)(x)
    assert calls == [2]
    for stat in single:
        torch.testing.assert_close(shared[stat], single[stat], rtol=0, atol=0, equal_nan=True, msg=stat)
    for k in (0, 63):
        ref = ref_of(x, k)
        for stat in single:
            np.testing.assert_allclose(shared[stat][k].double().numpy(), ref[stat], rtol=2e-5, atol=2e-5,
                                       equal_nan=True, err_msg=f"{stat} step {k}")


def test_a_runtime_torch_does_not_use_is_not_taken():
    """Another OpenMP runtime in the process (numba's own) has a team of its own, whose threads
    would spin beside torch's: it is refused because a count set through torch does not show there."""
    from icsk import omp_team

    class Other:  # a runtime with a thread count of its own
        def __init__(self):
            self.omp_get_max_threads = lambda: self.n
            self.omp_set_num_threads = lambda n: setattr(self, "n", n)
            self.n = 7

    before = torch.get_num_threads()
    other = Other()
    assert not omp_team._is_torchs(other)
    assert torch.get_num_threads() == before and other.n == 7  # both counts as they were
    team = omp_team.torch_team()
    if team is not None:  # the one found is torch's, and proving it changed nothing
        lib = ctypes.CDLL(team.path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        assert omp_team._is_torchs(lib) and torch.get_num_threads() == before


def test_the_team_can_be_turned_off(monkeypatch):
    from icsk import omp_team

    monkeypatch.setenv("ICSK_OMP_TEAM", "0")
    assert omp_team.torch_team() is None
    assert kernels._team_for(2, 5, np.zeros((3, 4, 5), np.float32)) is None


def test_team_inputs_the_workers_cannot_read_run_serially_or_are_refused(team_runs):
    """Workers read float32: other dtypes take the serial kernel (same values). An empty batch is
    refused on both paths. A worker that leaves work undone raises instead of returning the
    unwritten (uninitialised) results."""
    from numba import cfunc, types

    from icsk.omp_team import torch_team

    team, calls = torch_team(), team_runs
    kw = dict(quantiles=QS, min_max=True, sat=1.5, zero_eps=1e-6, hist=None)
    x64 = awkward_dense(20, 30, 100, seed=2).numpy()[..., 0].astype(np.float64)
    got = kernels.scan_lanes(x64, **kw, threads=2)
    assert calls == []
    want = kernels.scan_lanes(x64.astype(np.float32), **kw, threads=1)
    for stat in want:
        np.testing.assert_allclose(got[stat], want[stat], rtol=1e-6, equal_nan=True, err_msg=stat)
    with pytest.raises(ValueError, match="at least one value per unit"):
        kernels.scan_lanes(np.zeros((20, 0, 100), np.float32), **kw, threads=2)
    with pytest.raises(ValueError, match="at least one value per unit"):
        kernels.scan(np.zeros((2, 0, 3, 16), np.float32), min_max=False, sat=None, zero_eps=None, nonfinite=True,
                     hist=None, threads=2)
    idle = cfunc(types.void(types.voidptr))(lambda data: None)  # takes no work item
    with pytest.raises(RuntimeError, match="stopped after 0 of 3 work items.*ICSK_OMP_TEAM=0"):
        kernels._TeamCall((1,), (None,), kernels._kernel_args(False, None, None, True, None)).run(
            team, lambda: idle.address, 2, 3, np.zeros(1, np.float32))
