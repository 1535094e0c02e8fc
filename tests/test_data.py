"""Datasets: Fashion-MNIST IDX parsing and its errors, ImageFolder errors, deterministic resumable sampling."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenprune.errors import DataError
from tokenprune.train.data import (
    FashionMNIST,
    ResumableSampler,
    SeededDataset,
    build_datasets,
    default_workers,
    make_loader,
)
from tokenprune.train.recipe import DataSection


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_fmnist(root: Path, n: int = 6) -> None:
    rng = np.random.default_rng(0)
    for split, (img, lab) in {"train": ("train", "train"), "test": ("t10k", "t10k")}.items():
        _write_idx(root / f"{img}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)), 0x803)
        _write_idx(root / f"{lab}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)), 0x801)
        del split


def test_fashion_mnist_from_idx(tmp_path):
    _fake_fmnist(tmp_path)
    ds = FashionMNIST(tmp_path, "train", img_size=32, augment={"hflip": 0.5, "crop_padding": 2})
    x, y = ds[0]
    assert x.shape == (1, 32, 32) and 0 <= y < 10 and len(ds) == 6


def test_fashion_mnist_missing_names_path_and_fix(tmp_path):
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz.*apt-get install dataset-fashion-mnist"):
        build_datasets(DataSection(source="fashion_mnist", root=str(tmp_path)), img_size=28, in_chans=1)


def test_fashion_mnist_malformed(tmp_path):
    _fake_fmnist(tmp_path)
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03garbage")
    with pytest.raises(DataError, match="bad magic"):
        FashionMNIST(tmp_path, "train")
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(5), 0x801)
    with pytest.raises(DataError, match="6 images but"):
        FashionMNIST(tmp_path, "train")
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="unreadable"):
        FashionMNIST(tmp_path, "train")


@pytest.mark.fashion_mnist
def test_installed_fashion_mnist():
    bundle = build_datasets(DataSection(source="fashion_mnist"), img_size=28, in_chans=1)
    assert len(bundle.train) == 60000 and len(bundle.val) == 10000 and bundle.num_classes == 10


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="data.root is not set"):
        build_datasets(DataSection(source="imagefolder"), img_size=32, in_chans=3)
    with pytest.raises(DataError, match=str(tmp_path / "train")):
        build_datasets(DataSection(source="imagefolder", root=str(tmp_path)), img_size=32, in_chans=3)
    with pytest.raises(DataError, match="unknown"):
        build_datasets(DataSection(source="webdataset"), img_size=32, in_chans=3)


def test_imagefolder_with_timm_transforms(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / split / cls / "0.png")
    bundle = build_datasets(DataSection(source="imagefolder", root=str(tmp_path)), img_size=32, in_chans=3)
    assert bundle.num_classes == 2 and bundle.train[0][0].shape == (3, 32, 32) and bundle.val[0][0].shape == (3, 32, 32)


def test_sampler_resume_and_shards():
    full = list(ResumableSampler(10, seed=3))
    s = ResumableSampler(10, seed=3)
    s.set_epoch(0, start=4)
    assert list(s) == full[4:]
    s.set_epoch(1)
    assert list(s) != full
    shards = [list(ResumableSampler(10, r, 3, shuffle=False, drop_last=False)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))


def test_seeded_augmentation_is_per_sample_and_leaves_global_rng():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(()), i

    ds = SeededDataset(Noisy(), seed=1)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = ds[2][0]
    assert torch.equal(torch.get_rng_state(), before)
    assert ds[2][0] == a
    ds.set_epoch(1)
    assert ds[2][0] != a
    loader = make_loader(Noisy(), 2, train=True, seed=5)
    loader.sampler.set_epoch(0)
    loader.dataset.set_epoch(0)
    first = [b[0] for b in loader]
    loader.sampler.set_epoch(0, start=2)
    assert torch.equal(next(iter(loader))[0], first[1])


@pytest.mark.parametrize(
    "cpus, processes, expected", [(1, None, 0), (2, None, 1), (16, None, 4), (16, "8", 1), (16, "4", 3), (2, "x", 1)]
)
def test_default_workers_fit_the_cpus_this_process_may_use(monkeypatch, cpus, processes, expected):
    """A recipe that leaves data.workers null never asks for more loader processes than the CPUs allow (PyTorch warns
    and may freeze): up to 4, within this process's CPU affinity, shared among torchrun's processes on the machine."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: cpus)
    if processes is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
    assert default_workers() == expected
    assert DataSection().workers is None  # the recipe's default is this rule, not a fixed count
