"""Gradient ICS: against a slow obvious reference (manual optimizer update + ordinary
backprop), structural cases (layer 1, uncoupled layers, deep linear net), and the promise that
probing leaves training bit-identical."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from icsk.metrics import bn_gap, gradient_ics, loss_smoothness

LAYERS = ["0", "4", "7"]


pytestmark = pytest.mark.usefixtures("one_thread")


def bn_net(dtype=torch.float64, seed: int = 0) -> nn.Sequential:
    """Linear-BN-ReLU-Dropout-Linear-BN-ReLU-Linear: BN running stats and RNG use to protect."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(12, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3),
    ).to(dtype)


def ce_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def make_batch(n: int = 32, dtype=torch.float64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def make_opt(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=1e-3)
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train_steps(model, opt, n: int, seed: int = 10, probe=None):
    for k in range(n):
        batch = make_batch(seed=seed + k, dtype=next(model.parameters()).dtype)
        if probe is not None:
            probe(model, opt, batch)
        loss = ce_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()


def manual_update(kind: str, opt: torch.optim.Optimizer, param: nn.Parameter, g: torch.Tensor) -> torch.Tensor:
    """The optimizer's update of ``param`` written out by hand (from its current state)."""
    grp = opt.param_groups[0]
    st = opt.state.get(param, {})
    p = param.detach()
    lr, wd = grp["lr"], grp["weight_decay"]
    if kind == "sgd":
        mom = grp["momentum"]
        d = g + wd * p
        buf = mom * st["momentum_buffer"] + d if "momentum_buffer" in st else d.clone()
        d = d + mom * buf if grp["nesterov"] else buf
        return p - lr * d
    b1, b2 = grp["betas"]
    eps = grp["eps"]
    t = int(st["step"]) + 1 if "step" in st else 1
    m0 = st.get("exp_avg", torch.zeros_like(p))
    v0 = st.get("exp_avg_sq", torch.zeros_like(p))
    if kind == "adam":
        g = g + wd * p
        base = p
    else:  # AdamW: decoupled decay
        base = p * (1 - lr * wd)
    m = b1 * m0 + (1 - b1) * g
    v = b2 * v0 + (1 - b2) * g * g
    mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
    return base - lr * mhat / (vhat.sqrt() + eps)


def reference_ics(kind, model, opt, batch, layers, groups=None):
    """Slow obvious G and G': deep copies, manual updates, ordinary loss.backward()."""
    groups = layers if groups is None else groups
    rng = torch.get_rng_state()
    m0 = copy.deepcopy(model)
    torch.set_rng_state(rng)
    ce_loss(m0, batch).backward()
    real = dict(model.named_parameters())
    grads = {n: p.grad.clone() for n, p in m0.named_parameters()}
    new = {n: manual_update(kind, opt, real[n], grads[n]) for n in grads}
    rows = []
    for i, layer in enumerate(layers):
        mi = copy.deepcopy(model)
        with torch.no_grad():
            for prev in groups[:i]:
                for n, p in mi.get_submodule(prev).named_parameters():
                    p.copy_(new[f"{prev}.{n}"])
        torch.set_rng_state(rng)
        ce_loss(mi, batch).backward()
        names = [f"{layer}.{n}" for n, _ in mi.get_submodule(layer).named_parameters()]
        G = torch.cat([grads[n].reshape(-1) for n in names])
        Gp = torch.cat([mi.get_parameter(n).grad.reshape(-1) for n in names])
        rows.append(((G - Gp).norm().item(), (G @ Gp / (G.norm() * Gp.norm())).item(), G.norm().item()))
    torch.set_rng_state(rng)
    return rows


def blocked_bn_net() -> nn.Sequential:
    """Blocks (Linear, BN, ReLU) then a head: the layout of icsk's model zoo."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU()),
                         nn.Sequential(nn.Linear(12, 10), nn.BatchNorm1d(10), nn.ReLU()),
                         nn.Linear(10, 3)).double()


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_groups_move_the_whole_earlier_block(kind):
    """With groups, G' of layer i sees every earlier block at w_{t+1}, BN affine parameters included."""
    model = blocked_bn_net()
    opt = make_opt(kind, model)
    train_steps(model, opt, 3)
    batch = make_batch(seed=98)
    layers, groups = ["0.0", "1.0", "2"], ["0", "1", "2"]
    got = gradient_ics(model, ce_loss, batch, opt, layers, groups=groups)
    want = reference_ics(kind, model, opt, batch, layers, groups)
    for (l2, cos, gn), row in zip(want, got.itertuples(), strict=True):
        assert_close(row.grad_norm, gn, rtol=1e-10, atol=1e-12)
        assert_close(row.l2, l2, rtol=1e-7, atol=1e-12)
        assert_close(row.cos, cos, rtol=1e-10, atol=1e-12)
    without = gradient_ics(model, ce_loss, batch, opt, layers)  # BN's gamma/beta stay at w_t
    assert abs(without.l2.iloc[1] - got.l2.iloc[1]) > 1e-6 * got.l2.iloc[1]
    with pytest.raises(ValueError, match="must contain its layer"):
        gradient_ics(model, ce_loss, batch, opt, layers, groups=["1", "0", "2"])
    with pytest.raises(ValueError, match="one module per layer"):
        gradient_ics(model, ce_loss, batch, opt, layers, groups=["0", "1"])


def test_probing_some_layers_moves_every_earlier_block_still():
    """``only=`` probes a subset: its rows are those of the full list (the reference), since
    the blocks before each probed layer move in G' whether probed or not."""
    model = blocked_bn_net()
    opt = make_opt("sgd", model)
    train_steps(model, opt, 3)
    batch = make_batch(seed=97)
    layers, groups = ["0.0", "1.0", "2"], ["0", "1", "2"]
    want = reference_ics("sgd", model, opt, batch, layers, groups)
    for only in (["1.0"], ["2"], ["1.0", "2"]):
        got = gradient_ics(model, ce_loss, batch, opt, layers, groups=groups, only=only)
        assert list(got.layer) == only
        for row in got.itertuples():
            l2, cos, gn = want[layers.index(row.layer)]
            assert_close(row.l2, l2, rtol=1e-7, atol=1e-12)
            assert_close(row.cos, cos, rtol=1e-10, atol=1e-12)
            assert row.l2 > 0
    with pytest.raises(ValueError, match=r"\['3'\] not among the layers"):
        gradient_ics(model, ce_loss, batch, opt, layers, only=["3"])


def test_cos_of_an_overflowing_g_prime_is_nan_not_one():
    """G' = inf (a diverging arm): cos is undefined, not "perfectly aligned" (min(1.0, nan) is 1.0)."""

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
            with torch.no_grad():
                self.l1.weight.fill_(-0.5)
                self.l2.weight.fill_(1.0)

        def forward(self, x):
            a = self.l1(x)
            return self.l2(a * torch.exp(a))

    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=400.0, maximize=True)  # a' = 121: G' of l2 overflows
    got = gradient_ics(model, lambda m, b: m(b).sum(), torch.tensor([[1.0]]), opt, ["l1", "l2"])
    assert math.isinf(got.l2.iloc[1]) and math.isnan(got.cos.iloc[1])


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_matches_slow_reference(kind):
    model = bn_net()
    opt = make_opt(kind, model)
    train_steps(model, opt, 3)  # populate momentum / Adam state
    batch = make_batch(seed=99)
    want = reference_ics(kind, model, opt, batch, LAYERS)
    got = gradient_ics(model, ce_loss, batch, opt, LAYERS)
    assert list(got.columns) == ["layer", "l2", "cos", "grad_norm"] and list(got.layer) == LAYERS
    for (l2, cos, gn), row in zip(want, got.itertuples(), strict=True):
        assert_close(row.grad_norm, gn, rtol=1e-10, atol=1e-12)
        assert_close(row.l2, l2, rtol=1e-7, atol=1e-12)
        assert_close(row.cos, cos, rtol=1e-10, atol=1e-12)
    assert got.l2.iloc[1] > 0 and got.l2.iloc[2] > 0  # the reference is not trivially zero


def test_first_layer_has_no_shift():
    model = bn_net(torch.float32)
    opt = make_opt("sgd", model)
    out = gradient_ics(model, ce_loss, make_batch(dtype=torch.float32), opt, LAYERS)
    assert out.l2.iloc[0] == 0.0
    assert_close(out.cos.iloc[0], 1.0)


class Uncoupled(nn.Module):
    """Three layers, each with its own loss on the same input: no layer feeds another."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 4), nn.Linear(5, 3), nn.Linear(5, 2)

    def forward(self, x):
        return [self.a(x), self.b(x), self.c(x)]


def test_uncoupled_layers_have_identical_gradients():
    torch.manual_seed(0)
    model = Uncoupled()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    loss_fn = lambda m, x: sum((o.tanh() ** 2).mean() for o in m(x))  # noqa: E731
    x = torch.randn(16, 5)
    out = gradient_ics(model, loss_fn, x, opt, ["a", "b", "c"])
    assert (out.l2 == 0.0).all(), out
    assert_close(torch.tensor(out.cos.to_list(), dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    # and the preceding layers really were moved: coupling them changes G'
    coupled = lambda m, x: (m.c(m.a(x)[:, :1].expand(-1, 5)).tanh() ** 2).mean() + m.b(x).pow(2).mean()  # noqa: E731
    assert gradient_ics(model, coupled, x, opt, ["a", "c"]).l2.iloc[1] > 0


def test_deep_linear_net_small_lr_is_aligned():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8, bias=False) for _ in range(6)]).double()
    A = torch.randn(8, 8, dtype=torch.float64)
    x = torch.randn(64, 8, dtype=torch.float64)
    loss_fn = lambda m, x: ((m(x) - x @ A.T) ** 2).sum(1).mean()  # noqa: E731
    layers = [str(i) for i in range(6)]
    tiny = gradient_ics(model, loss_fn, x, torch.optim.SGD(model.parameters(), lr=1e-6), layers)
    assert (tiny.cos > 1 - 1e-6).all(), tiny
    big = gradient_ics(model, loss_fn, x, torch.optim.SGD(model.parameters(), lr=1e-2), layers)
    assert (big.l2.iloc[1:] > 100 * tiny.l2.iloc[1:]).all()  # l2 grows with the update size


def state_of(model: nn.Module, opt: torch.optim.Optimizer):
    """Everything a probe must not change, as plain tensors."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "opt": copy.deepcopy(opt.state_dict()),
        "rng": torch.get_rng_state(),
        "training": [m.training for m in model.modules()],
    }


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            assert_identical(a[k], b[k])
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_probes_leave_everything_bit_identical(kind):
    model = bn_net(torch.float32)
    opt = make_opt(kind, model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # wraps opt.step
    train_steps(model, opt, 2)
    batch = make_batch(dtype=torch.float32, seed=5)
    ce_loss(model, batch).backward()  # leave non-trivial .grad in place
    before = state_of(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. the LR scheduler's step-order warning
        gradient_ics(model, ce_loss, batch, opt, LAYERS)
        loss_smoothness(model, ce_loss, batch, lr=0.05)
        bn_gap(model, batch[0])
    assert_identical(state_of(model, opt), before)
    model.eval()
    before = state_of(model, opt)
    gradient_ics(model, ce_loss, batch, opt, LAYERS)  # modes restored, eval stays eval
    assert_identical(state_of(model, opt), before)
    assert sched.get_last_lr() == [opt.param_groups[0]["lr"]]


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_probed_training_equals_unprobed_training(kind):
    """Two identical runs, one probed before every step: bit-identical at the end."""
    def probe(model, opt, batch):
        gradient_ics(model, ce_loss, batch, opt, LAYERS)
        loss_smoothness(model, ce_loss, batch, lr=0.05, scales=(0.5, 2.0))
        bn_gap(model, batch[0])

    runs = []
    for p in (probe, None):
        model = bn_net(torch.float32, seed=3)
        opt = make_opt(kind, model)
        torch.manual_seed(123)  # dropout stream
        train_steps(model, opt, 4, probe=p)
        runs.append((state_of(model, opt), torch.rand(3)))
    (a, ra), (b, rb) = runs
    assert_identical(a["params"], b["params"])
    assert_identical(a["buffers"], b["buffers"])
    for k in a["opt"]["state"]:
        assert_identical(a["opt"]["state"][k], b["opt"]["state"][k])
    assert torch.equal(ra, rb)  # RNG stream unchanged


def test_same_noise_in_g_and_g_prime():
    """With dropout and a zero step, every G' equals G: all probe forwards draw the same noise."""
    model = bn_net(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    batch = make_batch(dtype=torch.float32)
    a = gradient_ics(model, ce_loss, batch, opt, LAYERS)
    assert (a.l2 == 0.0).all(), a
    assert a.equals(gradient_ics(model, ce_loss, batch, opt, LAYERS))  # deterministic w.r.t. the RNG


def test_bad_layers():
    model = bn_net()
    opt = make_opt("sgd", model)
    with pytest.raises(ValueError, match=r"forward order.*calls them as \['0', '4', '7'\]"):  # G' moved the wrong ones
        gradient_ics(model, ce_loss, make_batch(), opt, ["7", "0", "4"])
    assert not any(m._forward_pre_hooks for m in model.modules())  # its order probe is gone again
    with pytest.raises(ValueError, match=r"not a module.*nearest names: \['0', '1', '2'"):  # none close: the first
        gradient_ics(model, ce_loss, make_batch(), opt, ["0", "head"])
    with pytest.raises(ValueError, match="no trainable parameters"):
        gradient_ics(model, ce_loss, make_batch(), opt, ["0", "2"])
    with pytest.raises(ValueError, match="share parameter"):
        gradient_ics(model, ce_loss, make_batch(), opt, ["", "0"])
    assert math.isfinite(gradient_ics(model, ce_loss, make_batch(), opt, ["0"]).grad_norm.iloc[0])


def test_optimizer_hooks_and_param_groups():
    """Several param groups, a post-step hook that edits parameters: G' uses the hooked update,
    and the hook's effect never reaches the real model."""
    model = bn_net()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.3},
                           {"params": [p for i in (1, 4, 5, 7) for p in model[i].parameters()]}], lr=0.05, momentum=0.5)
    train_steps(model, opt, 2)
    batch = make_batch(seed=3)
    plain = gradient_ics(model, ce_loss, batch, opt, LAYERS)

    def clamp_hook(optimizer, args, kwargs):
        with torch.no_grad():
            for g in optimizer.param_groups:
                for p in g["params"]:
                    p.clamp_(-0.05, 0.05)

    handle = opt.register_step_post_hook(clamp_hook)
    before = state_of(model, opt)
    hooked = gradient_ics(model, ce_loss, batch, opt, LAYERS)
    handle.remove()
    assert_identical(state_of(model, opt), before)
    assert not torch.equal(torch.tensor(hooked.l2.to_list()), torch.tensor(plain.l2.to_list()))


def test_shared_layer_parameters_use_their_first_name():
    torch.manual_seed(0)
    enc, dec = nn.Linear(4, 4).double(), nn.Linear(4, 4).double()
    dec.weight = enc.weight
    model = nn.Sequential(enc, nn.Tanh(), dec)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="share parameter"):
        gradient_ics(model, lambda m, b: m(b).pow(2).mean(), x, opt, ["0", "2"])
