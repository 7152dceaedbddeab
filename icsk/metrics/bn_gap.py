"""Train/eval gap of batch norm: running (EWMA) statistics vs the current batch's statistics.

In training mode BN normalises with the batch mean and (biased) batch variance; in eval mode
with ``running_mean``/``running_var``. How far apart the two are on a batch is the part of the
train/eval discrepancy that BN itself introduces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn
from .drift import gaussian_w2
from .ics import forward_leaving_state


def _has_running_stats(module: nn.Module) -> bool:
    rm, rv = getattr(module, "running_mean", None), getattr(module, "running_var", None)
    return isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor)


def _bn_layers(model: nn.Module, layers: Sequence[str] | None) -> dict[str, nn.Module]:
    """Named modules with running statistics (default: every one of them, BN or look-alike)."""
    named = dict(model.named_modules())
    if layers is None:
        chosen = {n: m for n, m in named.items() if _has_running_stats(m)}
        if not chosen:
            raise ValueError("the model has no batch-norm layer with running statistics "
                             "(track_running_stats=True)")
        return chosen
    chosen = {}
    for n in layers:
        if n not in named:
            raise ValueError(f"layer {n!r} is not a module of the model")
        if not _has_running_stats(named[n]):
            raise ValueError(f"layer {n!r} ({type(named[n]).__name__}) has no running_mean/running_var")
        chosen[n] = named[n]
    return chosen


def bn_gap(
    model: nn.Module,
    x: Any,
    layers: Sequence[str] | None = None,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> pd.DataFrame:
    """Per BN layer: distance of the running statistics from the batch statistics of its input.

    One training-mode forward of ``x`` (``forward(model, x)``, default ``model(x)``) under
    no_grad on cloned buffers; the RNG, modes and running statistics are left as found.
    Rows ``layer, mean_shift, var_ratio, w2``, each a mean over channels of
    |μ_b − μ_r| / sqrt(var_r + eps), var_b / var_r, and W2(N(μ_b, var_b), N(μ_r, var_r)), where
    var_b is the biased batch variance BN normalises with."""
    chosen = _bn_layers(model, layers)
    running = {n: (m.running_mean.detach().clone(), m.running_var.detach().clone(), float(getattr(m, "eps", 0.0)))
               for n, m in chosen.items()}
    results: dict[str, tuple[float, float, float]] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if name in results or not args:
                return
            a = args[0].detach().to(torch.float64)
            dims = [d for d in range(a.dim()) if d != 1]
            var_b, mu_b = torch.var_mean(a, dim=dims, correction=0)
            rm, rv, eps = running[name]
            mu_r, var_r = rm.to(torch.float64), rv.to(torch.float64)
            results[name] = (
                float((torch.abs(mu_b - mu_r) / torch.sqrt(var_r + eps)).mean()),
                float((var_b / var_r).mean()),
                float(gaussian_w2(mu_b, var_b, mu_r, var_r).mean()),
            )
        return hook

    handles = []
    try:
        for n, m in chosen.items():
            handles.append(m.register_forward_pre_hook(make_hook(n)))
        forward_leaving_state(model, x, forward)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in chosen if n not in results]
    if missing:
        raise ValueError(f"BN layer(s) {missing} were not called by the forward pass")
    return pd.DataFrame([(n, *results[n]) for n in chosen], columns=["layer", "mean_shift", "var_ratio", "w2"])

