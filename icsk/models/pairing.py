"""Build models by name, and paired arms that differ only in their normalizer but start from identical weights."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .blocks import TapNet
from .cnn import VGG, VGG_VARIANTS
from .dln import DLN
from .mlp import MLP
from .norms import NORM_OPTIONS

MODELS = ("mlp", "vgg", "dln")
_ALIASES = {"cnn": "vgg"}
_OWN_OPTIONS = {"vgg": ("channels",)}  # options of a model besides its normalizer's


def build_model(name: str, *, norm: str = "none", **kw) -> TapNet:
    """Model ``name`` in {"mlp", "vgg" (alias "cnn"), "dln"} with normalizer ``norm``.

    ``vgg`` takes ``variant`` (a key of VGG_VARIANTS, default "vgg_small") unless ``channels`` is given."""
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key == "mlp":
        return MLP(norm=norm, **kw)
    if key == "vgg":
        variant = kw.pop("variant", "vgg_small")
        if "channels" not in kw:
            if variant not in VGG_VARIANTS:
                raise ValueError(f"unknown VGG variant {variant!r}; valid: {list(VGG_VARIANTS)}")
            kw["channels"] = VGG_VARIANTS[variant]
        return VGG(norm=norm, **kw)
    if key == "dln":
        return DLN(norm=norm, **kw)
    raise ValueError(f"unknown model {name!r}; valid: {list(MODELS) + list(_ALIASES)}")


def model_options(name: str) -> tuple[str, ...]:
    """Options model ``name`` takes besides its sizes (``model.options``): the normalizer's, and
    VGG's ``channels`` (a channel list in place of ``variant``)."""
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    return NORM_OPTIONS + _OWN_OPTIONS.get(key, ())


def _seeded(seed: int, name: str, norm: str, kw: dict) -> TapNet:
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        return build_model(name, norm=norm, **dict(kw))


def make_pair(name: str, arms: Iterable[str] | str = ("bn", "none"), seed: int = 0, **kw) -> dict[str, TapNet]:
    """One model per arm (normalizer name), keyed by arm, with bit-identical shared parameters at init.

    A reference ``norm="none"`` model is built under ``torch.manual_seed(seed)`` (init_scale included)
    and every state entry an arm shares with it by name and shape (all linear/conv weights and biases,
    the head) is copied in; normalizer parameters keep their defaults (gamma=1, beta=0).
    The caller's global RNG state is not changed."""
    arms = [a.strip() for a in arms.split(",")] if isinstance(arms, str) else [str(a) for a in arms]
    if not arms or len(set(arms)) != len(arms):
        raise ValueError(f"arms must be non-empty and distinct, got {arms}")
    ref = _seeded(seed, name, "none", kw).state_dict()
    out: dict[str, TapNet] = {}
    for arm in arms:
        model = _seeded(seed, name, arm, kw)
        state = model.state_dict()
        shared = {k: v for k, v in ref.items() if k in state and state[k].shape == v.shape}
        needed = {f"{layer}.weight" for layer in model.weight_layer_names()}
        if missing := needed - shared.keys():
            raise RuntimeError(f"arm {arm!r} does not share weight layers {sorted(missing)} with the reference")
        model.load_state_dict(shared, strict=False)
        out[arm] = model
    return out


make_arms = make_pair
