"""Deep linear network for Santurkar et al.'s loss ||W_depth ... W_1 x - A x||^2."""

from __future__ import annotations

from torch import nn

from .blocks import TapNet, linear_block


class DLN(TapNet):
    """``depth`` bias-free dim x dim matrices: blocks 1..depth-1 (Linear -> norm -> identity act), then ``head``.

    With default PyTorch init each matrix has entry std 1/sqrt(3*dim), so the product shrinks by about
    3**(-depth/2); ``init_scale=3**0.5`` makes each layer variance-preserving."""

    def __init__(self, dim: int = 32, depth: int = 25, norm: str = "none", init_scale: float = 1.0, **norm_kw):
        super().__init__()
        if dim < 1 or depth < 1:
            raise ValueError(f"DLN needs dim >= 1 and depth >= 1, got dim={dim}, depth={depth}")
        self.norm_kind = str(norm)
        for i in range(1, depth):
            self.add_module(f"block{i}", linear_block(dim, dim, "identity", norm, bias=False, **norm_kw))
        self.head = nn.Linear(dim, dim, bias=False)
        self._scale_init(init_scale)
