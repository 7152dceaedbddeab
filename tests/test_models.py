"""Model zoo: paired initialization, layer names, shapes, and normalizers against float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from icsk.models import (DLN, MLP, VGG, LpNorm, NoisyBatchNorm1d, Tap, build_model, make_norm, make_pair,
                         model_options)


pytestmark = pytest.mark.usefixtures("one_thread")


ARMS = ("none", "bn", "noisy_bn", "ln", "gn", "lp")
MODEL_KW = {
    "mlp": dict(in_features=20, num_classes=5, depth=3, width=16),
    "vgg": dict(variant="vgg_tiny", num_classes=10),
    "dln": dict(dim=6, depth=5),
}
INPUTS = {"mlp": (8, 20), "vgg": (4, 3, 32, 32), "dln": (8, 6)}
OUTPUTS = {"mlp": (8, 5), "vgg": (4, 10), "dln": (8, 6)}


@pytest.mark.parametrize("name", list(MODEL_KW))
def test_pair_shares_bit_identical_weights_and_names(name):
    arms = make_pair(name, arms=ARMS, seed=3, **MODEL_KW[name])
    assert list(arms) == list(ARMS)
    ref = arms["none"]
    names = [n for n, _ in ref.named_modules()]
    weight_layers = ref.weight_layer_names()
    for arm, model in arms.items():
        assert [n for n, _ in model.named_modules()] == names, arm
        assert model.tap_names() == ref.tap_names()
        assert model.block_layer_names() == ref.block_layer_names()
        params = dict(model.named_parameters())
        for layer in weight_layers:
            for p in ("weight", "bias"):
                key = f"{layer}.{p}"
                if key in dict(ref.named_parameters()):
                    assert torch.equal(params[key], dict(ref.named_parameters())[key]), (arm, key)
        for n, p in model.named_parameters():  # normalizer affine parameters start at gamma=1, beta=0
            if ".norm." in n:
                assert torch.equal(p, torch.ones_like(p) if n.endswith("weight") else torch.zeros_like(p)), n
        model.train()
        assert model(torch.randn(*INPUTS[name])).shape == OUTPUTS[name]


def test_pair_depends_on_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = make_pair("mlp", arms=("bn", "none"), seed=0, **MODEL_KW["mlp"])
    assert torch.equal(torch.get_rng_state(), before)
    b = make_pair("mlp", arms="bn,none", seed=0, **MODEL_KW["mlp"])
    c = make_pair("mlp", arms=("bn", "none"), seed=1, **MODEL_KW["mlp"])
    assert torch.equal(a["bn"].block1.linear.weight, b["bn"].block1.linear.weight)
    assert not torch.equal(a["bn"].block1.linear.weight, c["bn"].block1.linear.weight)
    with pytest.raises(ValueError, match="distinct"):
        make_pair("mlp", arms=("bn", "bn"), **MODEL_KW["mlp"])


def test_init_scale_multiplies_every_weight_layer():
    base = make_pair("vgg", arms=("none",), seed=0, **MODEL_KW["vgg"])["none"]
    scaled = make_pair("vgg", arms=("bn",), seed=0, init_scale=2.5, **MODEL_KW["vgg"])["bn"]
    for layer in base.weight_layer_names():
        w0, w1 = base.get_submodule(layer).weight, scaled.get_submodule(layer).weight
        assert_close(w1, 2.5 * w0, rtol=0, atol=0)
        assert torch.equal(base.get_submodule(layer).bias, scaled.get_submodule(layer).bias)


def test_layer_naming_and_taps():
    m = MLP(784, 10)  # Ioffe & Szegedy's net
    assert m.tap_names() == ["block1.pre_act", "block2.pre_act", "block3.pre_act"]
    assert m.block_layer_names() == ["block1.linear", "block2.linear", "block3.linear"]
    assert isinstance(m.block3.pre_act, Tap) and isinstance(m.block3.act, nn.Sigmoid)
    assert isinstance(m.block1.norm, nn.Identity) and isinstance(m.head, nn.Linear)
    assert m.block1.linear.bias is not None
    bn = MLP(784, 10, norm="bn")
    assert bn.block1.linear.bias is not None  # kept before BN so arms share parameters
    v = VGG(channels=(8, "M", 8, 16, "M"), norm="bn", image_size=16)
    assert v.block_layer_names() == ["block1.conv", "block2.conv", "block3.conv"]
    assert hasattr(v.block1, "pool") and not hasattr(v.block2, "pool") and hasattr(v.block3, "pool")
    assert v.head.in_features == 16 * 4 * 4
    assert v(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    d = DLN(dim=4, depth=25)
    assert len(d.weight_layer_names()) == 25 and len(d.tap_names()) == 24
    assert all(mod.bias is None for mod in d.modules() if isinstance(mod, nn.Linear))
    # the tap sees exactly the activation's input (after the normalizer)
    seen = {}
    bn.block2.pre_act.register_forward_hook(lambda mod, i, o: seen.setdefault("tap", o))
    bn.block2.act.register_forward_hook(lambda mod, i, o: seen.setdefault("act_in", i[0]))
    bn(torch.randn(5, 784))
    assert seen["tap"] is seen["act_in"]


def test_build_model_errors_and_variants():
    assert isinstance(build_model("cnn", norm="bn", variant="vgg_tiny"), VGG)
    with pytest.raises(ValueError, match="valid"):
        build_model("resnet", norm="bn")
    with pytest.raises(ValueError, match="variant"):
        build_model("vgg", norm="bn", variant="vgg99")
    with pytest.raises(ValueError, match="activation"):
        MLP(10, 2, activation="gelu")
    with pytest.raises(ValueError, match="normalizer"):
        MLP(10, 2, norm="batchnorm")
    with pytest.raises(ValueError, match=r"too small for 3 2x2 max pools.*vgg_tiny"):
        VGG(channels=(4, "M", 4, "M", 4, "M"), image_size=6)
    odd = VGG(channels=(4, "M", 4, "M", 4, "M"), in_channels=1, image_size=28)  # 28 -> 14 -> 7 -> 3
    assert odd(torch.randn(2, 1, 28, 28)).shape == (2, 10) and odd.head.in_features == 4 * 3 * 3
    with pytest.raises(ValueError, match="'M'"):
        VGG(channels=("M", 4))
    with pytest.raises(TypeError):
        MLP(10, 2, norm="gn", groups=4)  # the option is called gn_groups


@pytest.mark.parametrize("name", list(MODEL_KW))
def test_model_options_are_what_the_model_takes(name):
    """model_options (the valid model.options names) lists options every model applies, not more."""
    values = {"eps": 1e-3, "momentum": 0.5, "gn_groups": 2, "lp_p": 1.0, "affine": False, "channels": [4, "M", 6]}
    opts = model_options(name)
    assert opts[:5] == ("eps", "momentum", "gn_groups", "lp_p", "affine") and set(opts) <= set(values)
    model = build_model(name, norm="bn", **MODEL_KW[name], **{k: values[k] for k in opts})
    bn = model.block1.norm
    assert bn.eps == 1e-3 and bn.momentum == 0.5 and bn.weight is None  # affine=False
    if name == "vgg":
        assert "channels" in opts and [model.block1.conv.out_channels, model.block2.conv.out_channels] == [4, 6]
    assert make_norm("gn", 8, gn_groups=values["gn_groups"]).num_groups == 2
    assert make_norm("lp", 8, lp_p=values["lp_p"]).p == 1.0
    with pytest.raises(TypeError):
        build_model(name, norm="bn", **MODEL_KW[name], foo=1)


def test_gn_groups_clip_and_ln_spatial():
    assert make_norm("gn", 100).num_groups == 5
    assert make_norm("gn", 12, spatial=True).num_groups == 6
    assert make_norm("gn", 64, gn_groups=4).num_groups == 4
    ln = make_norm("ln", 3, spatial=True)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    mu = x.mean(dim=(1, 2, 3), keepdim=True)
    var = x.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    assert_close(ln.double()(x), (x - mu) / torch.sqrt(var + 1e-5))


@pytest.mark.parametrize("spatial", [False, True])
def test_bn_train_output_matches_float64_formula(spatial):
    torch.manual_seed(0)
    bn = make_norm("bn", 6, spatial=spatial)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    x = torch.randn(16, 6, 3, 3) * 3 + 1 if spatial else torch.randn(16, 6) * 3 + 1
    y = bn.train()(x)
    xn = x.double().numpy()
    axes = (0, 2, 3) if spatial else (0,)
    shape = (1, -1, 1, 1) if spatial else (1, -1)
    mu, var = xn.mean(axis=axes), xn.var(axis=axes)
    ref = (xn - mu.reshape(shape)) / np.sqrt(var.reshape(shape) + 1e-5)
    ref = ref * bn.weight.detach().double().numpy().reshape(shape) + bn.bias.detach().double().numpy().reshape(shape)
    assert_close(y.double(), torch.from_numpy(ref), rtol=1e-5, atol=1e-5)
    n = xn.size // 6
    assert_close(bn.running_var.double(), torch.from_numpy(0.9 + 0.1 * var * n / (n - 1)), rtol=1e-5, atol=1e-6)


def _lp_reference(x: np.ndarray, p: float, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mu = x.mean(axis=axes)
    c = x - mu.reshape(shape)
    if p == math.inf:
        scale = np.abs(c).max(axis=axes)
    else:
        scale = (np.abs(c) ** p).mean(axis=axes) ** (1 / p)
    return c / (scale.reshape(shape) + eps), mu, scale


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("spatial", [False, True])
def test_lp_norm_matches_numpy_reference(p, spatial):
    torch.manual_seed(1)
    lp = make_norm("lp", 5, spatial=spatial, lp_p=p, momentum=0.3).double()
    with torch.no_grad():
        lp.weight.uniform_(0.5, 2.0)
        lp.bias.normal_()
    x = torch.randn((12, 5, 4, 4) if spatial else (12, 5), dtype=torch.float64) * 2 - 1
    shape = (1, -1, 1, 1) if spatial else (1, -1)
    g, b = lp.weight.detach().numpy().reshape(shape), lp.bias.detach().numpy().reshape(shape)
    ref, mu, scale = _lp_reference(x.numpy(), p)
    assert_close(lp.train()(x), torch.from_numpy(ref * g + b))
    assert_close(lp.running_mean, torch.from_numpy(0.3 * mu))
    n = x.numel() // 5
    if p == 2.0:  # the root of BN's running_var: an average of the unbiased variance
        assert_close(lp.running_scale, torch.from_numpy(np.sqrt(0.7 + 0.3 * scale**2 * n / (n - 1))))
    else:
        assert_close(lp.running_scale, torch.from_numpy(0.7 + 0.3 * scale))
    # eval: running statistics replace batch statistics
    x2 = torch.randn_like(x)
    rm, rs = lp.running_mean.numpy().reshape(shape), lp.running_scale.numpy().reshape(shape)
    assert_close(lp.eval()(x2), torch.from_numpy((x2.numpy() - rm) / (rs + 1e-5) * g + b))
    if p == 2.0:  # l2 scale is BN's biased std
        bn = make_norm("bn", 5, spatial=spatial, eps=1e-12).double().train()
        assert_close(make_norm("lp", 5, spatial=spatial, eps=1e-12).double().train()(x), bn(x))


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("spatial", [False, True])
def test_lp2_matches_batch_norm_in_eval_mode_too(momentum, spatial):
    """Same running statistics as nn.BatchNorm (unbiased scale; momentum=None is BN's cumulative average)."""
    torch.manual_seed(2)
    kw = dict(spatial=spatial, eps=1e-12, momentum=momentum)
    lp, bn = make_norm("lp2", 5, **kw).double().train(), make_norm("bn", 5, **kw).double().train()
    for _ in range(4):
        x = torch.randn((6, 5, 3, 3) if spatial else (6, 5), dtype=torch.float64) * 3 + 1
        assert_close(lp(x), bn(x))
    assert_close(lp.running_mean, bn.running_mean)
    assert_close(lp.running_scale ** 2, bn.running_var)
    x = torch.randn((6, 5, 3, 3) if spatial else (6, 5), dtype=torch.float64)
    assert_close(lp.eval()(x), bn.eval()(x))
    if momentum is None:
        one = make_norm("lp1", 5, momentum=None).double().train()
        batches = [torch.randn(7, 5, dtype=torch.float64) for _ in range(3)]
        for b in batches:
            one(b)
        assert_close(one.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0))


def test_lp_aliases_and_finite_gradient_on_constant_feature():
    assert make_norm("lpinf", 3).p == math.inf and make_norm("lp1", 3).p == 1.0
    with pytest.raises(ValueError):
        LpNorm(3, p=3)
    for p in (1, 2, "inf"):
        x = torch.randn(8, 3)
        x[:, 1] = 2.0  # zero spread in one feature
        x.requires_grad_(True)
        make_norm("lp", 3, lp_p=p)(x).pow(2).sum().backward()
        assert torch.isfinite(x.grad).all(), p


def test_noisy_bn_eval_equals_bn_and_train_adds_fresh_noise():
    torch.manual_seed(0)
    noisy, bn = make_norm("noisy_bn", 4), make_norm("bn", 4)
    x = torch.randn(32, 4)
    for _ in range(3):  # same running statistics in both
        noisy.train()(x), bn.train()(x)
    assert torch.equal(noisy.eval()(x), bn.eval()(x))
    noisy.train()
    y1, y2 = noisy(x), noisy(x)
    assert not torch.allclose(y1, y2)
    assert -0.5 <= float(noisy.last_mu) <= 0.5 and 1.0 <= float(noisy.last_sigma) <= 1.25
    noisy.noise = False
    assert torch.equal(noisy(x), bn.train()(x))
    assert isinstance(make_norm("noisy_bn", 4, spatial=True), nn.BatchNorm2d)


def test_noisy_bn_noise_statistics():
    """Recover m where the BN output is exactly 0 and s where it is large (|a| = 11.3), over many forwards."""
    torch.manual_seed(2024)
    n, r, feats, k = 2048, 8, 32, 100
    x = torch.zeros(n, feats, dtype=torch.float64)
    x[:r], x[r:2 * r] = 100.0, -100.0  # per feature: BN output +-sqrt(n / 2r) = +-11.3 on 2r rows, 0 elsewhere
    layer = NoisyBatchNorm1d(feats).double().train()
    layer.noise = False
    a = layer(x).detach()
    layer.noise = True
    zero, big = a.abs() < 1e-12, a.abs() > 11
    assert int(zero.sum()) == (n - 2 * r) * feats and int(big.sum()) == 2 * r * feats
    mus, sigmas, m_dev, s_dev = [], [], [], []
    for _ in range(k):
        y = layer(x).detach()
        mu, sigma = float(layer.last_mu), float(layer.last_sigma)
        m = y[zero]  # y = s*0 + m
        assert m.min() >= mu - 0.1 - 1e-12 and m.max() <= mu + 0.1 + 1e-12
        mu_hat = float(m.mean())
        s = (y[big] - mu_hat) / a[big]  # residual (m - mu_hat)/a is at most 0.1/11.3
        mus.append(mu_hat)
        sigmas.append(float(s.mean()))
        m_dev.append(m - mu_hat)
        s_dev.append(s - s.mean())
        assert abs(mu_hat - mu) < 0.003 and abs(float(s.mean()) - sigma) < 0.03
    mus_t, sig_t = torch.tensor(mus), torch.tensor(sigmas)
    assert mus_t.min() >= -0.51 and mus_t.max() <= 0.51
    assert sig_t.min() >= 1.0 - 0.03 and sig_t.max() <= 1.25 + 0.03
    assert abs(float(mus_t.std()) - 1 / math.sqrt(12)) < 0.06  # mu_t ~ U(-0.5, 0.5) across steps
    assert abs(float(sig_t.std()) - 0.25 / math.sqrt(12)) < 0.02  # sigma_t ~ U(1, 1.25)
    assert abs(float(torch.cat(m_dev).std()) - 0.2 / math.sqrt(12)) < 0.002  # m ~ U(mu_t +- 0.1)
    s_all = torch.cat(s_dev)
    assert abs(float(s_all.std()) - 0.1) < 0.003  # s ~ N(sigma_t, 0.1)
    assert abs(float((s_all.abs() < 0.1).double().mean()) - 0.6827) < 0.01  # Gaussian, not uniform
