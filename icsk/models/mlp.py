"""Fully connected nets; Ioffe & Szegedy's Fig. 1 net is ``MLP(784, 10, 3, 100, "sigmoid")``."""

from __future__ import annotations

from torch import nn

from .blocks import TapNet, linear_block


class MLP(TapNet):
    """``flatten`` -> ``depth`` hidden blocks of ``width`` units -> Linear ``head``."""

    def __init__(self, in_features: int, num_classes: int, depth: int = 3, width: int = 100,
                 activation: str = "sigmoid", norm: str = "none", init_scale: float = 1.0, **norm_kw):
        super().__init__()
        if depth < 0 or width < 1 or in_features < 1 or num_classes < 1:
            raise ValueError(f"MLP needs depth >= 0 and positive sizes, got in_features={in_features}, "
                             f"num_classes={num_classes}, depth={depth}, width={width}")
        self.norm_kind = str(norm)
        self.flatten = nn.Flatten()
        fan_in = in_features
        for i in range(1, depth + 1):
            self.add_module(f"block{i}", linear_block(fan_in, width, activation, norm, **norm_kw))
            fan_in = width
        self.head = nn.Linear(fan_in, num_classes)
        self._scale_init(init_scale)
