"""Segmentation data: a folder of images and label masks, and Fashion-MNIST items composed into scenes.

Both yield ``(image [C, S, S] float, mask [S, S] int64)``; mask values are class ids, `ignore_index` (255) marks
pixels that count in neither the loss nor the metrics. Random augmentations draw from torch's global generator,
which `SeededDataset` seeds per sample, so a resumed run sees the same crops and flips.

Folder layout (``data.source: segfolder``), one folder per split (``data.train_split`` / ``data.val_split``)::

    root/<split>/images/<stem>.jpg|.jpeg|.png
    root/<split>/masks/<stem>.png        # one channel (L or palette P); value = class id, 255 = ignore

Every pair is checked before training: a missing folder, an image without a mask or a mask without an image, an
unreadable file, image and mask of different sizes, and mask values >= ``num_classes`` other than the ignore value
are `DataError`s naming the file. Images are opened (header and, for PNG, checksums); masks are decoded in full.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import DataError

__all__ = ["SegmentationFolder", "FashionMNISTScenes", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# ImageNet statistics for RGB folders (what pretrained timm backbones expect); one channel: mid-grey.
_RGB_MEAN, _RGB_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_FMNIST_MEAN, _FMNIST_STD = 0.2860, 0.3530


def _hflip(image: Tensor, mask: Tensor, p: float) -> tuple[Tensor, Tensor]:
    if p and float(torch.rand(())) < p:
        return image.flip(-1), mask.flip(-1)
    return image, mask


def _augment_options(augment: dict | None, source: str) -> float:
    augment = dict(augment or {})
    hflip = float(augment.pop("hflip", 0.0))
    if augment:
        raise DataError(f"unknown {source} augmentation(s) {sorted(augment)}; known: hflip.")
    return hflip


class SegmentationFolder(Dataset):
    """Images and masks from ``root/<split>/images`` and ``root/<split>/masks`` (matched by file stem).

    Training samples are a random crop of `size` x `size` (padded first where the image is smaller: image with 0,
    mask with the ignore value) and an optional horizontal flip, both applied to image and mask together.
    Validation samples are the centre crop (padded likewise): a fixed-size approximation of whole-image evaluation.

    Args:
        root: dataset folder.
        split: sub-folder of the split.
        size: crop size.
        num_classes: number of classes; mask values >= it must be `ignore_index`.
        in_chans: 1 (images read as grey) or 3 (RGB).
        train: random crop and flip (True) or centre crop (False).
        augment: ``{"hflip": p}``.
        ignore_index: the label that is ignored.
        reduce_zero_label: 0 becomes `ignore_index` and other labels move down by one (ADE20K's files).

    Raises:
        DataError: for any of the problems listed in the module docstring, naming the file.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        size: int,
        num_classes: int,
        *,
        in_chans: int = 3,
        train: bool = False,
        augment: dict | None = None,
        ignore_index: int = 255,
        reduce_zero_label: bool = False,
    ) -> None:
        if in_chans not in (1, 3):
            raise DataError(f"segfolder reads grey (in_chans=1) or RGB (in_chans=3) images, not in_chans={in_chans}.")
        self.size, self.num_classes, self.in_chans, self.train = size, num_classes, in_chans, train
        self.ignore_index, self.reduce_zero_label = ignore_index, reduce_zero_label
        self.hflip = _augment_options(augment, "segfolder") if train else 0.0
        self.pairs = self._pairs(Path(root) / split)
        for image, mask in self.pairs:
            self._check(image, mask)

    @staticmethod
    def _pairs(folder: Path) -> list[tuple[Path, Path]]:
        images_dir, masks_dir = folder / "images", folder / "masks"
        for d in (images_dir, masks_dir):
            if not d.is_dir():
                raise DataError(
                    f"segmentation folder {d} does not exist; data.root must hold <split>/images and <split>/masks "
                    "(set data.train_split / data.val_split if your split folders are named differently)."
                )
        images = {p.stem: p for p in sorted(images_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        masks = {p.stem: p for p in sorted(masks_dir.iterdir()) if p.suffix.lower() == ".png"}
        for stem, path in images.items():
            if stem not in masks:
                raise DataError(f"image {path} has no mask: expected {masks_dir / (stem + '.png')}.")
        for stem, path in masks.items():
            if stem not in images:
                raise DataError(f"mask {path} has no image: expected {images_dir / stem}.jpg, .jpeg or .png.")
        return [(images[s], masks[s]) for s in sorted(images)]

    def _open(self, path: Path, verify: bool):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                if verify:
                    img.verify()  # checks what it can without decoding (PNG checksums); reopened to read
                    return None
                img.load()
                return img.copy()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise DataError(f"cannot read {path}: {e}; replace or remove the file (and its pair).") from None

    def _mask_array(self, path: Path) -> np.ndarray:
        mask = self._open(path, verify=False)
        if mask.mode not in ("L", "P", "I", "I;16"):
            raise DataError(f"mask {path} has mode {mask.mode}; masks must be one-channel PNGs (L or P) of class ids.")
        array = np.asarray(mask, dtype=np.int64)
        if self.reduce_zero_label:
            array = np.where(array == 0, self.ignore_index, array - 1)
        return array

    def _check(self, image: Path, mask: Path) -> None:
        self._open(image, verify=True)
        from PIL import Image

        with Image.open(image) as img:
            image_size = img.size
        array = self._mask_array(mask)
        if (array.shape[1], array.shape[0]) != image_size:
            raise DataError(
                f"mask {mask} is {array.shape[1]}x{array.shape[0]} but image {image} is {image_size[0]}x"
                f"{image_size[1]}; they must have the same size."
            )
        bad = np.unique(array[(array >= self.num_classes) & (array != self.ignore_index)])
        if bad.size:
            raise DataError(
                f"mask {mask} has label value(s) {bad[:10].tolist()} >= num_classes={self.num_classes} that are not "
                f"the ignore value {self.ignore_index}; fix the mask or set data.num_classes."
            )

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        image_path, mask_path = self.pairs[i]
        img = self._open(image_path, verify=False).convert("L" if self.in_chans == 1 else "RGB")
        image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
        image = image[None] if image.dim() == 2 else image.permute(2, 0, 1)
        mask = torch.from_numpy(self._mask_array(mask_path))
        image, mask = self._crop(image, mask)
        image, mask = _hflip(image, mask, self.hflip)
        mean, std = ((0.5,), (0.5,)) if self.in_chans == 1 else (_RGB_MEAN, _RGB_STD)
        image = (image - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        return image.contiguous(), mask.contiguous()

    def _crop(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        s = self.size
        h, w = mask.shape
        ph, pw = max(0, s - h), max(0, s - w)
        if ph or pw:
            image = F.pad(image, (0, pw, 0, ph))
            mask = F.pad(mask, (0, pw, 0, ph), value=self.ignore_index)
            h, w = mask.shape
        if self.train:
            top, left = int(torch.randint(0, h - s + 1, ())), int(torch.randint(0, w - s + 1, ()))
        else:
            top, left = (h - s) // 2, (w - s) // 2
        return image[:, top : top + s, left : left + s], mask[top : top + s, left : left + s]


class FashionMNISTScenes(Dataset):
    """Fashion-MNIST items composed into canvases: a segmentation task with 11 classes on real images.

    Scene i is a deterministic function of (seed, i): 2-4 (`items`) items of the split, each placed at a random
    position of a `size` x `size` black canvas, later items on top where they overlap. A pixel's label is the
    class + 1 of the topmost item whose ink there is above `threshold` (0-255), else 0 (background). Scenes are
    generated when asked for, so none is stored.

    Args:
        images: Fashion-MNIST images [N, 28, 28] uint8 of one split.
        labels: their classes [N].
        count: number of scenes.
        size: canvas size (>= 28).
        seed: fixes the scenes (use different seeds, and splits, for training and test scenes).
        items: [min, max] items per scene.
        threshold: ink threshold.
        augment: ``{"hflip": p}``, applied to image and mask together.
        by_placement: label each pixel with the number + 1 of the placement covering it (detection's boxes), not
            with its class + 1.
    """

    num_classes = 11
    in_chans = 1

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        count: int,
        size: int = 64,
        *,
        seed: int = 0,
        items: tuple[int, int] | list[int] = (2, 4),
        threshold: int = 50,
        augment: dict | None = None,
        by_placement: bool = False,
    ) -> None:
        if size < images.shape[-1]:
            raise DataError(f"scene canvas {size} px is smaller than a Fashion-MNIST item ({images.shape[-1]} px).")
        lo, hi = (int(v) for v in items)
        if not 1 <= lo <= hi:
            raise DataError(f"data.scene_items={list(items)} must be [min, max] with 1 <= min <= max.")
        self.images, self.labels, self.count, self.size = images, labels, int(count), int(size)
        self.seed, self.items, self.threshold = int(seed), (lo, hi), int(threshold)
        self.hflip = _augment_options(augment, "fashion_mnist_scenes")
        self.by_placement = bool(by_placement)

    def __len__(self) -> int:
        return self.count

    def placements(self, i: int) -> list[tuple[int, int, int]]:
        """Scene i's items in the order they are laid down: (index in the split, top, left) each."""
        rng = np.random.default_rng([self.seed, int(i)])
        s, k = self.size, self.images.shape[-1]
        out = []
        for _ in range(int(rng.integers(self.items[0], self.items[1] + 1))):
            j = int(rng.integers(len(self.images)))
            top, left = (int(v) for v in rng.integers(0, s - k + 1, size=2))
            out.append((j, top, left))
        return out

    def scene(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw scene i: canvas [S, S] uint8 and labels [S, S] int64 (no augmentation, no normalisation); with
        ``by_placement`` the labels are the placement's number + 1 (0: background) rather than the class + 1."""
        s, k = self.size, self.images.shape[-1]
        canvas = np.zeros((s, s), dtype=np.uint8)
        mask = np.zeros((s, s), dtype=np.int64)
        for n, (j, top, left) in enumerate(self.placements(i)):
            item = self.images[j]
            ink = item > self.threshold
            # the item is opaque where it has ink: it covers what lies below, image and label alike
            region = canvas[top : top + k, left : left + k]
            region[ink] = item[ink]
            mask[top : top + k, left : left + k][ink] = n + 1 if self.by_placement else int(self.labels[j]) + 1
        return canvas, mask

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        canvas, mask = self.scene(i)
        image = (torch.from_numpy(canvas.astype(np.float32) / 255.0)[None] - _FMNIST_MEAN) / _FMNIST_STD
        image, target = _hflip(image, torch.from_numpy(mask), self.hflip)
        return image.contiguous(), target.contiguous()
