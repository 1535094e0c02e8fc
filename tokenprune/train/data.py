"""Datasets and loaders: ImageFolder with timm's transforms, Fashion-MNIST from its IDX files, and a synthetic source;
for segmentation, a folder of images and masks and Fashion-MNIST scenes (`segdata.py`).

Every problem with a dataset is found here, before training starts, and reported as a `DataError` naming the path
and what to do. Loading is deterministic so that a resumed run sees exactly the batches, and the augmentations, of an
uninterrupted one: the sampler's order depends only on (seed, epoch), it can start mid-epoch, and each sample's
augmentation randomness is seeded from (seed, epoch, index) whatever the number of workers.
"""

from __future__ import annotations

import gzip
import os
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import DataError
from .datacheck import check_image_files, check_same_classes, read_image

__all__ = [
    "FASHION_MNIST_ROOT",
    "FashionMNIST",
    "SyntheticImages",
    "SeededDataset",
    "ResumableSampler",
    "DataBundle",
    "build_datasets",
    "make_loader",
    "default_workers",
]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Per-channel statistics of the Fashion-MNIST training set.
_FMNIST_MEAN, _FMNIST_STD = 0.2860, 0.3530


def _read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    hint = "install it with `apt-get install dataset-fashion-mnist` or set data.root to a folder holding the IDX files"
    if not path.is_file():
        raise DataError(f"Fashion-MNIST file {path} is missing; {hint}.")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"Fashion-MNIST file {path} is unreadable ({e}); {hint}.") from None
    header = 4 + 4 * dims
    if len(raw) < header or struct.unpack(">I", raw[:4])[0] != magic:
        raise DataError(f"{path} is not an IDX file of {dims} dimension(s) (bad magic number); {hint}.")
    shape = struct.unpack(f">{dims}I", raw[4:header])
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, found {len(raw) - header} bytes of data; {hint}.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_fashion_mnist(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The images [N, 28, 28] uint8 and labels [N] of one Fashion-MNIST split ("train" or "test") under `root`.

    Raises:
        DataError: if a file is missing, truncated or malformed, or images and labels disagree.
    """
    images, labels = (Path(root) / name for name in _FMNIST_FILES[split])
    pixels, classes = _read_idx(images, 0x803, 3), _read_idx(labels, 0x801, 1)
    if len(pixels) != len(classes):
        raise DataError(f"{images} has {len(pixels)} images but {labels} {len(classes)} labels.")
    return pixels, classes


class FashionMNIST(Dataset):
    """Fashion-MNIST read from its gzipped IDX files, as normalised [1, S, S] tensors.

    Args:
        root: folder with ``train-images-idx3-ubyte.gz`` and friends.
        split: "train" or "test".
        img_size: output resolution (28 is native; others are bilinear resizes).
        augment: training augmentation: ``hflip`` (probability) and ``crop_padding`` (pixels of random shift).

    Raises:
        DataError: if a file is missing, truncated or malformed, or images and labels disagree.
    """

    num_classes = 10
    in_chans = 1

    def __init__(self, root: str | Path, split: str = "train", img_size: int = 28, augment: dict | None = None) -> None:
        self.images, self.labels = read_fashion_mnist(root, split)
        self.img_size = img_size
        augment = dict(augment or {})
        self.hflip = float(augment.pop("hflip", 0.0))
        self.padding = int(augment.pop("crop_padding", 0))
        if augment:
            raise DataError(f"unknown Fashion-MNIST augmentation(s) {sorted(augment)}; known: hflip, crop_padding.")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = torch.from_numpy(self.images[i].astype(np.float32) / 255.0)[None]
        if self.padding:
            p = self.padding
            dy, dx = (int(v) for v in torch.randint(0, 2 * p + 1, (2,)))
            x = F.pad(x, (p, p, p, p))[:, dy : dy + 28, dx : dx + 28]
        if self.hflip and float(torch.rand(())) < self.hflip:
            x = x.flip(-1)
        if self.img_size != x.shape[-1]:
            x = F.interpolate(x[None], size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)[0]
        return (x - _FMNIST_MEAN) / _FMNIST_STD, int(self.labels[i])


class SyntheticImages(Dataset):
    """Random images whose class shifts a fixed per-class pattern, so that a model can learn something (smoke tests).

    Args:
        size: number of images.
        num_classes: number of classes.
        in_chans: channels.
        img_size: resolution.
        seed: fixes images and labels.
    """

    def __init__(self, size: int, num_classes: int, in_chans: int, img_size: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.patterns = torch.randn(num_classes, in_chans, img_size, img_size, generator=g)
        self.labels = torch.randint(0, num_classes, (size,), generator=g)
        self.noise = torch.randn(size, in_chans, img_size, img_size, generator=g)
        self.num_classes, self.in_chans = num_classes, in_chans

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        y = int(self.labels[i])
        return self.noise[i] + self.patterns[y], y


class SeededDataset(Dataset):
    """Wrap a dataset so each sample's random augmentation depends only on (seed, epoch, index).

    The process's random states are restored after each sample, so loading in the main process (workers = 0)
    does not disturb the model's randomness (Gumbel noise) either.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        sample_seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(i)
        torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
        try:
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed % 2**32)
            return self.dataset[i]
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(py_state)
            np.random.set_state(np_state)


class ResumableSampler(Sampler[int]):
    """This process's share of a (seed, epoch)-determined order, optionally starting part-way through.

    Args:
        size: dataset length.
        rank: this process's rank.
        world: number of processes.
        shuffle: permute per epoch (training) or keep order (evaluation).
        seed: base seed of the permutation (the same on every rank).
        drop_last: drop the tail so every rank has the same count (training); otherwise ranks take a strided
            share without padding, so evaluation counts every image exactly once.
    """

    def __init__(
        self, size: int, rank: int = 0, world: int = 1, shuffle: bool = True, seed: int = 0, drop_last: bool = True
    ) -> None:
        self.size, self.rank, self.world, self.shuffle, self.seed = size, rank, world, shuffle, seed
        self.drop_last, self.epoch, self.start = drop_last, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and skip the first `start` samples of this rank's share."""
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.drop_last:
            order = order[: self.size // self.world * self.world]
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.start)


@dataclass
class DataBundle:
    """Training and validation datasets plus what the model needs to know about them.

    ``task`` is "classification" (samples are (image, class)), "segmentation" (samples are (image, mask [H, W])
    with `ignore_index` marking pixels that count nowhere) or "detection" (samples are (image, {"boxes", "labels"}),
    labels 1..num_classes-1 with 0 the background; batch them with `tokenprune.detect.collate`).
    """

    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    task: str = "classification"
    ignore_index: int = 255


def _imagefolder(root: Path, split: str, transform) -> Dataset:
    from torchvision.datasets import ImageFolder

    folder = root / split
    if not folder.is_dir():
        raise DataError(
            f"image folder {folder} does not exist; data.root must hold '{split}/<class>/<image>' "
            f"(set data.train_split / data.val_split if your folders are named differently)."
        )
    try:
        return ImageFolder(str(folder), transform=transform, loader=read_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"image folder {folder} is unusable: {e}") from None


def build_datasets(data, *, img_size: int, in_chans: int, seed: int = 0, model=None) -> DataBundle:
    """Build the datasets a recipe's ``data`` section describes; validate them before any training.

    Args:
        data: a `DataSection` (or anything with its attributes).
        img_size: input resolution of the model.
        in_chans: input channels of the model (synthetic source only).
        seed: seed of the synthetic source.
        model: the teacher, to resolve timm's normalisation and crop (imagefolder only).

    Raises:
        DataError: if the dataset is missing or malformed.
    """
    source = data.source
    if source == "synthetic":
        train = SyntheticImages(data.synthetic_size, data.num_classes, in_chans, img_size, seed)
        val = SyntheticImages(data.synthetic_size, data.num_classes, in_chans, img_size, seed + 1)
        val.patterns = train.patterns  # same classes, fresh noise
        bundle = DataBundle(train, val, data.num_classes, in_chans)
    elif source == "fashion_mnist":
        root = Path(data.root or FASHION_MNIST_ROOT)
        train = FashionMNIST(root, "train", img_size, data.augment)
        val = FashionMNIST(root, "test", img_size)
        bundle = DataBundle(train, val, 10, 1)
    elif source == "fashion_mnist_objects":
        from .objects import FashionMNISTObjects

        root = Path(data.root or FASHION_MNIST_ROOT)
        splits = {}
        for split, offset in (("train", 0), ("test", 1)):
            images, labels = read_fashion_mnist(root, split)
            splits[split] = FashionMNISTObjects(
                images, labels, data.canvas, img_size, seed=seed * 2 + offset, object_size=data.object_size,
                clutter=data.clutter, augment=data.augment if split == "train" else None,
            )  # fmt: skip
        bundle = DataBundle(splits["train"], splits["test"], 10, 1)
    elif source in ("fashion_mnist_scenes", "fashion_mnist_detection"):
        from .detdata import FashionMNISTDetection
        from .segdata import FashionMNISTScenes

        task = "segmentation" if source == "fashion_mnist_scenes" else "detection"
        scenes = FashionMNISTScenes if task == "segmentation" else FashionMNISTDetection
        root = Path(data.root or FASHION_MNIST_ROOT)
        splits = {}
        for split, count, offset in (("train", data.scenes, 0), ("test", data.val_scenes, 1)):
            images, labels = read_fashion_mnist(root, split)
            splits[split] = scenes(
                images, labels, count, img_size, seed=seed * 2 + offset, items=data.scene_items,
                threshold=data.ink_threshold, augment=data.augment if split == "train" else None,
            )  # fmt: skip
        bundle = DataBundle(splits["train"], splits["test"], 11, 1, task, data.ignore_index)
    elif source == "coco":
        from .detdata import coco_pair

        if data.root is None:
            raise DataError("data.root is not set; point it at a folder with images/ and annotations/.")
        check = getattr(data, "check_images", "header")
        train, val = coco_pair(data.root, data.train_split, data.val_split, img_size, augment=data.augment, check=check)
        bundle = DataBundle(train, val, train.num_classes, 3, "detection")
    elif source == "segfolder":
        from .segdata import SegmentationFolder

        if data.root is None:
            raise DataError("data.root is not set; point it at a folder with <split>/images and <split>/masks.")
        common = dict(
            num_classes=data.num_classes, in_chans=in_chans, ignore_index=data.ignore_index,
            reduce_zero_label=data.reduce_zero_label,
        )  # fmt: skip
        train = SegmentationFolder(data.root, data.train_split, img_size, train=True, augment=data.augment, **common)
        val = SegmentationFolder(data.root, data.val_split, img_size, train=False, **common)
        bundle = DataBundle(train, val, data.num_classes, in_chans, "segmentation", data.ignore_index)
    elif source == "imagefolder":
        if data.root is None:
            raise DataError("data.root is not set; point it at a folder with train/ and val/ image folders.")
        from timm.data import create_transform, resolve_data_config

        cfg = resolve_data_config({"input_size": (in_chans, img_size, img_size)}, model=model)
        common = {k: cfg[k] for k in ("mean", "std", "interpolation")}
        train_tf = create_transform(cfg["input_size"], is_training=True, **common, **data.augment)
        val_tf = create_transform(cfg["input_size"], is_training=False, crop_pct=cfg["crop_pct"], **common)
        root = Path(data.root)
        train, val = _imagefolder(root, data.train_split, train_tf), _imagefolder(root, data.val_split, val_tf)
        check_same_classes(train.classes, val.classes, root)
        bundle = DataBundle(train, val, len(train.classes), in_chans)
    else:
        raise DataError(
            f"data.source={source!r} is unknown; use 'imagefolder', 'fashion_mnist', 'fashion_mnist_objects' or "
            "'synthetic' (classification), 'segfolder' or 'fashion_mnist_scenes' (segmentation), "
            "'fashion_mnist_detection' or 'coco' (detection)."
        )
    if data.train_subset:
        bundle.train = torch.utils.data.Subset(bundle.train, range(min(data.train_subset, len(bundle.train))))
    if data.val_subset:
        bundle.val = torch.utils.data.Subset(bundle.val, range(min(data.val_subset, len(bundle.val))))
    if len(bundle.train) == 0 or len(bundle.val) == 0:
        raise DataError(f"dataset {source} at {data.root} is empty; check data.root and the split folders.")
    if source == "imagefolder":  # every file the run will read opens, before the teacher's evaluation
        for split in (bundle.train, bundle.val):
            base = split.dataset if isinstance(split, torch.utils.data.Subset) else split
            indices = split.indices if isinstance(split, torch.utils.data.Subset) else range(len(base))
            check_image_files([base.samples[i][0] for i in indices], getattr(data, "check_images", "header"))
    return bundle


def default_workers() -> int:
    """DataLoader workers when a recipe leaves `data.workers` null: up to 4, within the CPUs this process may use
    (its affinity, as a container or `taskset` limits it), shared among the training processes on this machine
    (torchrun's LOCAL_WORLD_SIZE), one CPU left for each process itself. 1 on a 2-core machine, 0 on one core."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        here = 1
    return max(0, min(4, cpus // here - 1))


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    rank: int = 0,
    world: int = 1,
    seed: int = 0,
    workers: int = 0,
    pin_memory: bool = False,
    collate_fn=None,
) -> DataLoader:
    """A DataLoader over a `ResumableSampler`; training loaders also seed augmentations per sample. `collate_fn`:
    None stacks samples (PyTorch's default); detection passes `tokenprune.detect.collate` (targets differ in size).

    Use ``loader.sampler.set_epoch(epoch, start)`` and, for training, ``loader.dataset.set_epoch(epoch)``
    before iterating.
    """
    if train:
        dataset = SeededDataset(dataset, seed)
    sampler = ResumableSampler(len(dataset), rank, world, shuffle=train, seed=seed, drop_last=train)
    # reason: a private generator, so creating an iterator never draws from the global RNG that Gumbel noise uses.
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=train,
        pin_memory=pin_memory,
        persistent_workers=False,
        generator=generator,
        collate_fn=collate_fn,
    )
