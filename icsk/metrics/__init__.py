"""Metrics: offline drift of recorded statistics, online probes (gradient ICS, loss
smoothness, BN train/eval gap). Functions, not loops: the training loop decides when to call."""

from .bn_gap import bn_gap
from .drift import (
    MEASURES,
    DriftError,
    drift,
    drift_series,
    gaussian_kl,
    gaussian_sym_kl,
    gaussian_w2,
    layer_drift,
    mean_shift,
    quantile_w1,
)
from .ics import gradient_ics
from .smoothness import DEFAULT_SCALES, loss_smoothness

__all__ = [
    "DEFAULT_SCALES",
    "MEASURES",
    "DriftError",
    "bn_gap",
    "drift",
    "drift_series",
    "gaussian_kl",
    "gaussian_sym_kl",
    "gaussian_w2",
    "gradient_ics",
    "layer_drift",
    "loss_smoothness",
    "mean_shift",
    "quantile_w1",
]
