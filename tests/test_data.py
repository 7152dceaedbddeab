"""Dataset registry on tiny real-format files, mnist5k, gaussian, BatchStream and probe batches."""

from __future__ import annotations

import ast
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close
from torch.utils.data import Dataset, TensorDataset

from icsk.data import (DATASETS, NORMALIZATION, BatchStream, DataBundle, DatasetNotFoundError, dataset_options,
                       get_dataset, probe_batch)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write uint8 data in the MNIST idx format (magic 0x08 = ubyte, then big-endian dims)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _make_mnist(root: Path, folder: str, n_train: int = 12, n_test: int = 5) -> dict[str, np.ndarray]:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, arr in arrays.items():
        _write_idx(raw / name, arr)
    return arrays


def _make_cifar(root: Path, per_batch: int = 3) -> dict[str, dict]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    entries = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, per_batch).tolist(), "batch_label": name}
        (folder / name).write_bytes(pickle.dumps(entry))
        entries[name] = entry
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return entries


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_like_loads_idx_files(tmp_path, name, folder):
    arrays = _make_mnist(tmp_path, folder)
    b = get_dataset(name, root=tmp_path)
    assert isinstance(b, DataBundle) and b.name == name and b.task == "classification" and b.num_classes == 10
    assert b.input_shape == (1, 28, 28) and len(b.train) == 12 and len(b.test) == 5
    mean, std = NORMALIZATION[name]
    expected = (torch.from_numpy(arrays["train-images-idx3-ubyte"]).float() / 255 - mean[0]) / std[0]
    x, y = b.train.tensors
    assert_close(x[:, 0], expected)
    assert torch.equal(y, torch.from_numpy(arrays["train-labels-idx1-ubyte"]).long())
    assert torch.equal(b.test.tensors[1], torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    flat = get_dataset(name, root=tmp_path, flatten=True, standardize=False)
    assert flat.input_shape == (784,)
    assert_close(flat.test.tensors[0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float().view(5, -1) / 255)


def test_cifar10_loads_pickles(tmp_path):
    entries = _make_cifar(tmp_path)
    b = get_dataset("cifar10", root=str(tmp_path))
    assert b.input_shape == (3, 32, 32) and len(b.train) == 15 and len(b.test) == 3
    x, y = b.train.tensors
    raw = torch.from_numpy(entries["data_batch_2"]["data"]).view(-1, 3, 32, 32).float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION["cifar10"])
    assert_close(x[3:6], (raw - mean) / std)
    assert y.tolist() == sum((entries[f"data_batch_{i}"]["labels"] for i in range(1, 6)), [])
    assert b.test.tensors[1].tolist() == entries["test_batch"]["labels"]
    assert get_dataset("cifar10", root=tmp_path, flatten=True).input_shape == (3072,)


@pytest.mark.parametrize("name,missing", [
    ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
    ("fashion_mnist", "FashionMNIST/raw/t10k-labels-idx1-ubyte"),
    ("cifar10", "cifar-10-batches-py/data_batch_1"),
])
def test_missing_files_raise_with_folder_and_files(tmp_path, name, missing):
    with pytest.raises(DatasetNotFoundError) as err:
        get_dataset(name, root=tmp_path / "nowhere")
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert str((tmp_path / "nowhere").resolve()) in msg and missing in msg and "download=true" in msg


def test_one_missing_file_is_named(tmp_path):
    _make_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_4"):
        get_dataset("cifar10", root=tmp_path)


def test_failed_download_becomes_dataset_not_found(tmp_path, monkeypatch):
    import torchvision

    def offline(self):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    with pytest.raises(DatasetNotFoundError, match="no network"):
        get_dataset("mnist", root=tmp_path, download=True)


MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


@pytest.mark.parametrize("name,files", [
    ("mnist", [f"MNIST/raw/{f}" for f in MNIST_FILES]),
    ("fashion_mnist", [f"FashionMNIST/raw/{f}" for f in MNIST_FILES]),
    ("cifar10", [f"cifar-10-batches-py/{f}" for f in CIFAR_FILES]),
])
def test_failed_download_lists_the_files_to_copy_as_a_missing_file_does(tmp_path, monkeypatch, name, files):
    import torchvision

    def offline(self):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(DatasetNotFoundError) as failed:
        get_dataset(name, root=tmp_path, download=True)
    with pytest.raises(DatasetNotFoundError) as missing:
        get_dataset(name, root=tmp_path)
    assert "no network" in str(failed.value) and "copy the files there by hand" in str(failed.value)
    for err in (failed, missing):
        listed = re.search(r"expected (\[.*?\]) under (\S+?)[.]?(?: |$)", str(err.value))
        assert ast.literal_eval(listed.group(1)) == files and listed.group(2) == str(tmp_path.resolve())


def test_dataset_options_are_what_the_loader_takes():
    assert dataset_options("mnist5k") == ["flatten", "standardize"]
    assert dataset_options("Fashion-MNIST") == dataset_options("cifar10") == ["flatten", "standardize"]
    assert dataset_options("gaussian") == ["dim", "n_train", "n_test", "data_seed"]
    b = get_dataset("gaussian", dim=3, n_train=5, n_test=2, data_seed=1)
    assert b.input_shape == (3,) and len(b.train) == 5 and len(b.test) == 2 and b.meta["data_seed"] == 1
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        dataset_options("imagenet")


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_dataset("imagenet")
    for name in DATASETS:
        assert name in str(err.value)


def test_mnist5k_split_is_fixed_and_stratified():
    b = get_dataset("mnist5k")
    assert b.input_shape == (784,) and len(b.train) == 4000 and len(b.test) == 1000
    x, y = b.train.tensors
    assert x.dtype == torch.float32 and float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.bincount(y, minlength=10).tolist() == [400] * 10
    assert torch.bincount(b.test.tensors[1], minlength=10).tolist() == [100] * 10
    again = get_dataset("mnist5k", flatten=False)
    assert again.input_shape == (1, 28, 28)
    assert torch.equal(again.train.tensors[0].flatten(1), x) and torch.equal(again.train.tensors[1], y)
    assert not (set(map(tuple, b.test.tensors[0][:50].tolist())) & set(map(tuple, x[:400].tolist())))


def test_gaussian_is_deterministic_regression():
    a = get_dataset("gaussian", dim=5, n_train=40, n_test=10, data_seed=7)
    b = get_dataset("gaussian", dim=5, n_train=40, n_test=10, data_seed=7)
    c = get_dataset("gaussian", dim=5, n_train=40, n_test=10, data_seed=8)
    assert a.task == "regression" and a.num_classes == 0 and a.input_shape == (5,)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0]) and torch.equal(a.test.tensors[1], b.test.tensors[1])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
    x, y = a.train.tensors
    assert_close(y, x @ a.meta["A"].T)
    with pytest.raises(ValueError):
        get_dataset("gaussian", n_train=0)


def _indexed(n: int) -> TensorDataset:
    return TensorDataset(torch.arange(n).float().unsqueeze(1), torch.arange(n))


def _take(stream: BatchStream, k: int) -> list[list[int]]:
    return [next(stream)[1].tolist() for _ in range(k)]


def test_batch_stream_is_deterministic_and_reshuffles_each_epoch():
    ds = _indexed(10)
    s1, s2 = BatchStream(ds, 3, seed=5), BatchStream(ds, 3, seed=5)
    b1, b2 = _take(s1, 9), _take(s2, 9)
    assert b1 == b2  # two consumers, same batches
    assert all(len(b) == 3 for b in b1)
    for e in range(3):  # drop_last: 3 batches per epoch, no index repeated inside an epoch
        ep = sum(b1[3 * e:3 * e + 3], [])
        assert len(set(ep)) == 9
    assert b1[:3] != b1[3:6]
    assert _take(BatchStream(ds, 3, seed=6), 3) != b1[:3]
    assert s1.epoch == 2 and s1.batches_per_epoch == 3
    x, y = next(BatchStream(ds, 4, seed=0))
    assert torch.equal(x[:, 0].long(), y)


def test_batch_stream_keep_last_and_full_batch():
    ds = _indexed(10)
    sizes = [len(b) for b in _take(BatchStream(ds, 4, seed=0, drop_last=False), 6)]
    assert sizes == [4, 4, 2, 4, 4, 2]
    for bs in (None, 10, 50):
        s = BatchStream(ds, bs, seed=0)
        assert _take(s, 2) == [list(range(10))] * 2 and s.batches_per_epoch == 1


@pytest.mark.parametrize("consumed", [0, 2, 3, 7])
def test_batch_stream_resume_gives_same_next_batches(consumed):
    ds = _indexed(11)
    s = BatchStream(ds, 3, seed=9)
    _take(s, consumed)
    state = s.state_dict()
    expected = _take(s, 5)
    fresh = BatchStream(ds, 3, seed=0)
    _take(fresh, 4)  # some unrelated history that the state must overwrite
    fresh.load_state_dict(state)
    assert _take(fresh, 5) == expected
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(ds, 4, seed=9).load_state_dict(state)


def test_batch_stream_generic_dataset_and_errors():
    class Squares(Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return torch.tensor([float(i)]), i * i

    x, y = next(BatchStream(Squares(), 2, seed=0))
    assert x.shape == (2, 1) and torch.equal(y, x[:, 0].long() ** 2)
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(_indexed(5), 0, seed=0)
    with pytest.raises(ValueError, match="empty"):
        BatchStream(_indexed(0), 2, seed=0)
    with pytest.raises(ValueError, match="empty"):
        probe_batch(_indexed(0), 2, seed=0)


def test_probe_batch_is_fixed():
    ds = _indexed(50)
    x1, y1 = probe_batch(ds, 8, seed=3)
    x2, y2 = probe_batch(ds, 8, seed=3)
    assert torch.equal(y1, y2) and len(set(y1.tolist())) == 8
    assert not torch.equal(probe_batch(ds, 8, seed=4)[1], y1)
    assert len(probe_batch(ds, 500, seed=0)[1]) == 50 and len(probe_batch(ds, None, seed=0)[1]) == 50
    for seed in range(5):  # not the run's first training batches, nor another seed's
        first = torch.cat([next(iter_)[1] for iter_ in [BatchStream(ds, 10, seed=s) for s in (seed, seed + 1)]])
        assert set(probe_batch(ds, 10, seed=seed)[1].tolist()) not in (set(first[:10].tolist()), set(first[10:].tolist()))
