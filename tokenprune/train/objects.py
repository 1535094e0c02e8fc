"""Fashion-MNIST objects: one item per image at a random position and scale on a larger canvas of label-free clutter.

The classification analogue of ImageNet at DeiT's token count (docs/design.md §3.6): a 112 x 112 canvas seen by a
ViT with patch 8 is 14 x 14 = 196 patch tokens, as 224 / 16; the item covers 28-56 px, so most tokens are
background, and the background is not empty but cluttered, so finding the object is part of the task.

Image i of a split is a deterministic function of (seed, i), whatever the worker or the order of loading:

- the object is item i of the split (one image per item; the training images use the training file, the test
  images the test file), bilinearly resized to a side drawn from `object_size` and placed at a uniformly drawn position;
  the label is that item's class;
- the clutter under it is a smooth noise texture plus 4-8 fragments (8-16 px crops, shown at 1-2x) of *other*
  items of the same split, all at most `clutter` x full intensity. Its random draws never read the object's item
  or label, and the fragments' items are drawn uniformly from the split (the object's own item excluded), so the
  clutter has the same distribution for every class: it cannot carry the label, though fragments look like parts
  of objects, as background does on real photographs;
- the image is the pixel-wise maximum of clutter and object (the object is drawn at full contrast: its ink can be
  brighter than any clutter, its dark parts are not).

Training images may be flipped horizontally (``augment: {hflip: p}``), with the per-sample randomness that
`SeededDataset` seeds. Images are made when asked for; nothing is stored.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import DataError
from .segdata import _augment_options

__all__ = ["FashionMNISTObjects", "ObjectScene"]

# The canvas is normalised around mid-grey (as segdata does for one-channel images): its statistics depend on the
# clutter setting, and a fixed convention keeps one teacher valid for every setting.
_MEAN, _STD = 0.5, 0.5
_FRAGMENTS = (4, 8)  # fragments of other items per image, [min, max]
_FRAGMENT_SIDE = (8, 16)  # side of a fragment's crop of a 28 px item, [min, max]
_TEXTURE_CELL = 8  # the noise texture varies over about this many pixels (one ViT patch at 112/8)


class ObjectScene(NamedTuple):
    """One image before normalisation: `canvas` and `clutter` are [S, S] float32 in [0, 1]; the object is item
    `item` of the split, of class `label`, resized to `box[2]` px with its top-left corner at (`box[0]`, `box[1]`)."""

    canvas: np.ndarray
    clutter: np.ndarray
    label: int
    item: int
    box: tuple[int, int, int]


def _resize(image: np.ndarray, side: int) -> np.ndarray:
    """Bilinear resize of a square [k, k] array in [0, 1] to [side, side] (antialiased when it shrinks)."""
    if image.shape[-1] == side:
        return image.astype(np.float32)
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    shrink = side < image.shape[-1]
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=shrink)[0, 0].numpy()


class FashionMNISTObjects(Dataset):
    """Fashion-MNIST items on a cluttered canvas, one per image: a 10-class task where most of the image is background.

    Args:
        images: Fashion-MNIST images [N, 28, 28] uint8 of one split.
        labels: their classes [N].
        canvas: side of the generated canvas (>= the largest object).
        img_size: side of the returned image (the canvas is resized when they differ: the same content in fewer
            or more pixels, e.g. for a static baseline with fewer tokens).
        seed: fixes every image (use different seeds, and splits, for training and test images).
        object_size: [min, max] side of the resized item, in canvas pixels.
        clutter: the clutter's peak intensity as a fraction of full ink (0: a black background).
        augment: ``{"hflip": p}`` (training).

    Raises:
        DataError: sizes that do not fit, or images and labels that disagree.
    """

    num_classes = 10
    in_chans = 1

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        canvas: int = 112,
        img_size: int | None = None,
        *,
        seed: int = 0,
        object_size: tuple[int, int] | list[int] = (28, 56),
        clutter: float = 0.5,
        augment: dict | None = None,
    ) -> None:
        lo, hi = (int(v) for v in object_size)
        if not 1 <= lo <= hi <= canvas:
            raise DataError(
                f"data.object_size={[lo, hi]} must be [min, max] with 1 <= min <= max <= data.canvas={canvas}."
            )
        if not 0.0 <= clutter <= 1.0:
            raise DataError(f"data.clutter={clutter} must be in [0, 1] (the clutter's peak intensity).")
        if len(images) != len(labels) or len(images) < 2:
            raise DataError(
                f"objects need at least 2 items with one label each (got {len(images)} images, {len(labels)} labels)."
            )
        self.images = images
        self.canvas, self.img_size = int(canvas), int(img_size or canvas)
        self.seed, self.object_size, self.clutter = int(seed), (lo, hi), float(clutter)
        self.hflip = _augment_options(augment, "fashion_mnist_objects")
        self.labels = np.asarray(labels)  # image i shows item i: its class, which the run's data fingerprint hashes

    def __len__(self) -> int:
        return len(self.labels)

    def _clutter(self, rng: np.random.Generator, exclude: int) -> np.ndarray:
        s, k = self.canvas, self.images.shape[-1]
        peak = self.clutter
        out = np.zeros((s, s), dtype=np.float32)
        if peak == 0:
            return out
        cells = max(1, -(-s // _TEXTURE_CELL))
        coarse = np.abs(rng.standard_normal((cells, cells))).astype(np.float32)
        texture = _resize(coarse / max(float(coarse.max()), 1e-6), s)
        out = np.maximum(out, texture * peak * float(rng.uniform(0.2, 0.6)))
        for _ in range(int(rng.integers(_FRAGMENTS[0], _FRAGMENTS[1] + 1))):
            j = int(rng.integers(len(self.images) - 1))
            j += j >= exclude  # any item but the object's
            side = int(rng.integers(_FRAGMENT_SIDE[0], _FRAGMENT_SIDE[1] + 1))
            top, left = (int(v) for v in rng.integers(0, k - side + 1, size=2))
            crop = self.images[j, top : top + side, left : left + side].astype(np.float32) / 255.0
            shown = min(s, int(round(side * rng.uniform(1.0, 2.0))))
            piece = _resize(crop, shown) * peak * float(rng.uniform(0.5, 1.0))
            y, x = (int(v) for v in rng.integers(0, s - shown + 1, size=2))
            region = out[y : y + shown, x : x + shown]
            np.maximum(region, piece, out=region)
        return out

    def scene(self, i: int) -> ObjectScene:
        """Image i before normalisation and augmentation, with where its object is (for tests and pictures)."""
        if not 0 <= int(i) < len(self):
            raise IndexError(f"image {i} out of range for {len(self)} images")
        rng = np.random.default_rng([self.seed, int(i)])
        item = int(i)
        side = int(rng.integers(self.object_size[0], self.object_size[1] + 1))
        top, left = (int(v) for v in rng.integers(0, self.canvas - side + 1, size=2))
        clutter = self._clutter(rng, exclude=item)  # drawn after the placement, never from the object's item
        canvas = clutter.copy()
        region = canvas[top : top + side, left : left + side]
        np.maximum(region, _resize(self.images[item].astype(np.float32) / 255.0, side), out=region)
        return ObjectScene(canvas, clutter, int(self.labels[item]), item, (top, left, side))

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        scene = self.scene(i)
        image = torch.from_numpy(scene.canvas)[None]
        if self.img_size != self.canvas:
            shrink = self.img_size < self.canvas
            size = (self.img_size, self.img_size)
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=shrink)[0]
        if self.hflip and float(torch.rand(())) < self.hflip:
            image = image.flip(-1)
        return ((image - _MEAN) / _STD).contiguous(), scene.label
