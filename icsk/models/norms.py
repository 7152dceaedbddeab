"""Normalizers the arms differ by: none, bn, noisy_bn, ln, gn, lp (see :func:`make_norm`)."""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

NORMS = ("none", "bn", "noisy_bn", "ln", "gn", "lp")
# Convenience spellings for the lp normalizer with its exponent built in (usable as arm names).
_LP_ALIASES = {"lp1": 1.0, "lp2": 2.0, "lpinf": math.inf, "lp_inf": math.inf}
NORM_NAMES = (*NORMS, *_LP_ALIASES)  # what make_norm accepts (any case)


class NoisyBNMixin:
    """Santurkar et al. (2018) noisy BN: after BN, a <- s*a + m with fresh noise at every training forward.

    Per forward (per layer): mu_t ~ U(-0.5, 0.5), sigma_t ~ U(1, 1.25); per element
    m ~ U(mu_t - 0.1, mu_t + 0.1), s ~ N(sigma_t, 0.1). Eval mode adds no noise. Draws use torch's
    global RNG on the activation's device; the last mu_t / sigma_t are kept in ``last_mu`` /
    ``last_sigma`` (0-d tensors) for inspection. Set ``noise = False`` to switch the noise off."""

    noise: bool = True
    mu_range: tuple[float, float] = (-0.5, 0.5)
    sigma_range: tuple[float, float] = (1.0, 1.25)
    m_half_width: float = 0.1
    s_std: float = 0.1
    last_mu: torch.Tensor | None = None
    last_sigma: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # type: ignore[misc]
        if not (self.training and self.noise):  # type: ignore[attr-defined]
            return y
        mu = torch.empty((), device=y.device, dtype=y.dtype).uniform_(*self.mu_range)
        sigma = torch.empty((), device=y.device, dtype=y.dtype).uniform_(*self.sigma_range)
        m = torch.empty_like(y).uniform_(-self.m_half_width, self.m_half_width).add_(mu)
        s = torch.randn_like(y).mul_(self.s_std).add_(sigma)
        self.last_mu, self.last_sigma = mu, sigma
        return s * y + m


class NoisyBatchNorm1d(NoisyBNMixin, nn.BatchNorm1d):
    """BatchNorm1d followed by Santurkar's time-varying noise (see :class:`NoisyBNMixin`)."""


class NoisyBatchNorm2d(NoisyBNMixin, nn.BatchNorm2d):
    """BatchNorm2d followed by Santurkar's time-varying noise (see :class:`NoisyBNMixin`)."""


class LpNorm(nn.Module):
    """l_p batch normalization (Santurkar et al. 2018, Sec. 4): BN with the std replaced by an l_p scale.

    Per feature (channel), over the batch (and spatial positions): c = x - mean, then
    y = gamma * c / (scale + eps) + beta with scale = (mean |c|^p)^(1/p), i.e. the batch-averaged
    l_p norm (p=1: mean absolute deviation; p=2: biased std, BN's scale; p=inf: max |c|).
    Running mean and running scale replace batch statistics in eval mode: an EWMA with
    ``momentum``, or the cumulative average when ``momentum`` is None, as in ``nn.BatchNorm``.
    For p=2 the running scale is the root of BN's ``running_var`` (an average of the unbiased
    batch variance), so p=2 matches BN in eval mode too; for p=1 and inf it averages the scale."""

    def __init__(self, num_features: int, p: float = 2.0, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True):
        super().__init__()
        p = math.inf if str(p).lower() in ("inf", "infinity") else float(p)
        if p not in (1.0, 2.0, math.inf):
            raise ValueError(f"lp normalizer needs lp_p in {{1, 2, inf}}, got {p}")
        self.num_features, self.p, self.eps, self.momentum = num_features, p, eps, momentum
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_scale", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"LpNorm expects (N, {self.num_features}, ...) input, got {tuple(x.shape)}")
        dims = (0, *range(2, x.dim()))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.training:
            mean = x.mean(dims)
            c = x - mean.view(shape)
            n = c.numel() // self.num_features
            scale = torch.linalg.vector_norm(c, ord=self.p, dim=dims)
            if self.p != math.inf:
                scale = scale / n ** (1.0 / self.p)
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                w = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), w)
                tracked = scale.detach().to(self.running_scale.dtype)
                if self.p == 2.0:  # average the unbiased variance, as BN does, and keep its root
                    var = tracked.square() * (n / (n - 1) if n > 1 else 1.0)
                    self.running_scale.copy_(self.running_scale.square().lerp_(var, w).sqrt_())
                else:
                    self.running_scale.lerp_(tracked, w)
        else:
            mean, scale = self.running_mean, self.running_scale
            c = x - mean.view(shape)
        y = c / (scale + self.eps).view(shape)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, p={self.p}, eps={self.eps}, momentum={self.momentum}"


def _divisor_at_most(groups: int, channels: int) -> int:
    g = max(1, min(int(groups), channels))
    while channels % g:
        g -= 1
    return g


def uses_batch_statistics(kind: str) -> bool:
    """Whether normalizer ``kind`` (aliases included) normalizes over the batch in training, so a
    batch of one sample cannot train it (bn, noisy_bn and every lp)."""
    kind = str(kind).lower()
    return kind in ("bn", "noisy_bn", "lp") or kind in _LP_ALIASES


def make_norm(kind: str, num_features: int, spatial: bool = False, *, eps: float = 1e-5,
              momentum: float = 0.1, gn_groups: int = 8, lp_p: float | str = 2.0,
              affine: bool = True) -> nn.Module:
    """Build normalizer ``kind`` for ``num_features`` features (channels if ``spatial``).

    Options irrelevant to ``kind`` are ignored, so one set of kwargs can drive every arm.
    ``ln`` on conv features normalizes over (C, H, W) per sample (GroupNorm with one group);
    ``gn`` uses the largest group count <= ``gn_groups`` that divides C. ``lp1``/``lp2``/``lpinf``
    are accepted as ``lp`` with that exponent."""
    kind = str(kind).lower()
    if kind in _LP_ALIASES:
        kind, lp_p = "lp", _LP_ALIASES[kind]
    if kind == "none":
        return nn.Identity()
    if kind == "bn":
        return (nn.BatchNorm2d if spatial else nn.BatchNorm1d)(num_features, eps=eps, momentum=momentum, affine=affine)
    if kind == "noisy_bn":
        cls = NoisyBatchNorm2d if spatial else NoisyBatchNorm1d
        return cls(num_features, eps=eps, momentum=momentum, affine=affine)
    if kind == "ln":
        if spatial:
            return nn.GroupNorm(1, num_features, eps=eps, affine=affine)
        return nn.LayerNorm(num_features, eps=eps, elementwise_affine=affine)
    if kind == "gn":
        return nn.GroupNorm(_divisor_at_most(gn_groups, num_features), num_features, eps=eps, affine=affine)
    if kind == "lp":
        return LpNorm(num_features, p=lp_p, eps=eps, momentum=momentum, affine=affine)
    raise ValueError(f"unknown normalizer {kind!r}; valid: {list(NORM_NAMES)}")


# make_norm's options (``model.options``: one set drives every arm)
NORM_OPTIONS = tuple(p.name for p in inspect.signature(make_norm).parameters.values() if p.kind is p.KEYWORD_ONLY)
