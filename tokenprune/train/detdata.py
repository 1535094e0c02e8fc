"""Detection data: Fashion-MNIST items composed into scenes with their boxes, and a COCO-format folder.

Both yield ``(image [C, S, S] float, target)`` with ``target = {"boxes": [K, 4] float32, "labels": [K] int64}`` in
torchvision's convention: boxes are ``x1, y1, x2, y2`` in pixels of the returned image (x2 > x1, y2 > y1), labels are
1..num_classes-1, and 0, the background, is carried by no box. Batch them with `tokenprune.detect.collate`
(images stacked, targets a list: box counts differ). Random augmentations draw from torch's global generator, which
`SeededDataset` seeds per sample.

COCO layout (``data.source: coco``)::

    root/images/<file_name>                          # every image an annotation file lists
    root/annotations/instances_<split>.json          # split: data.train_split / data.val_split (train, val)

Both annotation files are validated before training: a missing or unreadable file, one without images, an image
entry whose file is missing, an annotation of an unknown image or category, a box outside its image or without area,
and splits with different categories are `DataError`s naming the file and the entry.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import DataError
from .segdata import FashionMNISTScenes

__all__ = ["FashionMNISTDetection", "CocoDetection", "coco_pair"]


def _target(boxes: list[list[float]], labels: list[int]) -> dict[str, Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


class FashionMNISTDetection(Dataset):
    """Fashion-MNIST items composed into canvases (`FashionMNISTScenes`: same scenes for the same seed and index),
    with a box and a class for every item that is still visible.

    The scene is composed with each *placement's number* as its label, so the composed label map tells which pixels
    each placed item still covers after the later items (opaque where they have ink) were laid on top. An item's box
    is the tight box around those pixels; an item that keeps less than `min_visible` of its own ink pixels is left
    out (hidden). Its label is its class + 1. A horizontal flip (``augment={"hflip": p}``) flips image and label map
    together, so the boxes follow. The same item of the split placed twice in a scene gives two boxes.

    Args:
        images: Fashion-MNIST images [N, 28, 28] uint8 of one split.
        labels: their classes [N] (0-9).
        count: number of scenes.
        size: canvas size (>= 28).
        seed: fixes the scenes (use different seeds, and splits, for training and test scenes).
        items: [min, max] items per scene.
        threshold: ink threshold (0-255): an item pixel above it is ink.
        min_visible: the fraction of an item's ink that must stay visible for it to count.
        augment: ``{"hflip": p}``.
    """

    num_classes = 11  # background + 10 Fashion-MNIST classes
    in_chans = 1

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, count: int, size: int = 64, *, min_visible: float = 0.25, **scene
    ) -> None:
        if not 0.0 <= min_visible <= 1.0:
            raise DataError(f"min_visible={min_visible} must be a fraction in [0, 1].")
        # seed, items, threshold, augment: as FashionMNISTScenes takes them
        self.scenes = FashionMNISTScenes(images, labels, count, size, by_placement=True, **scene)
        threshold = self.scenes.threshold
        self.labels = np.asarray(labels, dtype=np.int64)  # each item's class (the data fingerprint hashes them)
        self.ink = (images > threshold).reshape(len(images), -1).sum(1)
        self.min_visible = float(min_visible)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"scene {i} of {len(self)}")  # scenes exist for any index; the data set has `count`
        # placed: the number + 1 of the placement covering each pixel, 0 for the background
        image, placed = self.scenes[i % len(self)]
        items = [j for j, _, _ in self.scenes.placements(i % len(self))]
        ids, visible = torch.unique(placed, return_counts=True)
        boxes, labels = [], []
        for index, pixels in zip(ids.tolist(), visible.tolist()):
            item = items[index - 1] if index else -1
            if index == 0 or pixels < self.min_visible * self.ink[item]:
                continue
            rows, cols = torch.nonzero(placed == index, as_tuple=True)
            boxes.append([int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1])
            labels.append(int(self.labels[item]) + 1)
        return image, _target(boxes, labels)


def coco_pair(
    root: str | Path, train_split: str, val_split: str, size: int, *, augment: dict | None = None, check: str = "header"
) -> tuple[CocoDetection, CocoDetection]:
    """Training and validation `CocoDetection` sets of a COCO-format folder, checked to share their categories.

    Raises:
        DataError: as `CocoDetection`, or when the two splits list different categories.
    """
    train = CocoDetection(root, train_split, size, train=True, augment=augment, check=check)
    val = CocoDetection(root, val_split, size, check=check)
    if train.categories != val.categories:
        only_train = sorted(set(train.categories) - set(val.categories))
        only_val = sorted(set(val.categories) - set(train.categories))
        raise DataError(
            f"{train.file} and {val.file} list different categories (only in training: {only_train[:5] or 'none'}; "
            f"only in validation: {only_val[:5] or 'none'}): labels are positions in the sorted category list, so "
            "they would not match. Give both files the same 'categories'."
        )
    return train, val


class CocoDetection(Dataset):
    """A COCO-format split: ``root/images`` and ``root/annotations/instances_<split>.json``.

    Every image is scaled so its longer side is `size` and padded at the right and bottom to `size` x `size` (the
    boxes scaled alike), RGB normalised with ImageNet statistics. Category ids map to labels 1..K in the order of
    their ids; ``num_classes`` is K + 1. Crowd annotations (``iscrowd: 1``) are left out, as torchvision's
    references train without them; an image without annotations is kept with no boxes.

    Args:
        root: dataset folder.
        split: the annotation file's split name.
        size: output side in pixels.
        train: apply the augmentation.
        augment: ``{"hflip": p}``.
        check: before use, open every image: "header" (format and size, compared with the entry's), "full" (also
            decode every pixel) or "off".

    Raises:
        DataError: for any problem listed in the module docstring, naming the file and the entry.
    """

    in_chans = 3

    def __init__(
        self,
        root: str | Path,
        split: str,
        size: int,
        *,
        train: bool = False,
        augment: dict | None = None,
        check: str = "header",
    ) -> None:
        self.root, self.size = Path(root), int(size)
        self.file = self.root / "annotations" / f"instances_{split}.json"
        augment = dict(augment or {}) if train else {}
        self.hflip = float(augment.pop("hflip", 0.0))
        if augment:
            raise DataError(f"unknown coco augmentation(s) {sorted(augment)}; known: hflip.")
        data = self._read()
        self.categories = self._categories(data)
        self.label_of = {cid: k + 1 for k, cid in enumerate(sorted(self.categories))}
        self.classes = [self.categories[cid] for cid in sorted(self.categories)]  # label k + 1 is classes[k]
        self.num_classes = len(self.label_of) + 1
        self.images = self._images(data)
        self.boxes: dict[int, list[tuple[list[float], int]]] = {image_id: [] for image_id in self.images}
        for index, ann in enumerate(data.get("annotations") or []):
            self._annotation(ann, index)
        self.order = sorted(self.images)
        self.files = [str(self.images[i]["path"]) for i in self.order]
        # the data fingerprint (train/datacheck.py) hashes the boxes and labels too: resuming on edited boxes refuses
        boxes = json.dumps([[image_id, self.boxes[image_id]] for image_id in self.order]).encode()
        self.content_digest = hashlib.sha256(boxes).hexdigest()[:16]
        if check != "off":
            self._check_files(check)

    def _check_files(self, mode: str) -> None:
        from PIL import Image

        from .datacheck import check_image_files

        check_image_files(self.files, mode)  # every file opens (and decodes, for "full"); names the first that fails
        for image_id in self.order:
            entry = self.images[image_id]
            with Image.open(entry["path"]) as img:
                size = img.size
            if size != (entry["width"], entry["height"]):
                raise self._bad(
                    f"images entry (id {image_id})",
                    f"it says {entry['width']}x{entry['height']}, but its image {entry['path']} is {size[0]}x{size[1]}",
                )

    def _bad(self, entry: str, problem: str) -> DataError:
        return DataError(f"{self.file}: {entry}: {problem}; fix or remove the entry.")

    def _read(self) -> dict[str, Any]:
        if not self.file.is_file():
            raise DataError(
                f"COCO annotation file {self.file} does not exist; data.root must hold annotations/instances_"
                "<split>.json and images/ (set data.train_split / data.val_split to the split names)."
            )
        try:
            data = json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise DataError(
                f"COCO annotation file {self.file} is not readable JSON ({type(e).__name__}: {e})."
            ) from None
        if not isinstance(data, dict) or not data.get("images"):
            raise DataError(
                f"COCO annotation file {self.file} is empty: it lists no images (a COCO file is an object with "
                "'images', 'annotations' and 'categories')."
            )
        return data

    def _categories(self, data: dict[str, Any]) -> dict[int, str]:
        categories: dict[int, str] = {}
        for index, cat in enumerate(data.get("categories") or []):
            cid = cat.get("id") if isinstance(cat, dict) else None
            if isinstance(cid, bool) or not isinstance(cid, int):
                raise self._bad(f"categories[{index}]", f"'id' must be an integer, got {str(cid)[:40]}")
            if cid in categories:
                raise self._bad(f"categories[{index}] (id {cid})", "the id is listed twice")
            categories[cid] = str(cat.get("name", cid))
        if not categories:
            raise DataError(f"COCO annotation file {self.file} lists no categories; a detector needs at least one.")
        return categories

    def _images(self, data: dict[str, Any]) -> dict[int, dict[str, Any]]:
        images: dict[int, dict[str, Any]] = {}
        for index, entry in enumerate(data["images"]):
            where = f"images[{index}]"
            if not isinstance(entry, dict):
                raise self._bad(where, "not an object")
            image_id, name = entry.get("id"), entry.get("file_name")
            width, height = entry.get("width"), entry.get("height")
            if isinstance(image_id, bool) or not isinstance(image_id, int) or image_id in images:
                raise self._bad(where, f"'id' {str(image_id)[:40]} is not an integer or is listed twice")
            where = f"images[{index}] (id {image_id})"
            if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
                raise self._bad(where, f"'file_name' {str(name)[:60]!r} is not a file name under images/")
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
                raise self._bad(where, f"'width' and 'height' must be positive integers, got {width}, {height}")
            path = self.root / "images" / name
            if not path.is_file():
                raise self._bad(where, f"its image {path} does not exist")
            images[image_id] = {"path": path, "width": width, "height": height}
        return images

    def _annotation(self, ann: Any, index: int) -> None:
        where = f"annotations[{index}]"
        if not isinstance(ann, dict):
            raise self._bad(where, "not an object")
        where = f"annotations[{index}] (id {str(ann.get('id'))[:20]})"
        image_id, cid, bbox = ann.get("image_id"), ann.get("category_id"), ann.get("bbox")
        if image_id not in self.images:
            raise self._bad(where, f"'image_id' {str(image_id)[:40]} is not an image of the file")
        if cid not in self.label_of:
            known = sorted(self.label_of)
            raise self._bad(where, f"'category_id' {str(cid)[:40]} is not among the file's categories {known[:10]}")
        if ann.get("iscrowd", 0):
            return
        numbers = isinstance(bbox, list) and len(bbox) == 4
        if not numbers or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
            raise self._bad(where, f"'bbox' must be [x, y, width, height], got {str(bbox)[:60]}")
        x, y, w, h = (float(v) for v in bbox)
        image = self.images[image_id]
        inside = all(map(math.isfinite, (x, y, w, h))) and x >= 0 and y >= 0
        inside = inside and x + w <= image["width"] + 1e-3 and y + h <= image["height"] + 1e-3
        if not inside or w <= 0 or h <= 0:
            raise self._bad(
                where,
                f"box {bbox} (x, y, width, height) lies outside its {image['width']}x{image['height']} image "
                f"{image['path'].name} or has no area",
            )
        self.boxes[image_id].append(([x, y, x + w, y + h], self.label_of[cid]))

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        from .datacheck import read_image

        image_id = self.order[i]
        entry = self.images[image_id]
        img = read_image(str(entry["path"]))
        if img.size != (entry["width"], entry["height"]):
            raise DataError(
                f"{self.file}: images entry id {image_id} says {entry['width']}x{entry['height']}, but its image "
                f"{entry['path']} is {img.size[0]}x{img.size[1]}; fix the entry."
            )
        image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        scale = self.size / max(entry["width"], entry["height"])
        h, w = (max(1, round(v * scale)) for v in (entry["height"], entry["width"]))
        image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        mean, std = (torch.tensor(v)[:, None, None] for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
        image = F.pad((image - mean) / std, (0, self.size - w, 0, self.size - h))
        pairs = self.boxes[image_id]
        target = _target([[v * scale for v in box] for box, _ in pairs], [label for _, label in pairs])
        if self.hflip and float(torch.rand(())) < self.hflip:
            image = image.flip(-1)
            boxes = target["boxes"]
            target["boxes"] = torch.stack(
                [self.size - boxes[:, 2], boxes[:, 1], self.size - boxes[:, 0], boxes[:, 3]], 1
            )
        return image.contiguous(), target
