"""Model zoo: MLP, VGG and a deep linear net built from `Linear/Conv -> Norm -> Tap -> Act` blocks.

Every arm exposes the same module names (``block{i}.linear|conv``, ``block{i}.norm``,
``block{i}.pre_act``, ``block{i}.act``, ``block{i}.pool``, ``head``), so recorders and metrics
address all arms alike; :func:`make_pair` gives arms identical initial weights."""

from .blocks import ACTIVATIONS, Block, Tap, TapNet, make_activation
from .cnn import VGG, VGG_VARIANTS
from .dln import DLN
from .mlp import MLP
from .norms import NORM_OPTIONS, NORMS, LpNorm, NoisyBatchNorm1d, NoisyBatchNorm2d, make_norm, uses_batch_statistics
from .pairing import MODELS, build_model, make_arms, make_pair, model_options

__all__ = [
    "ACTIVATIONS", "Block", "DLN", "LpNorm", "MLP", "MODELS", "NORM_OPTIONS", "NORMS", "NoisyBatchNorm1d",
    "NoisyBatchNorm2d", "Tap", "TapNet", "VGG", "VGG_VARIANTS", "build_model", "make_activation", "make_arms",
    "make_norm", "make_pair", "model_options", "uses_batch_statistics",
]
