"""Detection data (issue #22): Fashion-MNIST scenes with boxes, a COCO-format folder and its validation, the collate.

The scene tests run on small made-up item arrays (and IDX files written here), so they need no installed data set;
the boxes are checked against the segmentation scene that `FashionMNISTScenes` composes from the same seed and index.
"""

from __future__ import annotations

import gzip
import json
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tokenprune.detect import collate
from tokenprune.errors import DataError
from tokenprune.train.data import build_datasets
from tokenprune.train.detdata import CocoDetection, FashionMNISTDetection, coco_pair
from tokenprune.train.segdata import FashionMNISTScenes

SIZE = 64


def _items(n: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Items like Fashion-MNIST's: ink in a random rectangle of each 28 x 28 image, classes 0-9."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28), np.uint8)
    for image in images:
        top, left = rng.integers(0, 10, size=2)
        h, w = rng.integers(8, 18, size=2)
        image[top : top + h, left : left + w] = rng.integers(60, 256, size=(h, w))
    return images, rng.integers(0, 10, size=n).astype(np.uint8)


def _dataset(**kw) -> FashionMNISTDetection:
    images, labels = _items()
    return FashionMNISTDetection(images, labels, 50, SIZE, seed=kw.pop("seed", 3), items=(2, 5), **kw)


# -- Fashion-MNIST scenes ------------------------------------------------------------------------------------------
def test_samples_follow_torchvision_convention():
    ds = _dataset()
    image, target = ds[0]
    assert image.shape == (1, SIZE, SIZE) and image.dtype == torch.float32
    assert set(target) == {"boxes", "labels"}
    for i in range(len(ds)):
        _, target = ds[i]
        boxes, labels = target["boxes"], target["labels"]
        assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
        assert boxes.shape == (len(labels), 4) and len(labels) >= 1
        assert ((labels >= 1) & (labels <= 10)).all()  # 0 is the background, carried by no box
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes >= 0).all() and (boxes <= SIZE).all()


def test_boxes_are_tight_around_the_visible_ink_of_the_segmentation_scene():
    """Every pixel the segmentation scene of the same seed labels c lies in a box of label c; every box touches
    pixels of its class on all four sides (tight); images are the scene's."""
    images, labels = _items()
    ds = FashionMNISTDetection(images, labels, 50, SIZE, seed=3, items=(2, 5), min_visible=0.0)
    scenes = FashionMNISTScenes(images, labels, 50, SIZE, seed=3, items=(2, 5))
    for i in range(len(ds)):
        image, target = ds[i]
        scene_image, mask = scenes[i]
        assert torch.equal(image, scene_image)
        covered = torch.zeros_like(mask, dtype=torch.bool)
        for (x1, y1, x2, y2), c in zip(target["boxes"].long().tolist(), target["labels"].tolist()):
            inside = mask[y1:y2, x1:x2] == c
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            covered[y1:y2, x1:x2] |= inside
        assert covered.eq(mask > 0).all()


def test_scenes_are_fixed_by_seed_and_index_and_some_boxes_overlap():
    a, b, other = _dataset(), _dataset(), _dataset(seed=4)
    same = all(torch.equal(a[i][1]["boxes"], b[i][1]["boxes"]) for i in range(10))
    assert same and not all(torch.equal(a[i][1]["boxes"], other[i][1]["boxes"]) for i in range(10))
    overlapping = 0
    for i in range(len(a)):
        boxes = a[i][1]["boxes"]
        lo, hi = (
            torch.maximum(boxes[:, None, :2], boxes[None, :, :2]),
            torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:]),
        )
        area = (hi - lo).clamp(min=0).prod(-1)
        overlapping += int((area.triu(1) > 0).any())
    assert overlapping >= 5


def test_hidden_items_are_left_out():
    loose, strict = _dataset(min_visible=0.0), _dataset(min_visible=1.0)
    fewer = 0
    for i in range(len(loose)):
        _, placed = strict.scenes[i]
        items = [j for j, _, _ in strict.scenes.placements(i)]
        ids, visible = torch.unique(placed, return_counts=True)
        whole = [int(k) for k, n in zip(ids.tolist(), visible.tolist()) if k and n == strict.ink[items[k - 1]]]
        assert len(strict[i][1]["labels"]) == len(whole)  # only items with all their ink in view
        assert len(loose[i][1]["labels"]) == len(ids) - 1  # every item with a visible pixel
        fewer += len(whole) < len(ids) - 1
    assert fewer > 0  # some items really were partly hidden
    with pytest.raises(DataError, match="min_visible=1.5"):
        _dataset(min_visible=1.5)


def test_an_item_placed_twice_gives_two_boxes():
    """A split of one item: every placement is the same item, and each visible placement is its own box."""
    ink = np.zeros((1, 28, 28), np.uint8)
    ink[0, 4:24, 6:22] = 200
    data = FashionMNISTDetection(ink, np.array([7]), 40, SIZE, seed=0, items=(2, 2), min_visible=0.0)
    apart = 0
    for i in range(len(data)):
        (_, t1, l1), (_, t2, l2) = data.scenes.placements(i)
        if abs(t1 - t2) >= 28 or abs(l1 - l2) >= 28:  # the two placements do not overlap: two whole boxes
            boxes = data[i][1]["boxes"]
            assert len(boxes) == 2 and data[i][1]["labels"].tolist() == [8, 8]
            assert sorted(boxes[:, 1].tolist()) == sorted([t1 + 4.0, t2 + 4.0])
            apart += 1
    assert apart > 0


def test_hflip_mirrors_the_boxes():
    plain, flipped = _dataset(), _dataset(augment={"hflip": 1.0})
    for i in range(5):
        image, target = plain[i]
        image_f, target_f = flipped[i]
        assert torch.equal(image_f, image.flip(-1))
        x1, y1, x2, y2 = target["boxes"].unbind(1)
        mirrored = torch.stack([SIZE - x2, y1, SIZE - x1, y2], 1)
        order = lambda b: sorted(map(tuple, b.tolist()))  # noqa: E731 - the flip changes the box order
        assert order(target_f["boxes"]) == order(mirrored)


def test_collate_batches_different_box_counts():
    ds = _dataset()
    batch = [ds[i] for i in range(4)]
    assert len({len(t["labels"]) for _, t in batch}) > 1
    images, targets = collate(batch)
    assert images.shape == (4, 1, SIZE, SIZE)
    assert [t["boxes"].shape[0] for t in targets] == [len(t["labels"]) for _, t in batch]


def _write_idx(path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_build_datasets_takes_training_scenes_from_the_training_split(tmp_path):
    images, _ = _items(30)
    names = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }
    for split, cls in (("train", 3), ("test", 7)):  # one class per split tells where an item came from
        _write_idx(tmp_path / names[split][0], images, 0x803)
        _write_idx(tmp_path / names[split][1], np.full(len(images), cls), 0x801)
    data = SimpleNamespace(
        source="fashion_mnist_detection", root=str(tmp_path), scenes=6, val_scenes=4, scene_items=[2, 3],
        ink_threshold=50, augment={}, ignore_index=255, train_subset=None, val_subset=None,
    )  # fmt: skip
    bundle = build_datasets(data, img_size=SIZE, in_chans=1)
    assert bundle.task == "detection" and bundle.num_classes == 11 and bundle.in_chans == 1
    assert (len(bundle.train), len(bundle.val)) == (6, 4)
    assert all((bundle.train[i][1]["labels"] == 4).all() for i in range(len(bundle.train)))
    assert all((bundle.val[i][1]["labels"] == 8).all() for i in range(len(bundle.val)))


# -- COCO folder ---------------------------------------------------------------------------------------------------
def _coco(root, split="train", **edit):
    """Two images (40x20 and 30x30), categories 3 and 7, three boxes and one crowd annotation; `edit` replaces
    top-level fields or, as ``annotations0={...}``, updates one entry."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    Image.fromarray(np.full((20, 40, 3), 200, np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(np.full((30, 30, 3), 50, np.uint8)).save(root / "images" / "b.png")
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 20},
            {"id": 2, "file_name": "b.png", "width": 30, "height": 30},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [0, 0, 20, 10], "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 3, "bbox": [10, 5, 30, 15], "iscrowd": 0},
            {"id": 12, "image_id": 2, "category_id": 3, "bbox": [5, 5, 10, 20]},
            {"id": 13, "image_id": 2, "category_id": 7, "bbox": [0, 0, 30, 30], "iscrowd": 1},
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }
    for key, value in edit.items():
        if key.startswith("annotations") and key[-1].isdigit():
            data["annotations"][int(key[-1])].update(value)
        elif key.startswith("images") and key[-1].isdigit():
            data["images"][int(key[-1])].update(value)
        else:
            data[key] = value
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_letterboxes_images_scales_boxes_and_maps_categories(tmp_path):
    _coco(tmp_path)
    ds = CocoDetection(tmp_path, "train", 80)
    assert ds.num_classes == 3 and len(ds) == 2
    image, target = ds[0]  # 40x20 -> 80x40, padded below to 80x80
    assert image.shape == (3, 80, 80)
    assert torch.equal(image[:, 40:], torch.zeros(3, 40, 80)) and not torch.equal(image[:, :40], torch.zeros(3, 40, 80))
    assert target["boxes"].tolist() == [[0.0, 0.0, 40.0, 20.0], [20.0, 10.0, 80.0, 40.0]]
    assert target["labels"].tolist() == [2, 1]  # category 7 -> 2, 3 -> 1 (ids in order)
    _, target = ds[1]  # 30x30 -> 80x80; the crowd annotation is left out
    assert target["labels"].tolist() == [1]
    assert torch.allclose(target["boxes"], torch.tensor([[5.0, 5.0, 15.0, 25.0]]) * 80 / 30)
    flipped = CocoDetection(tmp_path, "train", 80, train=True, augment={"hflip": 1.0})
    assert flipped[0][1]["boxes"].tolist() == [[40.0, 0.0, 80.0, 20.0], [0.0, 10.0, 60.0, 40.0]]


def test_build_datasets_coco(tmp_path):
    _coco(tmp_path, "train")
    _coco(tmp_path, "val")
    data = SimpleNamespace(
        source="coco", root=str(tmp_path), train_split="train", val_split="val", augment={}, check_images="header",
        train_subset=None, val_subset=None,
    )  # fmt: skip
    bundle = build_datasets(data, img_size=64, in_chans=3)
    assert bundle.task == "detection" and bundle.num_classes == 3 and len(bundle.train) == len(bundle.val) == 2


def test_coco_fingerprint_sees_the_boxes_not_the_folder(tmp_path):
    """Resuming refuses other data (train/datacheck.py): a moved box changes the fingerprint, a moved folder not."""
    from tokenprune.train.datacheck import fingerprint

    def prints(root, **edit):
        _coco(root, "train", **edit)
        _coco(root, "val")
        data = SimpleNamespace(
            source="coco", root=str(root), train_split="train", val_split="val", augment={}, check_images="header",
            train_subset=None, val_subset=None,
        )  # fmt: skip
        return fingerprint(build_datasets(data, img_size=64, in_chans=3))

    same = prints(tmp_path / "a")
    assert prints(tmp_path / "b") == same
    assert same["train"]["names"] is not None and same["train"]["content"] is not None
    moved = prints(tmp_path / "c", annotations1={"bbox": [10, 4, 30, 15]})
    assert moved["train"]["content"] != same["train"]["content"] and moved["val"] == same["val"]
    relabelled = prints(tmp_path / "d", annotations0={"category_id": 3})
    assert relabelled["train"]["content"] != same["train"]["content"]


BAD_COCO = {
    "empty file": (dict(images=[]), r"instances_train\.json is empty"),
    "missing image": (dict(images1={"file_name": "gone.png"}), r"images\[1\] \(id 2\): its image .*gone\.png"),
    "box outside": (dict(annotations1={"bbox": [10, 5, 31, 15]}), r"annotations\[1\] \(id 11\): box .* outside"),
    "no area": (dict(annotations2={"bbox": [5, 5, 0, 20]}), r"annotations\[2\] \(id 12\): box .*no area"),
    "unknown category": (dict(annotations0={"category_id": 9}), r"annotations\[0\] \(id 10\): 'category_id' 9"),
    "unknown image": (dict(annotations2={"image_id": 5}), r"annotations\[2\] \(id 12\): 'image_id' 5"),
    "wrong size": (dict(images0={"width": 41}), r"images entry \(id 1\).* says 41x20.*/a\.png is 40x20"),
    "bad bbox": (dict(annotations0={"bbox": [0, 0, 10]}), r"annotations\[0\] \(id 10\): 'bbox' must be"),
    "no categories": (dict(categories=[]), r"lists no categories"),
}


@pytest.mark.parametrize("case", list(BAD_COCO))
def test_coco_problems_are_data_errors_naming_file_and_entry(tmp_path, case):
    edit, message = BAD_COCO[case]
    path = _coco(tmp_path, **edit)
    with pytest.raises(DataError, match=message) as info:
        CocoDetection(tmp_path, "train", 64)
    assert str(path) in str(info.value)


def test_coco_missing_or_broken_annotation_file(tmp_path):
    with pytest.raises(DataError, match=r"instances_train\.json does not exist"):
        CocoDetection(tmp_path, "train", 64)
    _coco(tmp_path).write_text("{not json")
    with pytest.raises(DataError, match=r"instances_train\.json is not readable JSON"):
        CocoDetection(tmp_path, "train", 64)


def test_coco_splits_must_share_categories(tmp_path):
    _coco(tmp_path, "train")
    _coco(tmp_path, "val", categories=[{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 8, "name": "x"}])
    with pytest.raises(
        DataError, match=r"list different categories \(only in training: none; only in validation: \[8\]"
    ):
        coco_pair(tmp_path, "train", "val", 64)


@pytest.mark.fashion_mnist
def test_installed_fashion_mnist_scenes():
    data = SimpleNamespace(
        source="fashion_mnist_detection", root=None, scenes=20, val_scenes=10, scene_items=[2, 4], ink_threshold=50,
        augment={}, ignore_index=255, train_subset=None, val_subset=None,
    )  # fmt: skip
    bundle = build_datasets(data, img_size=SIZE, in_chans=1, seed=5)
    counts = []
    for split in (bundle.train, bundle.val):
        for i in range(len(split)):
            image, target = split[i]
            assert image.shape == (1, SIZE, SIZE)
            assert ((target["labels"] >= 1) & (target["labels"] <= 10)).all()
            counts.append(len(target["labels"]))
    assert min(counts) >= 1 and max(counts) <= 4 and len(set(counts)) > 1
    again = build_datasets(data, img_size=SIZE, in_chans=1, seed=5)
    assert torch.equal(again.val[3][1]["boxes"], bundle.val[3][1]["boxes"])
