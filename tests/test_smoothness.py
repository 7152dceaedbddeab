"""Loss smoothness along the gradient: quadratic closed forms, a BN network against ordinary
backprop on copies, and no side effects."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from icsk.metrics import DEFAULT_SCALES, loss_smoothness


pytestmark = pytest.mark.usefixtures("one_thread")


class Quadratic(nn.Module):
    """Holds w; the loss is 0.5 wᵀAw."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())


def spd(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random symmetric positive-definite matrix and its eigenvalues."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.linspace(0.1, 5.0, n, dtype=torch.float64)
    return q @ torch.diag(lam) @ q.T, lam


def test_default_scales_are_log_spaced_in_range():
    s = np.array(DEFAULT_SCALES)
    assert len(s) == 8 and s[0] == 0.5 and s[-1] == 4.0
    assert_close(np.diff(np.log(s)), np.full(7, np.log(8) / 7))


@pytest.mark.parametrize("lr", [0.01, 0.3])
def test_quadratic_closed_form(lr):
    A, lam = spd(6)
    w0 = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    model = Quadratic(w0)
    loss_fn = lambda m, _: 0.5 * m.w @ A @ m.w  # noqa: E731
    out = loss_smoothness(model, loss_fn, None, lr, return_curve=True)
    g = A @ w0
    etas = torch.tensor(DEFAULT_SCALES, dtype=torch.float64) * lr
    losses = torch.stack([0.5 * (w0 - e * g) @ A @ (w0 - e * g) for e in etas])
    changes = etas * torch.linalg.norm(A @ g)  # ∇L(w) − ∇L(w − ηg) = ηA g
    beta = torch.linalg.norm(A @ g) / torch.linalg.norm(g)
    curve = out["curve"]
    assert list(curve.columns) == ["scale", "eta", "loss", "grad_change", "beta"]
    assert_close(torch.tensor(curve["eta"].to_list(), dtype=torch.float64), etas)
    assert_close(torch.tensor(curve["loss"].to_list(), dtype=torch.float64), losses)
    assert_close(torch.tensor(curve["grad_change"].to_list(), dtype=torch.float64), changes)
    assert_close(out["loss"], float(0.5 * w0 @ A @ w0))
    assert_close(out["grad_norm"], float(torch.linalg.norm(g)))
    assert_close(out["loss_min"], float(losses.min()))
    assert_close(out["loss_max"], float(losses.max()))
    assert_close(out["grad_change_min"], float(changes.min()))
    assert_close(out["grad_change_max"], float(changes.max()))
    assert_close(out["beta"], float(beta))
    assert out["beta"] <= float(lam.max()) * (1 + 1e-12)
    assert torch.equal(model.w.detach(), w0) and model.w.grad is None


def test_beta_bounded_by_lambda_max_at_eigenvector():
    """Along the top eigenvector the effective β reaches λ_max exactly."""
    A, lam = spd(5, seed=3)
    evals, evecs = torch.linalg.eigh(A)
    model = Quadratic(evecs[:, -1])
    out = loss_smoothness(model, lambda m, _: 0.5 * m.w @ A @ m.w, None, 0.05, scales=[1.0, 3.0])
    assert_close(out["beta"], float(lam.max()))


def bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)).double()


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def test_bn_network_matches_backprop_on_copies():
    model = bn_net()
    g = torch.Generator().manual_seed(2)
    batch = torch.randn(24, 5, generator=g, dtype=torch.float64), torch.randn(24, 3, generator=g, dtype=torch.float64)
    scales = (0.5, 1.0, 4.0)
    lr = 0.2
    rng = torch.get_rng_state()
    ref = copy.deepcopy(model)
    loss0 = mse(ref, batch)
    loss0.backward()
    g0 = [p.grad.clone() for p in ref.parameters()]
    gnorm = torch.sqrt(sum((t**2).sum() for t in g0))
    want = []
    for s in scales:
        m = copy.deepcopy(model)
        with torch.no_grad():
            for p, gi in zip(m.parameters(), g0, strict=True):
                p -= s * lr * gi
        torch.set_rng_state(rng)
        loss = mse(m, batch)
        loss.backward()
        change = torch.sqrt(sum(((a - p.grad) ** 2).sum() for a, p in zip(g0, m.parameters(), strict=True)))
        want.append((loss.item(), change.item(), (change / (s * lr * gnorm)).item()))
    torch.set_rng_state(rng)
    out = loss_smoothness(model, mse, batch, lr, scales, return_curve=True)
    assert_close(out["loss"], loss0.item())
    assert_close(out["grad_norm"], float(gnorm))
    for (loss, change, beta), row in zip(want, out["curve"].itertuples(), strict=True):
        assert_close(row.loss, loss)
        assert_close(row.grad_change, change)
        assert_close(row.beta, beta)
    assert_close(out["beta"], max(b for *_, b in want))
    # nothing moved: weights, running stats, counters, grads, RNG
    fresh = bn_net()
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_errors():
    model = bn_net()
    with pytest.raises(ValueError, match="lr must be positive"):
        loss_smoothness(model, mse, None, 0.0)
    with pytest.raises(ValueError, match="scales"):
        loss_smoothness(model, mse, None, 0.1, scales=[])
    with pytest.raises(ValueError, match="scalar tensor"):
        loss_smoothness(model, lambda m, b: m(b[0]), (torch.randn(4, 5, dtype=torch.float64), None), 0.1)


def shared_models() -> list[nn.Module]:
    torch.manual_seed(0)
    base = nn.Linear(4, 4).double()
    enc, dec = nn.Linear(4, 4).double(), nn.Linear(4, 4).double()
    dec.weight = enc.weight  # one Parameter in two modules
    return [nn.Sequential(base, nn.Tanh(), base), nn.Sequential(enc, nn.Tanh(), dec)]  # one module, two names


@pytest.mark.parametrize("case", [0, 1], ids=["module-twice", "shared-parameter"])
def test_shared_parameters_get_their_full_gradient(case):
    """Tied tensors: the probe differentiates through every use and leaves the model intact
    (torch's functional_call with tie_weights=True corrupts the module-twice case)."""
    model = shared_models()[case]
    params = list(model.parameters())
    x = torch.randn(10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    loss_fn = lambda m, b: (m(b) ** 2).mean()  # noqa: E731
    ref = copy.deepcopy(model)
    loss_fn(ref, x).backward()
    g = [p.grad.clone() for p in ref.parameters()]
    out = loss_smoothness(model, loss_fn, x, 0.1, scales=[1.0], return_curve=True)
    assert_close(out["grad_norm"], torch.sqrt(sum((t**2).sum() for t in g)).item())
    m1 = copy.deepcopy(model)
    with torch.no_grad():
        for p, gi in zip(m1.parameters(), g, strict=True):
            p -= 0.1 * gi
    assert_close(out["curve"].loss.iloc[0], loss_fn(m1, x).item())
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    for _, m in model.named_modules(remove_duplicate=False):
        assert all(isinstance(p, nn.Parameter) for p in m.parameters(recurse=False))


def test_reusing_the_training_gradient_gives_the_same_result():
    """``grad=`` (the training step's gradient) skips a pass without changing any number."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    batch = (torch.randn(16, 5), torch.randint(0, 3, (16,)))

    def lf(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1])

    full = loss_smoothness(model, lf, batch, 0.1)
    loss = lf(model, batch)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    reused = loss_smoothness(model, lf, batch, 0.1, grad=grads, loss=loss.item())
    for k in ("loss", "loss_min", "loss_max", "grad_change_min", "grad_change_max", "beta", "grad_norm"):
        assert reused[k] == pytest.approx(full[k], rel=1e-6, abs=1e-9), k


@pytest.mark.parametrize("order", [1, -1])
def test_a_nan_probe_point_makes_min_and_max_nan_whatever_the_order(order):
    """A step size whose loss is NaN (log of a negative weight) makes the variation unbounded:
    min and max are NaN, for ascending and descending scales alike."""

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([1.0]))

        def forward(self, x):
            return self.w

    def loss(m, b):
        return (torch.log(m(b)) + 2 * m(b)).sum()  # g = 3: NaN once 1 - 0.3 * scale < 0

    r = loss_smoothness(Toy(), loss, None, lr=0.1, scales=[0.5, 1.0, 2.0, 4.0][::order], return_curve=True)
    assert r["curve"].loss.isna().sum() == 1  # only eta = 0.4 (the gradient 1/w + 2 stays finite there)
    assert math.isnan(r["loss_min"]) and math.isnan(r["loss_max"])
    assert r["grad_change_max"] == r["curve"].grad_change.max() and math.isfinite(r["beta"])
    finite = loss_smoothness(Toy(), loss, None, lr=0.1, scales=[0.5, 1.0, 2.0][::order])
    assert math.isfinite(finite["loss_max"]) and finite["loss_min"] < finite["loss_max"]
