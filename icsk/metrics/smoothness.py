"""Loss landscape along the gradient (Santurkar et al. 2018, Fig. 4), measured online.

At w with g = ∇L(w) over all trainable parameters and the batch fixed, for each step size
η = scale·lr:
    loss variation          L(w − ηg)                       (reported as its min and max over η)
    gradient predictiveness ‖∇L(w) − ∇L(w − ηg)‖₂           (min and max over η)
    effective β-smoothness  max_η ‖∇L(w) − ∇L(w − ηg)‖₂ / ‖ηg‖₂
Evaluated functionally on cloned buffers with the RNG reset before every forward (see
:mod:`icsk.metrics.ics`): weights, BN running statistics, ``.grad`` and the RNG are untouched.
Cost: 1 + len(scales) forward/backward passes (len(scales) when the training step's gradient
is passed in as ``grad``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .ics import LossFn, _Evaluator, _probe_context, _trainable

# 8 log-spaced multiples of the learning rate in [0.5, 4] (ratio 2^(3/7) between neighbours),
# the VGG range of Santurkar et al.; their deep linear net uses [0.01, 30].
DEFAULT_SCALES: tuple[float, ...] = tuple(float(s) for s in np.geomspace(0.5, 4.0, 8))


def _norm(ts: Sequence[torch.Tensor]) -> float:
    """Euclidean norm of a tensor list as one vector (per-tensor norms combined in float64)."""
    norms = torch._foreach_norm(list(ts))
    return math.sqrt(sum(float(n) ** 2 for n in norms))


def loss_smoothness(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    lr: float,
    scales: Sequence[float] = DEFAULT_SCALES,
    *,
    return_curve: bool = False,
    train: bool = True,
    grad: dict[str, torch.Tensor] | None = None,
    loss: float | None = None,
) -> dict[str, Any]:
    """Loss and gradient variation along −∇L(w) at step sizes η = scale·lr.

    Returns floats ``loss`` (L(w)), ``grad_norm`` (‖g‖), ``loss_min``/``loss_max`` (over η of
    L(w − ηg)), ``grad_change_min``/``grad_change_max`` and ``beta`` (max over η of
    ‖∇L(w) − ∇L(w − ηg)‖ / ‖ηg‖), each NaN when a step size gives NaN (the variation is then
    unbounded, whatever the order of ``scales``); with ``return_curve`` also ``curve``, a DataFrame with one row
    per η: ``scale, eta, loss, grad_change, beta``. ``train``: training-mode forwards (BN on batch
    statistics; modes restored afterwards); False keeps the current modes.

    ``grad`` (parameter name -> ∇L(w), e.g. the ``.grad`` of the training step on this batch,
    taken from the same RNG state) and ``loss`` (L(w)) skip the first pass: the probe then costs
    k forward/backward passes instead of 1 + k."""
    scales = [float(s) for s in scales]
    if not scales:
        raise ValueError("scales must hold at least one step-size multiple")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    names = _trainable(model)
    with _probe_context(model, train) as rng:
        ev = _Evaluator(model, loss_fn, batch, rng)
        current = {n: p.detach() for n, p in model.named_parameters()}
        if grad is None:
            loss0, g = ev.grad(current, names)
        else:
            missing = [n for n in names if n not in grad]
            if missing:
                raise ValueError(f"grad lacks trainable parameters {missing[:3]}...; pass one tensor per name")
            g = [torch.zeros_like(current[n]) if grad[n] is None else grad[n].detach() for n in names]
            loss0 = float("nan") if loss is None else loss
        gnorm = _norm(g)
        base = [current[n] for n in names]
        rows = []
        for s in scales:
            eta = s * lr
            params = dict(current)
            params.update(zip(names, torch._foreach_add(base, g, alpha=-eta), strict=True))
            loss_e, g_e = ev.grad(params, names)
            change = _norm(torch._foreach_sub(g, g_e))
            beta = change / (eta * gnorm) if gnorm > 0 else float("nan")
            rows.append((s, eta, float(loss_e), change, beta))
    _, _, losses, changes, betas = zip(*rows, strict=True)
    out: dict[str, Any] = {
        "loss": float(loss0),
        "grad_norm": gnorm,
        # np.min/np.max: NaN anywhere gives NaN (Python's min/max keep or drop it by position)
        "loss_min": float(np.min(losses)),
        "loss_max": float(np.max(losses)),
        "grad_change_min": float(np.min(changes)),
        "grad_change_max": float(np.max(changes)),
        "beta": float(np.max(betas)),
    }
    if return_curve:
        out["curve"] = pd.DataFrame(rows, columns=["scale", "eta", "loss", "grad_change", "beta"])
    return out
