"""Shared test fixtures."""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # icsk.gpu_kernels' Triton kernels then run in Triton's interpreter, on CPU tensors (tests/
    # test_gpu_kernels.py); Triton reads this when it is first imported, which is after here
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread (OpenMP start-up and spin-waits cost more than the maths)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def isolate_wandb(mp: pytest.MonkeyPatch, home: Path) -> None:
    """wandb's own caches under ``home``; no inherited WANDB_MODE/project settings."""
    for k in list(os.environ):
        if k.startswith("WANDB_"):
            mp.delenv(k)
    mp.setenv("WANDB_SILENT", "true")
    for k in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        mp.setenv(k, str(home / k.lower()))


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """wandb isolated in the test's folder (see :func:`isolate_wandb`)."""
    isolate_wandb(monkeypatch, tmp_path / ".wandb_home")


@pytest.fixture(scope="module")
def wandb_env_module(tmp_path_factory):
    """wandb isolated for a whole module (for module-scoped runs)."""
    with pytest.MonkeyPatch.context() as mp:
        isolate_wandb(mp, tmp_path_factory.mktemp("wandb_home"))
        yield
