"""Compose the Hydra configs of conf/ from Python (tests, notebooks) without a Hydra app."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig

from .cli import CONF_DIR


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """The job config for ``overrides`` (e.g. ``["experiment=demo", "train.steps=50"]``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"optim.lr": 0.1, ...}``; lists become tuples (hashable)."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = tuple(d) if isinstance(d, list) else d
    return out
