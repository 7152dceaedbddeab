"""Cost of the online metric probes relative to one training step.

One training step = forward + backward + SGD(momentum) step. For each model the script times,
interleaved in one process after a warm-up, a training step, one gradient-ICS probe over the
model's L weight layers, and one loss-smoothness probe with k step sizes, and reports the
median over repeats of (probe time / step time) of adjacent measurements. Targets: ICS ≤ L
(one forward/backward per layer at most), smoothness ≤ k.

Usage: python scripts/bench_metrics.py [--quick] [--repeats N] [--write reports/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmd import write_section  # noqa: E402
from icsk.metrics import DEFAULT_SCALES, gradient_ics, loss_smoothness  # noqa: E402

VGG_CHANNELS = (64, "M", 128, "M", 256, 256, "M")


# ---------------------------------------------------------------- models (zoo, or inline fallback)
class _Block(nn.Sequential):
    pass


def _inline_vgg(norm: str) -> nn.Module:
    """VGG-style CNN for 32x32 inputs, same layer names as icsk.models (block{i}.conv, head)."""
    model = nn.Sequential()
    c, i = 3, 0
    for v in VGG_CHANNELS:
        if v == "M":
            model[-1].add_module("pool", nn.MaxPool2d(2))
            continue
        i += 1
        blk = _Block()
        blk.add_module("conv", nn.Conv2d(c, v, 3, padding=1))
        blk.add_module("norm", nn.BatchNorm2d(v) if norm == "bn" else nn.Identity())
        blk.add_module("act", nn.ReLU())
        model.add_module(f"block{i}", blk)
        c = v
    model.add_module("flatten", nn.Flatten())
    model.add_module("head", nn.Linear(c * 4 * 4, 10))
    return model


def _inline_mlp(norm: str) -> nn.Module:
    """784-100-100-100-10 sigmoid MLP with the icsk.models layer names (block{i}.linear, head)."""
    model = nn.Sequential()
    model.add_module("flatten", nn.Flatten())
    fan_in = 784
    for i in range(1, 4):
        blk = _Block()
        blk.add_module("linear", nn.Linear(fan_in, 100))
        blk.add_module("norm", nn.BatchNorm1d(100) if norm == "bn" else nn.Identity())
        blk.add_module("act", nn.Sigmoid())
        model.add_module(f"block{i}", blk)
        fan_in = 100
    model.add_module("head", nn.Linear(100, 10))
    return model


def build(kind: str, norm: str) -> tuple[nn.Module, str]:
    """(model, source): icsk.models when importable, else the inline equivalent."""
    try:
        from icsk.models import MLP, VGG

        if kind == "vgg":
            return VGG(num_classes=10, channels=VGG_CHANNELS, activation="relu", norm=norm), "icsk.models.VGG"
        return MLP(784, 10, depth=3, width=100, activation="sigmoid", norm=norm), "icsk.models.MLP"
    except Exception as e:  # noqa: BLE001 - any failure of the zoo falls back to the inline net
        print(f"icsk.models unavailable ({type(e).__name__}: {e}); using inline {kind}", file=sys.stderr)
        return (_inline_vgg(norm) if kind == "vgg" else _inline_mlp(norm)), "inline"


def weight_layers(model: nn.Module) -> list[str]:
    """Names of the Linear/Conv modules in registration (= forward) order."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


# ---------------------------------------------------------------- timing
def timed(fn: Callable[[], object], clock: Callable[[], float]) -> float:
    t0 = clock()
    fn()
    return clock() - t0


def bench(kind: str, norm: str, repeats: int, warmup: int, batch_size: int, lr: float) -> dict:
    """Median probe/step ratios of one model, interleaved measurements.

    Single-threaded runs are timed by the thread's CPU time (all work happens in this thread,
    and other processes on a shared machine do not inflate it); multi-threaded ones by wall clock."""
    clock, clock_name = (time.thread_time, "thread CPU") if torch.get_num_threads() == 1 else (time.perf_counter, "wall")
    torch.manual_seed(0)
    model, source = build(kind, norm)
    model.train()
    g = torch.Generator().manual_seed(1)
    shape = (batch_size, 3, 32, 32) if kind == "vgg" else (batch_size, 784)
    batch = torch.randn(shape, generator=g), torch.randint(0, 10, (batch_size,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    layers = weight_layers(model)

    def step() -> None:
        loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def ics() -> None:
        gradient_ics(model, loss_fn, batch, opt, layers)

    def smooth() -> None:
        # as in the training loop: the probe reuses the gradient of the step on this batch
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        loss_smoothness(model, loss_fn, batch, lr, DEFAULT_SCALES, grad=grads)

    r_ics, r_sm, t_step, t_ics, t_sm = [], [], [], [], []
    for r in range(warmup + repeats):
        s1 = timed(step, clock)
        a = timed(ics, clock)
        s2 = timed(step, clock)
        b = timed(smooth, clock)
        if r >= warmup:
            r_ics.append(a / s1)
            r_sm.append(b / s2)
            t_step += [s1, s2]
            t_ics.append(a)
            t_sm.append(b)
    return {
        "model": "VGG (64,M,128,M,256,256,M)" if kind == "vgg" else "MLP 784-100-100-100-10",
        "norm": norm, "source": source, "L": len(layers), "k": len(DEFAULT_SCALES), "clock": clock_name,
        "threads": torch.get_num_threads(),
        "step_ms": 1e3 * statistics.median(t_step), "ics_ms": 1e3 * statistics.median(t_ics),
        "sm_ms": 1e3 * statistics.median(t_sm),
        "ics_ratio": statistics.median(r_ics), "sm_ratio": statistics.median(r_sm),
    }


def table(rows: list[dict]) -> str:
    head = ("| model | norm | threads, clock | step ms | ICS probe ms | ICS / step | target ≤ L | "
            "smoothness ms | smoothness / step | target ≤ k |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        ok_i = "ok" if r["ics_ratio"] <= r["L"] else "**over**"
        ok_s = "ok" if r["sm_ratio"] <= r["k"] else "**over**"
        lines.append(
            f"| {r['model']} | {r['norm']} | {r['threads']}, {r['clock']} | {r['step_ms']:.1f} | {r['ics_ms']:.1f} | {r['ics_ratio']:.2f} | "
            f"{r['L']} ({ok_i}) | {r['sm_ms']:.1f} | {r['sm_ratio']:.2f} | {r['k']} ({ok_s}) |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (3 + 1 warm-up instead of 7 + 2)")
    ap.add_argument("--repeats", type=int, default=None, help="measured repeats per VGG model (default 7; 3 with --quick)")
    ap.add_argument("--mlp-repeats", type=int, default=30, help="measured repeats per MLP model (its steps take ms)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--models", default="vgg,mlp", help="comma list of vgg, mlp")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads for VGG (default: torch's choice)")
    ap.add_argument("--mlp-threads", type=int, default=1,
                    help="threads for the MLP (default 1: its small GEMMs gain nothing from more, and OpenMP "
                         "synchronisation dominates on a busy machine)")
    ap.add_argument("--write", type=Path, default=None, help="replace the '## Metrics probes' section of this markdown file")
    args = ap.parse_args()
    default_threads = args.threads or torch.get_num_threads()
    repeats = args.repeats or (3 if args.quick else 7)
    warmup = 1 if args.quick else 2
    rows = []
    for kind in args.models.split(","):
        for norm in ("bn", "none"):
            reps = args.mlp_repeats if kind.strip() == "mlp" else repeats
            torch.set_num_threads(args.mlp_threads if kind.strip() == "mlp" else default_threads)
            rows.append(bench(kind.strip(), norm, reps, warmup, args.batch_size, args.lr))
            r = rows[-1]
            print(f"{r['model']} {norm}: step {r['step_ms']:.1f} ms, ICS {r['ics_ratio']:.2f}x (L={r['L']}), "
                  f"smoothness {r['sm_ratio']:.2f}x (k={r['k']})", file=sys.stderr, flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    env = (f"torch {torch.__version__}, {default_threads} threads (MLP: {args.mlp_threads}), {os.cpu_count()} CPUs, "
           f"{platform.processor() or platform.machine()}, load average {load:.1f} at the end; "
           f"batch {args.batch_size}, SGD lr {args.lr} momentum 0.9, {repeats} (VGG) / {args.mlp_repeats} (MLP) "
           f"repeats after {warmup} warm-up, "
           f"models from {rows[0]['source']}")
    md = table(rows)
    print(md)
    print(f"\n{env}")
    if args.write:
        cmd = "python scripts/bench_metrics.py" + " ".join([""] + [a for a in sys.argv[1:]])
        section = (
            "## Metrics probes\n\n"
            f"Produced by `{cmd}` ({env}).\n\n"
            "Ratios are medians over repeats of probe time / adjacent training-step time (forward + "
            "backward + SGD step), measured interleaved in one process. The gradient-ICS probe costs one "
            "full forward/backward, the optimizer step on a copy, and one forward plus a backward down to "
            "layer i for each layer i ≥ 2; the smoothness probe costs one forward/backward per step size, "
            f"∇L(w − ηg) for k = {len(DEFAULT_SCALES)} log-spaced η in [0.5, 4]·lr, because, as in the "
            "training loop, it reuses the gradient ∇L(w) of the training step on the same batch and RNG "
            "state (standalone, without `grad=`, it costs 1 + k). "
            "On a shared machine (see the load average) single runs move by ±20 %.\n\n"
            f"{md}\n"
        )
        write_section(args.write, "## Metrics probes", section)
        print(f"wrote section '## Metrics probes' of {args.write}", file=sys.stderr)


if __name__ == "__main__":
    main()
