"""Gradient internal covariate shift (Santurkar et al. 2018), measured online.

For layer i at step t, with the batch fixed:
    G  = ∇_{W_i} L(W_1^t, ..., W_k^t)
    G' = ∇_{W_i} L(W_1^{t+1}, ..., W_{i−1}^{t+1}, W_i^t, ..., W_k^t)
where W^{t+1} is what the *real* optimizer step (its momentum/Adam state, weight decay, hooks)
would make of the full-loss gradient at w_t. ‖G − G'‖ and cos(G, G') say how much the
updates of the preceding layers change the gradient the layer sees.

The probes here (and in :mod:`smoothness`, :mod:`bn_gap`) are side-effect free: every forward
goes through ``torch.func.functional_call`` on detached parameter tensors and *cloned* buffers
(BN running statistics untouched), ``.grad`` fields are never written, the optimizer is run on
a private copy, and the torch RNG state (CPU and CUDA) is restored afterwards. Every forward
of one probe starts from the same RNG state, so dropout/noisy layers draw the same noise in
G and G' (and the same noise the training forward that follows will draw).
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.func import functional_call

from ..hooks import nearest_names

LossFn = Callable[[nn.Module, Any], torch.Tensor]


# ---------------------------------------------------------------------- shared probe plumbing
class RngSnapshot:
    """Snapshot of the torch RNG state (CPU and every initialised CUDA device)."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def restore(self) -> None:
        """Put the generators back to the snapshot."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


@contextmanager
def _probe_context(model: nn.Module, train: bool) -> Iterator[RngSnapshot]:
    """Training mode (if ``train``) and a saved RNG state for the block; both restored on exit."""
    rng = RngSnapshot()
    flags = [(m, m.training) for m in model.modules()]
    if train:
        model.train()
    try:
        yield rng
    finally:
        for m, f in flags:
            m.training = f
        rng.restore()


class _CallModule(nn.Module):
    """``forward(batch) = fn(model, batch)``, so functional_call can swap the model's tensors
    while user code (a loss function, a custom forward) calls the model itself."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, Any], Any]):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_fn", fn)  # never registered as a submodule

    def forward(self, batch: Any) -> Any:
        return self._fn(self.model, batch)


def _tensor_slots(model: nn.Module) -> dict[str, str]:
    """{slot name: canonical name} for every place (module, attribute) holding a parameter or buffer.

    A tensor shared by two modules has two slots (both must be swapped); a module registered
    under two names has one (swapping it twice would make functional_call restore the swapped
    tensor, as torch does with ``tie_weights=True`` in that case)."""
    canon = {id(t): n for n, t in model.named_parameters()}
    canon.update({id(t): n for n, t in model.named_buffers()})
    slots: dict[str, str] = {}
    seen: set[tuple[int, str]] = set()
    for mname, m in model.named_modules(remove_duplicate=False):
        for attr, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if (id(m), attr) not in seen:
                seen.add((id(m), attr))
                slots[f"{mname}.{attr}" if mname else attr] = canon[id(t)]
    return slots


def forward_leaving_state(model: nn.Module, x: Any, forward: Callable[[nn.Module, Any], Any] | None = None,
                          train: bool = True) -> Any:
    """One forward of ``x`` (``forward(model, x)``, default ``model(x)``) under no_grad, in
    training mode if ``train``, on cloned buffers: the RNG, modes and buffers (BN running
    statistics) are left as found. Forward hooks on the model's modules fire as usual."""
    clones = {n: b.clone() for n, b in model.named_buffers()}
    tensors = {f"model.{slot}": clones[name] for slot, name in _tensor_slots(model).items() if name in clones}
    wrapper = _CallModule(model, forward or (lambda m, inp: m(inp)))
    with _probe_context(model, train=train), torch.no_grad():
        return functional_call(wrapper, tensors, (x,), tie_weights=False)


class _Evaluator:
    """Evaluates loss_fn at arbitrary parameter values, functionally and reproducibly."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batch: Any, rng: RngSnapshot):
        self.wrapper = _CallModule(model, loss_fn)
        self.batch = batch
        self.rng = rng
        self.buffers = dict(model.named_buffers())
        self.slots = _tensor_slots(model)

    def loss(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """loss_fn at ``params`` (name -> tensor, all of them) with fresh buffer clones, same RNG."""
        values = {**params, **{n: b.clone() for n, b in self.buffers.items()}}
        tensors = {f"model.{slot}": values[name] for slot, name in self.slots.items()}
        self.rng.restore()
        loss = functional_call(self.wrapper, tensors, (self.batch,), tie_weights=False)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn(model, batch) must return a scalar tensor, got {type(loss).__name__}"
                             + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
        return loss.reshape(())

    def grad(self, params: Mapping[str, torch.Tensor], wrt: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(loss, gradients w.r.t. the names ``wrt``); only those tensors carry autograd, so the
        backward pass stops at the earliest of them. Unused parameters get zero gradients."""
        leaves = {n: params[n].detach().requires_grad_(True) for n in wrt}
        full = {n: (leaves[n] if n in leaves else t.detach()) for n, t in params.items()}
        with torch.enable_grad():
            loss = self.loss(full)
            if not loss.requires_grad:
                raise ValueError("loss_fn(model, batch) does not depend on the probed parameters")
            grads = torch.autograd.grad(loss, [leaves[n] for n in wrt], allow_unused=True)
        out = [torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(wrt, grads, strict=True)]
        return loss.detach(), out


def _trainable(model: nn.Module) -> list[str]:
    """Names of parameters that require grad."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("the model has no parameter with requires_grad=True")
    return names


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Σ ⟨a_j, b_j⟩ over two tensor lists (one BLAS dot per tensor, summed in Python floats)."""
    return sum(float(torch.dot(x.reshape(-1), y.reshape(-1))) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------- gradient ICS
def _layer_params(model: nn.Module, layers: Sequence[str]) -> list[list[str]]:
    """Full names of the trainable parameters of each layer module (validated, disjoint)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    canon = {id(p): n for n, p in model.named_parameters()}  # a tied tensor goes by its first name
    owner: dict[str, str] = {}
    out = []
    for layer in layers:
        if layer not in modules:
            near = nearest_names(layer, [n for n in modules if n])
            raise ValueError(f"layer {layer!r} is not a module of the model; nearest names: {near}")
        names = [canon[id(p)] for p in modules[layer].parameters() if p.requires_grad]
        if not names:
            raise ValueError(f"layer {layer!r} has no trainable parameters")
        for n in names:
            if n in owner:
                raise ValueError(f"layers {owner[n]!r} and {layer!r} share parameter {n!r}; list disjoint modules")
            owner[n] = layer
        out.append(names)
    return out


def _group_params(model: nn.Module, layers: Sequence[str], groups: Sequence[str],
                  per_layer: Sequence[Sequence[str]]) -> list[list[str]]:
    """Full names of the trainable parameters of each group (one per layer, containing it, disjoint)."""
    if len(groups) != len(layers):
        raise ValueError(f"groups must name one module per layer: {len(groups)} groups for {len(layers)} layers")
    out = _layer_params(model, groups)
    for layer, group, inner, names in zip(layers, groups, per_layer, out, strict=True):
        if not set(inner) <= set(names):
            raise ValueError(f"group {group!r} must contain its layer {layer!r} (e.g. the block the layer is in)")
    return out


@contextmanager
def _call_order(model: nn.Module, layers: Sequence[str]) -> Iterator[list[str]]:
    """The names of ``layers`` in the order a forward inside the block first calls them."""
    modules = dict(model.named_modules(remove_duplicate=False))
    order: list[str] = []

    def seen(name: str) -> Callable[..., None]:
        return lambda module, args: None if name in order else order.append(name)

    handles = [modules[n].register_forward_pre_hook(seen(n)) for n in layers]
    try:
        yield order
    finally:
        for h in handles:
            h.remove()


_SHARED_ATTRS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                 "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                 "_optimizer_load_state_dict_post_hooks")


def _params_of(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's parameters, each once, in group order."""
    seen: dict[int, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            seen.setdefault(id(p), p)
    return list(seen.values())


def _would_be_update(optimizer: torch.optim.Optimizer, grads: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """New values {id(param): tensor} that ``optimizer.step()`` would give with ``grads``
    ({id(param): gradient}) as .grad.

    Runs the optimizer class's own ``step`` on a shadow instance whose parameters are clones and
    whose state is a copy (so momentum/Adam state, hyper-parameters and step hooks act exactly as
    in training; hooks with outside side effects see one extra call) and leaves the real
    optimizer untouched."""
    clones: dict[int, torch.Tensor] = {}
    for p in _params_of(optimizer):
        c = p.detach().clone()
        c.requires_grad_(p.requires_grad)
        g = grads.get(id(p))
        c.grad = None if g is None else g.detach().clone()
        clones[id(p)] = c
    memo: dict[int, Any] = dict(clones)  # deep copies map parameters to their clones
    shadow = object.__new__(type(optimizer))  # no __init__/__setstate__: nothing touches the original
    for k, v in optimizer.__dict__.items():
        if k == "step":
            continue  # an LR scheduler's wrapper, bound to the real optimizer
        # hooks are shared (they act on the shadow as they would in training); the rest is copied
        shadow.__dict__[k] = v if k in _SHARED_ATTRS else (
            None if k in ("state", "param_groups") else copy.deepcopy(v, memo))
    shadow.param_groups = [
        {k: ([clones[id(p)] for p in v] if k == "params" else copy.deepcopy(v, memo)) for k, v in group.items()}
        for group in optimizer.param_groups
    ]
    state: defaultdict[torch.Tensor, dict] = defaultdict(dict)
    for p, st in optimizer.state.items():
        state[clones.get(id(p), p)] = {
            k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v, memo)) for k, v in st.items()
        }
    shadow.state = state
    with torch.no_grad():
        type(optimizer).step(shadow)
    return {k: c.detach() for k, c in clones.items()}


def gradient_ics(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    optimizer: torch.optim.Optimizer,
    layers: Sequence[str],
    *,
    groups: Sequence[str] | None = None,
    only: Sequence[str] | None = None,
    train: bool = True,
) -> pd.DataFrame:
    """Santurkar's gradient ICS of each layer: rows ``layer, l2, cos, grad_norm``.

    ``layers``: module names in forward order; W_i = all trainable parameters of module i
    (weight and bias, flattened together), the parameters G and G' are taken of.
    ``groups``: optional module names, one per layer, each containing its layer: the
    parameters that move to w_{t+1} as "layer i" in G' of the layers after it (default: the
    layers themselves). Parameters in no group stay at w_t, so with ``layers`` =
    ``block{i}.linear`` the BN affine parameters between them move only if
    ``groups`` = ``block{i}``. The first layer's G' is G: list the network's first weight
    layer first. ``only``: some of ``layers``, the ones to probe (rows, and one backward each);
    the others still move in G' of the layers after them, so the rows are those of the full
    list. Call at w_t before the training step; model, buffers, ``.grad``,
    optimizer state and RNG are left exactly as found. ``train``: run the probe forwards in
    training mode (modes restored afterwards); False keeps the current modes.
    Closure-based optimizers (LBFGS) are not supported."""
    per_layer = _layer_params(model, layers)
    per_group = per_layer if groups is None else _group_params(model, layers, groups, per_layer)
    if only is not None and (unknown := [n for n in only if n not in layers]):
        raise ValueError(f"only={list(only)}: {unknown} not among the layers, which are {list(layers)}")
    probed = set(layers if only is None else only)
    trainable = _trainable(model)
    named = dict(model.named_parameters())
    with _probe_context(model, train) as rng:
        ev = _Evaluator(model, loss_fn, batch, rng)
        current = {n: p.detach() for n, p in named.items()}
        with _call_order(model, layers) as called:
            _, g_all = ev.grad(current, trainable)
        if called != [n for n in layers if n in called]:
            raise ValueError(f"layers must be listed in forward order (G' of a layer moves the ones before it); "
                             f"the forward calls them as {called}")
        g_full = dict(zip(trainable, g_all, strict=True))
        new_vals = _would_be_update(optimizer, {id(named[n]): g for n, g in g_full.items()})
        updated = {n: new_vals.get(id(p), current[n]) for n, p in named.items()}
        rows = []
        params = dict(current)
        for i, names in enumerate(per_layer):
            if i > 0:
                for n in per_group[i - 1]:
                    params[n] = updated[n]
            if layers[i] not in probed:
                continue
            G = [g_full[n] for n in names]
            Gp = G if i == 0 else ev.grad(params, names)[1]  # nothing precedes layer 1: G' is G by definition
            gg, pp, gp = _dot(G, G), _dot(Gp, Gp), _dot(G, Gp)
            diff = [x - y for x, y in zip(G, Gp, strict=True)]
            l2 = math.sqrt(_dot(diff, diff))
            c = gp / math.sqrt(gg * pp) if gg > 0 and pp > 0 else float("nan")
            cos = max(-1.0, min(1.0, c)) if math.isfinite(c) else float("nan")  # (min(1.0, nan) is 1.0)
            rows.append((layers[i], l2, cos, math.sqrt(gg)))
    return pd.DataFrame(rows, columns=["layer", "l2", "cos", "grad_norm"])
