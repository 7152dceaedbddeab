"""BN train/eval gap against a NumPy computation; running statistics, modes and hooks untouched."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from icsk.metrics import bn_gap


pytestmark = pytest.mark.usefixtures("one_thread")


def conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2),
        nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5, eps=1e-3), nn.ReLU(), nn.Flatten(),
        nn.Linear(5 * 4 * 4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2),
    )


def warm_up(model: nn.Module, steps: int = 5) -> None:
    """A few training steps so running statistics differ from the batch statistics."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for k in range(steps):
        x = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(k)) * 2 + 1
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def numpy_gap(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[float, float, float]]:
    """Obvious reference: capture BN inputs on a copy (same RNG), NumPy float64 formulas."""
    ref = copy.deepcopy(model).train()
    inputs = {}
    bns = {n: m for n, m in ref.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    for n, m in bns.items():
        m.register_forward_pre_hook(lambda mod, args, n=n: inputs.__setitem__(n, args[0].detach().double().numpy()))
    rng = torch.get_rng_state()
    with torch.no_grad():
        ref(x)
    torch.set_rng_state(rng)
    out = {}
    for n, m in dict(model.named_modules()).items():
        if n not in bns:
            continue
        a = np.moveaxis(inputs[n], 1, 0).reshape(inputs[n].shape[1], -1)
        mu_b, var_b = a.mean(1), a.var(1)
        mu_r, var_r = m.running_mean.double().numpy(), m.running_var.double().numpy()
        out[n] = (
            float(np.mean(np.abs(mu_b - mu_r) / np.sqrt(var_r + m.eps))),
            float(np.mean(var_b / var_r)),
            float(np.mean(np.sqrt((mu_b - mu_r) ** 2 + (np.sqrt(var_b) - np.sqrt(var_r)) ** 2))),
        )
    return out


def test_matches_numpy_and_leaves_model_untouched():
    model = conv_net()
    warm_up(model)
    model.eval()  # modes must come back as they were
    x = torch.randn(32, 3, 6, 6, generator=torch.Generator().manual_seed(7))
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    got = bn_gap(model, x)
    assert torch.equal(torch.get_rng_state(), rng)
    want = numpy_gap(model, x)
    assert list(got.columns) == ["layer", "mean_shift", "var_ratio", "w2"]
    assert list(got.layer) == ["1", "5", "9"]
    for row in got.itertuples():
        assert_close((row.mean_shift, row.var_ratio, row.w2), want[row.layer], rtol=1e-6, atol=1e-8)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), state.values(), strict=True))
    assert not any(m.training for m in model.modules())
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert (got[["mean_shift", "w2"]] > 0).all().all()


def test_fresh_bn_gap_is_the_batch_distribution():
    """Running stats (0, 1) at init: the gap is the input's own distance from N(0, 1)."""
    bn = nn.BatchNorm1d(3)
    model = nn.Sequential(bn)
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 0.0]])  # means 2, 2, 0; biased vars 1, 0, 0
    got = bn_gap(model, x).iloc[0]
    assert_close(got.mean_shift, (2 + 2 + 0) / 3 / np.sqrt(1 + bn.eps), rtol=1e-12, atol=0)
    assert_close(got.var_ratio, 1 / 3)
    assert_close(got.w2, (2 + np.sqrt(5) + 1) / 3)


def test_layer_selection_forward_and_errors():
    model = conv_net()
    x = torch.randn(8, 3, 6, 6)
    got = bn_gap(model, {"img": x}, layers=["5"], forward=lambda m, b: m(b["img"]))
    assert list(got.layer) == ["5"]
    with pytest.raises(ValueError, match="no running_mean"):
        bn_gap(model, x, layers=["0"])
    with pytest.raises(ValueError, match="no batch-norm"):
        bn_gap(nn.Sequential(nn.Linear(2, 2)), torch.randn(3, 2))

    def boom(m, b):
        m(b)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        bn_gap(model, x, forward=boom)
    assert all(not m._forward_pre_hooks for m in model.modules())  # hooks removed on error
    assert all(m.training for m in model.modules())
