"""Compose the Hydra configs of conf/ from Python (tests, notebooks) without a Hydra app."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .cli import CONF_DIR


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """The job config for ``overrides`` (e.g. ``["experiment=demo", "train.steps=50"]``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


@functools.cache
def group_keys(group: str) -> tuple[str, ...]:
    """Every key that a config of ``group`` sets in conf/ (any of ``conf/<group>/*.yaml``; for
    ``train``, the section of config.yaml): a key beyond them reaches no code."""
    if group == "train":
        return _keys_of([OmegaConf.load(CONF_DIR / "config.yaml").get("train") or {}])
    return _keys_of([OmegaConf.load(f) for f in sorted((CONF_DIR / group).glob("*.yaml"))])


@functools.cache
def option_keys(group: str, name: str) -> tuple[str, ...]:
    """The keys that the option of ``group`` named ``name`` sets (the ``conf/<group>/*.yaml`` whose
    ``name`` is ``name``); every key of the group where no file has that name."""
    nodes = [node for f in sorted((CONF_DIR / group).glob("*.yaml")) if (node := OmegaConf.load(f)).get("name") == name]
    return _keys_of(nodes) if nodes else group_keys(group)


def _keys_of(nodes: Sequence[Any]) -> tuple[str, ...]:
    """The top-level keys of config nodes, each once, in order (``defaults`` is Hydra's, not a setting)."""
    return tuple(dict.fromkeys(k for node in nodes for k in node if k != "defaults"))


@functools.cache
def metric_keys() -> dict[str, tuple[str, ...]]:
    """Each online probe of conf/metrics/ with the keys any of its configs sets (``ics``: enabled,
    schedule, layers, ...)."""
    out: dict[str, dict[str, None]] = {}
    for f in sorted((CONF_DIR / "metrics").glob("*.yaml")):
        for probe, node in OmegaConf.load(f).items():
            if probe != "defaults":
                out.setdefault(probe, {}).update(dict.fromkeys(node or {}))
    return {probe: tuple(keys) for probe, keys in out.items()}


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"optim.lr": 0.1, ...}``; lists become tuples (hashable)."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = tuple(d) if isinstance(d, list) else d
    return out
