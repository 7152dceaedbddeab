"""Shared building blocks: Tap points, activations, `Linear/Conv -> Norm -> Tap -> Act` blocks, TapNet base."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .norms import make_norm

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


class Tap(nn.Module):
    """Identity module marking a point to record (``block{i}.pre_act``): returns its input unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def make_activation(name: str) -> nn.Module:
    """Activation module by name: sigmoid, relu, tanh or identity (never in-place, hooks stay safe)."""
    try:
        return ACTIVATIONS[str(name).lower()]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; valid: {list(ACTIVATIONS)}") from None


class Block(nn.Sequential):
    """One layer: ``linear``|``conv`` -> ``norm`` -> ``pre_act`` (Tap) -> ``act`` [-> ``pool``]."""

    def __init__(self, layer_name: str, layer: nn.Module, norm: nn.Module, act: nn.Module,
                 pool: nn.Module | None = None):
        parts = OrderedDict([(layer_name, layer), ("norm", norm), ("pre_act", Tap()), ("act", act)])
        if pool is not None:
            parts["pool"] = pool
        super().__init__(parts)
        self.layer_name = layer_name


def linear_block(in_f: int, out_f: int, activation: str, norm: str, bias: bool = True, **norm_kw) -> Block:
    """A fully connected block; the bias stays even before BN so every arm has the same parameters."""
    return Block("linear", nn.Linear(in_f, out_f, bias=bias), make_norm(norm, out_f, spatial=False, **norm_kw),
                 make_activation(activation))


def conv_block(in_c: int, out_c: int, activation: str, norm: str, pool: bool = False, **norm_kw) -> Block:
    """A 3x3 conv block (padding 1), optionally followed by 2x2 max pooling."""
    return Block("conv", nn.Conv2d(in_c, out_c, 3, padding=1, bias=True),
                 make_norm(norm, out_c, spatial=True, **norm_kw), make_activation(activation),
                 nn.MaxPool2d(2) if pool else None)


class TapNet(nn.Module):
    """Base of the model zoo: children run in order; blocks are named ``block1``, ``block2``, ...; output ``head``."""

    norm_kind: str = "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.children():
            x = module(x)
        return x

    def blocks(self) -> list[tuple[str, Block]]:
        """(name, block) pairs in forward order."""
        return [(n, m) for n, m in self.named_children() if isinstance(m, Block)]

    def tap_names(self) -> list[str]:
        """Names of the pre-activation taps, in order (``block{i}.pre_act``)."""
        return [f"{n}.pre_act" for n, _ in self.blocks()]

    def block_layer_names(self) -> list[str]:
        """Names of the blocks' linear/conv layers, in order (``block{i}.linear`` or ``block{i}.conv``)."""
        return [f"{n}.{b.layer_name}" for n, b in self.blocks()]

    def weight_layer_names(self) -> list[str]:
        """Every weight layer, in order: the block layers, then ``head``."""
        return self.block_layer_names() + ["head"]

    def weight_group_names(self) -> list[str]:
        """The module each weight layer belongs to, in order: its block (normalizer included), then ``head``."""
        return [n for n, _ in self.blocks()] + ["head"]

    def norm_names(self) -> list[str]:
        """Names of the normalizer modules (``block{i}.norm``), in order."""
        return [f"{n}.norm" for n, _ in self.blocks()]

    def _scale_init(self, init_scale: float) -> None:
        """Multiply every linear/conv weight by ``init_scale`` (an init-scale sweep knob)."""
        if init_scale == 1.0:
            return
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    m.weight.mul_(init_scale)
