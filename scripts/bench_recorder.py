"""Recorder overhead: recorded step time / plain step time, against three peer hook designs.

All configurations run in one process, interleaved block by block after a warm-up, and the
ratio is the median over repeats. Peers record the same statistics as icsk:
* ``naive-numpy``: copy each activation to NumPy in the hook and reduce there;
* ``torch-simple``: straightforward on-device hook (``torch.var_mean``, ``torch.quantile`` /
  ``torch.histc`` per layer), results kept on device;
* ``fastai-item``: fastai ``ActivationStats`` pattern, ``.item()`` per statistic (layer level).

Usage: python scripts/bench_recorder.py [--quick] [--device cuda] [--write reports/benchmarks.md]

``--base REV`` also times the Recorder of git revision REV in the same rounds (an in-process A/B
of a change; no --write): ``python scripts/bench_recorder.py --peers none --only mlp --base HEAD~1``.
With ``--device cuda`` and Triton installed, icsk uses the fused kernel of :mod:`icsk.gpu_kernels`,
and ``icsk-torch`` (icsk with ``ICSK_TRITON=0``: the torch path) runs in the same rounds too, with
its ratio to icsk; a table compares the two paths' reductions of each conv output alone.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

import icsk
from benchmd import write_section

QS = (0.15, 0.5, 0.85)


def mlp() -> nn.Module:
    """Ioffe & Szegedy's 784-100-100-100-10 sigmoid MLP."""
    return nn.Sequential(nn.Linear(784, 100), nn.Sigmoid(), nn.Linear(100, 100), nn.Sigmoid(),
                         nn.Linear(100, 100), nn.Sigmoid(), nn.Linear(100, 10))


def vgg_small() -> nn.Module:
    """VGG-style CNN for 32x32 inputs: conv64-M-conv128-M-conv256-conv256-M-fc."""
    layers: list[nn.Module] = []
    c = 3
    for v in (64, "M", 128, "M", 256, 256, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(256 * 16, 10))


# ---------------------------------------------------------------- peer hook designs
class PeerHooks:
    """Base: attach ``fn(name, tensor)`` as forward hooks on the chosen modules."""

    def __init__(self, modules: dict[str, nn.Module], stats: tuple[str, ...], edges=(-3.0, 3.0), bins=32):
        self.modules, self.stats, self.edges, self.bins = modules, stats, edges, bins
        self.out: list = []
        self.handles = []

    def __enter__(self):
        for n, m in self.modules.items():
            self.handles.append(m.register_forward_hook(lambda mod, i, o, n=n: self.fn(n, o.detach())))
        return self

    def __exit__(self, *a):
        for h in self.handles:
            h.remove()

    def step(self):
        pass


class NaiveNumpy(PeerHooks):
    def fn(self, name, x):
        a = x.cpu().numpy().astype(np.float32)
        a = np.moveaxis(a, 1, 0).reshape(a.shape[1], -1)
        r = {"mean": a.mean(1), "var": a.var(1, ddof=1)}
        if "quantiles" in self.stats:
            r["q"] = np.quantile(a, QS, axis=1)
        if "hist" in self.stats:
            r["hist"] = [np.histogram(row, self.bins, self.edges)[0] for row in a]
        self.out.append(r)


class TorchSimple(PeerHooks):
    def fn(self, name, x):
        a = x.transpose(0, 1).reshape(x.shape[1], -1)
        var, mean = torch.var_mean(a, 1)
        r = {"mean": mean, "var": var}
        if "quantiles" in self.stats:
            r["q"] = torch.quantile(a, torch.tensor(QS, device=x.device), dim=1)
        if "hist" in self.stats:
            r["hist"] = torch.stack([torch.histc(row, self.bins, *self.edges) for row in a])
        self.out.append(r)


class FastaiItem(PeerHooks):
    """fastai ActivationStats: layer-level stats, one ``.item()`` (device sync) each."""

    def fn(self, name, x):
        r = [x.mean().item(), x.std().item()]
        if "quantiles" in self.stats:
            r += [v.item() for v in torch.quantile(x.flatten()[:16_000_000], torch.tensor(QS, device=x.device))]
        if "hist" in self.stats:
            r.append(x.float().histc(self.bins, *self.edges))
        self.out.append(r)


class IcskRec:
    """A Recorder (``recorder``: icsk's or a base revision's) writing to a temporary run folder."""

    def __init__(self, model, layers, stats, recorder=icsk.Recorder):
        self.rec = recorder(model, layers=layers, stats=stats, path=tempfile.mkdtemp(prefix="icsk-bench-"),
                            hist_range=(-3.0, 3.0))

    def __enter__(self):
        self.rec.__enter__()
        return self

    def __exit__(self, *a):
        self.rec.remove()

    def step(self):
        self.rec.step()

    def drain(self):
        """Finish the block's background reductions and writes, so they count in its time."""
        self.rec.flush(wait=True)

    def close(self):
        """Flush, then delete the run folder (the recorded statistics are not needed afterwards)."""
        self.rec.close()
        shutil.rmtree(self.rec.path, ignore_errors=True)


class TritonEnv:
    """``ICSK_TRITON`` set to ``on`` while a reduction runs (the reducer reads it at every call)."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self._before = os.environ.get("ICSK_TRITON")
        os.environ["ICSK_TRITON"] = "1" if self.on else "0"

    def __exit__(self, *a):
        if self._before is None:
            os.environ.pop("ICSK_TRITON", None)
        else:
            os.environ["ICSK_TRITON"] = self._before


class IcskTorchPathRec(IcskRec):
    """icsk with ``ICSK_TRITON=0`` (GPU statistics on the torch path) while its block runs."""

    def __enter__(self):
        self._env = TritonEnv(False)
        self._env.__enter__()
        return super().__enter__()

    def __exit__(self, *a):
        super().__exit__(*a)
        self._env.__exit__(*a)


def triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- timing
def make_step(model, x, y) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    lossf = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        lossf(model(x), y).backward()
        opt.step()

    return step


PEERS = ("naive-numpy", "torch-simple", "fastai-item")
VGG_STATS = {  # --vgg-stats: (label, statistics)
    "moments+hist": ("mean/var + 32-bin histogram", ("mean", "var", "hist")),
    "all-but-quantiles": ("every statistic but the quantiles (32-bin histogram)",
                          ("mean", "var", "min", "max", "frac_sat", "frac_zero", "nonfinite", "hist")),
}


def median_ci(ratios: list[float], level: float = 0.95, resamples: int = 4000) -> tuple[float, float]:
    """Bootstrap confidence interval of the median of per-round ratios (rounds resampled)."""
    r = np.asarray(ratios)
    meds = np.median(np.random.default_rng(0).choice(r, (resamples, r.size)), axis=1)
    return tuple(float(v) for v in np.quantile(meds, [(1 - level) / 2, (1 + level) / 2]))


def base_recorder(rev: str) -> type:
    """``icsk.Recorder`` as of git revision ``rev``: its ``icsk/`` extracted to a temporary
    folder and imported as ``icsk_base`` (the package imports itself relatively)."""
    root = Path(__file__).resolve().parent.parent
    folder = Path(tempfile.mkdtemp(prefix="icsk-base-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    archive = subprocess.run(["git", "archive", rev, "icsk"], cwd=root, capture_output=True)
    if archive.returncode != 0:
        sys.exit(f"--base {rev}: git archive failed: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    (folder / "icsk").rename(folder / "icsk_base")
    sys.path.insert(0, str(folder))
    import icsk_base

    return icsk_base.Recorder


def measure(name, model, x, y, layer_names, stats, steps_per_block, repeats, warmup_blocks=1, peers=PEERS,
            base: type | None = None):
    """Interleaved blocks of every configuration, one round after another, and a last plain block.

    Returns ``{config: (median seconds/step, median ratio, first quartile, third quartile,
    95 % bootstrap interval of the median ratio, seconds/step of each round)}``
    over rounds. A round's ratio is the config's block time over the mean of the plain block
    that opens its round and the one that opens the next round, so a drift of the machine's
    speed (this VM has them) cancels out to first order. The plain block opens every round; the
    others run in reverse order every other round, so none always runs right after plain. On a
    GPU each block's clock starts and stops with the device idle (``torch.cuda.synchronize``).
    ``base``: a Recorder class timed as config ``"base"`` too."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    step = make_step(model, x, y)
    modules = {n: dict(model.named_modules())[n] for n in layer_names}
    configs = {
        "plain": None,
        "icsk": IcskRec(model, layer_names, stats),
        "naive-numpy": NaiveNumpy(modules, stats),
        "torch-simple": TorchSimple(modules, stats),
        "fastai-item": FastaiItem(modules, stats),
    }
    configs = {k: v for k, v in configs.items() if k in ("plain", "icsk") or k in peers}
    if base is not None:
        configs["base"] = IcskRec(model, layer_names, stats, base)
    if x.is_cuda and triton_installed():
        configs["icsk-torch"] = IcskTorchPathRec(model, layer_names, stats)

    def block(ctx) -> float:
        gc.collect()
        sync()
        if ctx is None:
            t0 = time.perf_counter()
            for _ in range(steps_per_block):
                step()
            sync()
            return (time.perf_counter() - t0) / steps_per_block
        with ctx:
            t0 = time.perf_counter()
            for _ in range(steps_per_block):
                step()
                ctx.step()
            if hasattr(ctx, "drain"):
                ctx.drain()
            sync()
            dt = time.perf_counter() - t0
        if hasattr(ctx, "out"):
            ctx.out.clear()
        return dt / steps_per_block

    times: dict[str, list[float]] = {k: [] for k in configs}
    others = [k for k in configs if k != "plain"]
    for r in range(warmup_blocks + repeats):
        for cname in ["plain", *(others if r % 2 == 0 else others[::-1])]:
            dt = block(configs[cname])
            if r >= warmup_blocks:
                times[cname].append(dt)
        print(f"  [{name}] round {r + 1}/{warmup_blocks + repeats} done", file=sys.stderr, flush=True)
    closing_plain = block(None)
    for ctx in configs.values():
        if isinstance(ctx, IcskRec):
            ctx.close()
    plain = times["plain"]
    brackets = [(a + b) / 2 for a, b in zip(plain, plain[1:] + [closing_plain], strict=True)]
    out = {}
    for k, v in times.items():
        ratios = sorted(t / p for t, p in zip(v, brackets, strict=True))
        q1, q3 = (float(np.quantile(ratios, q)) for q in (0.25, 0.75))
        out[k] = (statistics.median(v), statistics.median(ratios), q1, q3, median_ci(ratios), v)
    return out


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def conv_outputs(dev: torch.device) -> dict[str, torch.Tensor]:
    """The VGG-small conv outputs of one batch of 128 random 32x32 images, by layer name."""
    v = vgg_small().to(dev)
    outs: dict[str, torch.Tensor] = {}
    hooks = [mod.register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o.detach().clone()))
             for n, mod in v.named_modules() if isinstance(mod, nn.Conv2d)]
    with torch.no_grad():
        v(torch.randn(128, 3, 32, 32, device=dev))
    for h in hooks:
        h.remove()
    return outs


def reduction_costs(repeats: int, dev: torch.device) -> list[str]:
    """Milliseconds to reduce each VGG conv output, interleaved, medians; markdown table lines.

    On the CPU: mean/var + 34-bin histogram, torch path vs the fused numba kernel. On a GPU:
    the torch path vs the fused Triton kernel (``ICSK_TRITON=1``), for mean/var + histogram and
    for every statistic but the quantiles, each call timed from launch to the device's idle."""
    from icsk import kernels
    from icsk.stats import Reducer, StatSpec

    gpu = dev.type == "cuda"
    if gpu and not triton_installed():
        return ["(Triton not installed: no fused GPU kernel to compare)"]
    if not gpu and not kernels.available():
        return ["(fused kernels unavailable: numba missing or ICSK_FUSED=0)"]
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    outs = conv_outputs(dev)
    specs = {"mean/var + hist": VGG_STATS["moments+hist"][1]}
    if gpu:
        specs["all but quantiles"] = VGG_STATS["all-but-quantiles"][1]
    fast = "Triton kernel" if gpu else "fused kernel"
    lines = [f"| statistics | conv output | shape | torch path | {fast} | speed-up |", "|---|---|---|---:|---:|---:|"]
    for label, stats in specs.items():
        spec = StatSpec(stats=stats, hist_bins=32)
        paths = ({"torch": (Reducer(spec), TritonEnv(False)), "fast": (Reducer(spec), TritonEnv(True))} if gpu else
                 {"torch": (Reducer(spec, fused=False), TritonEnv(False)), "fast": (Reducer(spec), TritonEnv(False))})
        total = {k: 0.0 for k in paths}
        for name, out in outs.items():
            x4 = out.reshape(1, out.shape[0], out.shape[1], -1)
            times: dict[str, list[float]] = {k: [] for k in paths}
            for r in range(repeats + 3):  # three warm-up calls: compilation, scratch buffers
                for k, (red, env) in paths.items():
                    with env:
                        sync()
                        t0 = time.perf_counter()
                        red(x4, (-3.0, 3.0))
                        sync()
                    if r >= 3:
                        times[k].append(time.perf_counter() - t0)
            t = {k: statistics.median(ts) * 1e3 for k, ts in times.items()}
            for k in paths:
                total[k] += t[k]
            lines.append(f"| {label} | {name} | {tuple(out.shape)} | {t['torch']:.3f} ms | {t['fast']:.3f} ms | "
                         f"{t['torch'] / t['fast']:.2f}x |")
        lines.append(f"| {label} | all four | | {total['torch']:.3f} ms | {total['fast']:.3f} ms | "
                     f"{total['torch'] / total['fast']:.2f}x |")
    return lines


def memory_growth(steps: int) -> tuple[float, float]:
    """RSS growth (MB) from step 2000 to ``steps`` while recording the MLP every step."""
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(60, 784), torch.randint(0, 10, (60,))
    step = make_step(model, x, y)
    with tempfile.TemporaryDirectory() as d:
        with icsk.Recorder(model, layers=["1", "3", "5"], capture="input", stats=["mean", "var", "quantiles"], path=d) as rec:
            base = None
            for s in range(steps):
                step()
                rec.step()
                if s == 2000:
                    gc.collect()
                    base = rss_mb()
            gc.collect()
            end = rss_mb()
        disk = sum(p.stat().st_size for p in Path(d).rglob("*")) / 2**20
    return end - base, disk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--memory-steps", type=int, default=100_000, help="MLP steps for the memory check (0 skips)")
    ap.add_argument("--mlp-threads", type=lambda t: [int(v) for v in t.split(",")], default=[1, 2],
                    help="comma-separated intra-op thread counts to time the MLP at (default 1,2)")
    ap.add_argument("--only", choices=["mlp", "vgg"], default=None, help="run one setting only (no --write)")
    ap.add_argument("--peers", type=lambda t: [] if t == "none" else t.split(","), default=list(PEERS),
                    help=f"comma-separated peers to time (default all: {','.join(PEERS)}); 'none' times icsk "
                         "against plain training only, so many more rounds fit in the same time (no --write)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where models and hooks run; cuda times the MLP once (no thread settings), skips "
                         "the CPU-only memory check and compares the torch path with the Triton kernel")
    ap.add_argument("--base", default=None, metavar="REV",
                    help="also time the Recorder of git revision REV in the same rounds and print icsk/base per "
                         "round with a 95%% interval (an A/B of a change; no --write)")
    ap.add_argument("--vgg-batch", type=int, default=128, help="VGG batch size (default 128; others: no --write)")
    ap.add_argument("--vgg-stats", choices=list(VGG_STATS), default="moments+hist",
                    help="VGG statistics: mean/var + histogram (default), or every statistic but the quantiles "
                         "(no --write)")
    ap.add_argument("--vgg-steps", type=int, default=None, help="VGG steps per timed block (default 20 on GPUs, 3 on the CPU)")
    ap.add_argument("--write", type=Path, default=None, help="replace the '## Recorder overhead' section of this markdown file")
    args = ap.parse_args()
    torch.manual_seed(0)
    reps = args.repeats or (3 if args.quick else 9)
    mlp_reps = args.repeats or (3 if args.quick else 15)  # MLP blocks are short: more rounds, less noise
    rows = []
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here")
    if bad := set(args.peers) - set(PEERS):
        ap.error(f"--peers: unknown peer(s) {sorted(bad)}; choose from {','.join(PEERS)} or 'none'")
    dev = torch.device(args.device)
    partial = (bool(args.only) or args.peers != list(PEERS) or bool(args.base) or args.vgg_batch != 128
               or args.vgg_stats != "moments+hist" or args.vgg_steps is not None)  # not the full table: nothing written
    if args.vgg_batch < 1:
        ap.error(f"--vgg-batch must be >= 1, got {args.vgg_batch}")
    base = base_recorder(args.base) if args.base else None
    if partial:
        args.write = None
    if partial or gpu:
        args.memory_steps = 0
    default_threads = torch.get_num_threads()

    def where(threads: int) -> str:
        return torch.cuda.get_device_name() if gpu else f"{threads} intra-op thread(s)"

    for threads in ([] if args.only == "vgg" else [default_threads] if gpu else args.mlp_threads):
        torch.set_num_threads(threads)
        res = measure(f"mlp, {where(threads)}", mlp().to(dev), torch.randn(60, 784, device=dev), torch.randint(0, 10, (60,), device=dev),
                      ["1", "3", "5"], ("mean", "var", "quantiles"), steps_per_block=128 if args.quick else (512 if gpu else 1536),
                      repeats=mlp_reps, peers=args.peers, base=base)
        rows.append((f"Ioffe MLP 784-100x3-10, batch 60, {where(threads)}: mean/var/q.15/.5/.85 "
                     "of 3 sigmoid layers, every step", res, 1.15))
    torch.set_num_threads(default_threads)
    v = vgg_small().to(dev)
    convs = [n for n, mod in v.named_modules() if isinstance(mod, nn.Conv2d)]
    vb, (stats_label, vgg_stats) = args.vgg_batch, VGG_STATS[args.vgg_stats]
    res = None if args.only == "mlp" else measure(
        "vgg", v, torch.randn(vb, 3, 32, 32, device=dev), torch.randint(0, 10, (vb,), device=dev), convs,
        vgg_stats, steps_per_block=args.vgg_steps or ((5 if gpu else 2) if args.quick else (20 if gpu else 3)),
        repeats=reps, peers=args.peers, base=base)
    if res is not None:
        rows.append((f"VGG-small 32x32, batch {vb}, {where(default_threads)}: {stats_label} of 4 conv layers, "
                     "every step", res, 1.05))
    lines = ["| setting | plain step | icsk | icsk, middle half of rounds | icsk, 95 % interval of the median | "
             "naive-numpy | torch-simple | fastai-item | target (icsk) |", "|---|---|---|---|---|---|---|---|---|"]
    for title, r, target in rows:
        p = r["plain"][0]
        peer = " | ".join(f"{r[k][1]:.2f}x" if k in r else "not timed" for k in PEERS)
        ok = "CPU target, for reference" if gpu else "met" if r["icsk"][1] <= target else "MISSED"
        lo, hi = r["icsk"][4]
        lines.append(f"| {title} | {p * 1e3:.2f} ms | **{r['icsk'][1]:.3f}x** | {r['icsk'][2]:.3f}x to {r['icsk'][3]:.3f}x | "
                     f"{lo:.3f}x to {hi:.3f}x | {peer} | <= {target}x ({ok}) |")
    if args.memory_steps:
        grow, disk = memory_growth(args.memory_steps)
        ok = "met" if grow < 50 else "MISSED"
        lines.append("")
        lines.append(f"Memory: recording {args.memory_steps:,} MLP steps (3 layers, mean/var/3 quantiles, every step) "
                     f"grew resident memory by **{grow:.1f} MB** after step 2,000 (target < 50 MB: {ok}); "
                     f"run folder on disk: {disk:.1f} MB.")
    if args.only != "mlp":
        where_reduced = torch.cuda.get_device_name() if gpu else f"the CPU, {torch.get_num_threads()} threads"
        lines += ["", f"Per-step reduction cost of each VGG conv output on {where_reduced} (32-bin histograms, "
                  "medians of interleaved repeats):", ""]
        lines += reduction_costs(repeats=max(20, reps) if gpu else max(5, reps), dev=dev)
    for other, label, versus in (("base", f"icsk@{args.base}", f"this tree / {args.base}"),
                                 ("icsk-torch", "icsk with ICSK_TRITON=0 (torch path)", "ICSK_TRITON=0 / icsk")):
        if any(other in r for _, r, _ in rows):
            lines.append("")
        for title, r, _ in rows:
            if other in r:
                a, b = (r["icsk"], r[other]) if other == "base" else (r[other], r["icsk"])
                ab = [u / v for u, v in zip(a[5], b[5], strict=True)]
                lo, hi = median_ci(ab)
                lines.append(f"{title}: {label} {r[other][1]:.3f}x; {versus}, per round: "
                             f"median {statistics.median(ab):.3f} (95 % interval {lo:.3f} to {hi:.3f})")
    table = "\n".join(lines)
    print(table)
    if args.write:
        cmd = "python scripts/bench_recorder.py" + (" --quick" if args.quick else "") + (" --device cuda" if gpu else "") + (
            f" --memory-steps {args.memory_steps}" if not gpu and args.memory_steps != 100_000 else "") + f" --write {args.write}"
        heading = "## Recorder overhead on a GPU" if gpu else "## Recorder overhead"
        machine = f"{torch.cuda.get_device_name()} and " if gpu else ""
        section = (f"{heading}\n\nProduced by `{cmd}` on {machine}{platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} CPUs, torch {torch.__version__}; medians of {mlp_reps} (MLP) and {reps} (VGG) "
                   "interleaved rounds after a warm-up round. A round's ratio is (step time with hooks) / (mean "
                   "plain step time of the plain blocks that open this round and the next); the middle half of "
                   "rounds is the range from the first to the third quartile of those ratios. The plain block opens "
                   f"every round; the other configurations run in reverse order every other round.\n\n{table}\n")
        write_section(args.write, heading, section)


if __name__ == "__main__":
    main()
