"""Segmentation: the FPN segmenter under the spatial pass, both data sources and their errors, loss, metrics, and a
tiny sparse fine-tune through the harness."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import tokenprune
from tokenprune.errors import ConfigError, DataError
from tokenprune.models import Segmenter, create_model
from tokenprune.train import finetune, load_recipe
from tokenprune.train.data import build_datasets
from tokenprune.train.losses import LossWeights, SparsificationLoss, segmentation_loss
from tokenprune.train.metrics import confusion_matrix, segmentation_scores
from tokenprune.train.segdata import FashionMNISTScenes, SegmentationFolder

# A ConvNeXt small enough for a CPU test: 64 px input, third stage 4 blocks at 4x4.
TINY_KWARGS = {"num_classes": 5, "in_chans": 1, "dims": [8, 16, 32, 64], "depths": [1, 1, 4, 1], "fpn_channels": 8}


def _tiny(**extra):
    return create_model("convnext_atto", task_head="fpn", **{**TINY_KWARGS, **extra})


# -- model ---------------------------------------------------------------------------------------------------------
def test_segmenter_sparsifies_and_keeps_its_output_shape():
    model = _tiny().eval()
    x = torch.randn(2, 1, 64, 64)
    sparse = tokenprune.sparsify(model, 0.7, example_inputs=x).eval()
    config = tokenprune.config_of(sparse)
    assert config.kind == "spatial"
    assert config.chain == [f"backbone.stages_2.blocks.{i}" for i in range(4)]
    assert config.locations == [1, 2, 3] and config.keep_ratios == [0.7, 0.5, 0.3]
    assert config.source["kwargs"]["task_head"] == "fpn"
    with torch.no_grad():
        dense_out, sparse_out = model(x), sparse(x)
    assert isinstance(model, Segmenter)
    assert sparse_out.shape == dense_out.shape == (2, 5, 64, 64)
    assert torch.isfinite(sparse_out).all()


def test_unknown_task_head_and_missing_num_classes_are_config_errors():
    with pytest.raises(ConfigError, match="task_head='unet'"):
        create_model("convnext_atto", task_head="unet", num_classes=3)
    with pytest.raises(ConfigError, match="needs num_classes"):
        create_model("convnext_atto", task_head="fpn")


# -- folder source -------------------------------------------------------------------------------------------------
def _write_pair(root, split, stem, size=(20, 16), mask_size=None, value=1, image_ext=".png"):
    images, masks = root / split / "images", root / split / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    w, h = size
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(images / f"{stem}{image_ext}")
    mw, mh = mask_size or size
    mask = np.zeros((mh, mw), np.uint8)
    mask[: mh // 2] = value
    Image.fromarray(mask).save(masks / f"{stem}.png")


def _folder(root, **kw):
    return SegmentationFolder(root, "train", 12, 3, **kw)


def test_folder_source_pairs_crops_and_flips_jointly(tmp_path):
    _write_pair(tmp_path, "train", "a")
    _write_pair(tmp_path, "train", "b", image_ext=".jpg", value=255)
    ds = _folder(tmp_path, train=True, augment={"hflip": 1.0})
    assert [p[0].name for p in ds.pairs] == ["a.png", "b.jpg"]
    image, mask = ds[0]
    assert image.shape == (3, 12, 12) and mask.shape == (12, 12) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) <= {0, 1}
    # a mask whose left half is 1 must still line up with the image after the flip
    images, masks = tmp_path / "train" / "images", tmp_path / "train" / "masks"
    pixels = np.zeros((16, 20, 3), np.uint8)
    pixels[:, :10] = 255
    Image.fromarray(pixels).save(images / "a.png")
    labels = np.zeros((16, 20), np.uint8)
    labels[:, :10] = 1
    Image.fromarray(labels).save(masks / "a.png")
    image, mask = _folder(tmp_path, train=True, augment={"hflip": 1.0})[0]
    assert torch.equal(image[0] > 0, mask == 1)


def test_folder_source_pads_small_images_with_ignore(tmp_path):
    _write_pair(tmp_path, "train", "a", size=(8, 8))
    image, mask = _folder(tmp_path)[0]
    assert image.shape == (3, 12, 12) and (mask == 255).sum() == 12 * 12 - 8 * 8


def test_folder_reduce_zero_label(tmp_path):
    _write_pair(tmp_path, "train", "a", value=3)  # top half 3, bottom half 0
    _, mask = _folder(tmp_path, reduce_zero_label=True)[0]
    assert set(mask.unique().tolist()) == {2, 255}


def _corrupt(path):
    path.write_bytes(b"not an image at all")


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("no_folder", "does not exist"),
        ("image_without_mask", r"image .*c\.png has no mask"),
        ("mask_without_image", r"mask .*d\.png has no image"),
        ("size_mismatch", r"mask .*a\.png is 10x16 but image .*a\.png is 20x16"),
        ("bad_label", r"mask .*a\.png has label value\(s\) \[7\] >= num_classes=3"),
        ("unreadable_image", r"cannot read .*images.b\.png"),
        ("unreadable_mask", r"cannot read .*masks.b\.png"),
    ],
)
def test_folder_source_errors_name_the_file(tmp_path, case, match):
    if case != "no_folder":
        _write_pair(tmp_path, "train", "a", mask_size=(10, 16) if case == "size_mismatch" else None,
                    value=7 if case == "bad_label" else 1)  # fmt: skip
        _write_pair(tmp_path, "train", "b")
    if case == "image_without_mask":
        _write_pair(tmp_path, "train", "c")
        (tmp_path / "train" / "masks" / "c.png").unlink()
    if case == "mask_without_image":
        _write_pair(tmp_path, "train", "d")
        (tmp_path / "train" / "images" / "d.png").unlink()
    if case == "unreadable_image":
        _corrupt(tmp_path / "train" / "images" / "b.png")
    if case == "unreadable_mask":
        _corrupt(tmp_path / "train" / "masks" / "b.png")
    with pytest.raises(DataError, match=match):
        _folder(tmp_path)


def test_folder_errors_come_before_training(tmp_path):
    _write_pair(tmp_path, "train", "a", value=9)
    _write_pair(tmp_path, "val", "a")
    overrides = ["task=segmentation", "model.task_head=fpn", "model.name=convnext_atto", "data.source=segfolder",
                 f"model.kwargs={json.dumps({**TINY_KWARGS, 'num_classes': 3, 'in_chans': 3})}", "data.img_size=64",
                 f"data.root={tmp_path}", "data.num_classes=3", f"run.output_dir={tmp_path / 'r'}"]  # fmt: skip
    with pytest.raises(DataError, match="label value"):
        finetune(None, overrides=overrides)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


# -- Fashion-MNIST scenes ------------------------------------------------------------------------------------------
def _items():
    images = np.zeros((3, 28, 28), np.uint8)
    images[:, 10:20, 10:20] = 200  # a 10x10 ink square in each item
    return images, np.array([0, 4, 9])


def test_scenes_are_deterministic_and_labelled_by_ink():
    images, labels = _items()
    scenes = FashionMNISTScenes(images, labels, 5, 40, seed=3, items=[1, 2])
    again = FashionMNISTScenes(images, labels, 5, 40, seed=3, items=[1, 2])
    other = FashionMNISTScenes(images, labels, 5, 40, seed=4, items=[1, 2])
    canvas, mask = scenes.scene(2)
    assert np.array_equal(canvas, again.scene(2)[0]) and np.array_equal(mask, again.scene(2)[1])
    assert any(not np.array_equal(scenes.scene(i)[1], other.scene(i)[1]) for i in range(5))
    assert np.array_equal(mask > 0, canvas > 50)  # label exactly where there is ink
    assert set(np.unique(mask)) <= {0, 1, 5, 10}  # class + 1
    image, target = scenes[2]
    assert image.shape == (1, 40, 40) and target.shape == (40, 40) and target.dtype == torch.int64


def test_scene_source_from_the_recipe_uses_both_splits(fashion_mnist_like):
    recipe = load_recipe(None, ["task=segmentation", "data.source=fashion_mnist_scenes", "data.scenes=7",
                                "data.val_scenes=3", "data.scene_items=[2,4]",
                                f"data.root={fashion_mnist_like}"])  # fmt: skip
    bundle = build_datasets(recipe.data, img_size=48, in_chans=1)
    assert (len(bundle.train), len(bundle.val), bundle.num_classes, bundle.task) == (7, 3, 11, "segmentation")
    x, y = bundle.val[0]
    assert x.shape == (1, 48, 48) and int(y.min()) >= 0 and int(y.max()) <= 10


# -- loss and metrics ----------------------------------------------------------------------------------------------
def test_miou_on_a_hand_made_example():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 2]])
    conf = confusion_matrix(pred, target, num_classes=5)
    assert int(conf.sum()) == 6  # the two ignored pixels count nowhere, whatever was predicted there
    scores = segmentation_scores(conf)
    # IoU: class 0 = 1/(1+1+1) (one TP, one FP at (1,1), one FN at (0,1)); class 1 = 2/3; class 2 = 1/2;
    # classes 3 and 4 occur in neither targets nor (counted) predictions and are left out of the mean.
    assert scores["miou"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert scores["pixel_acc"] == pytest.approx(100 * 4 / 6)


def test_segmentation_loss_ignores_255():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4))
    ignored = target.clone()
    ignored[0] = 255
    expected = torch.nn.functional.cross_entropy(logits[1:], target[1:]).detach()
    assert float(segmentation_loss(logits, ignored).detach()) == pytest.approx(float(expected), rel=1e-5)
    zero = segmentation_loss(logits, torch.full_like(target, 255))
    zero.backward()
    assert float(zero.detach()) == 0.0 and logits.grad is not None
    loss = SparsificationLoss(LossWeights.for_kind("spatial", kl=0.5), task="segmentation")
    out = loss(logits.detach(), target, None, teacher_logits=logits.detach())
    assert float(out.parts["kl"]) == pytest.approx(0.0, abs=1e-6)


def test_task_must_match_the_data_source(tmp_path):
    with pytest.raises(ConfigError, match="task: segmentation needs"):
        finetune(None, overrides=["task=segmentation", f"run.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="task=.*unknown"):
        load_recipe(None, ["task=keypoints"])


# -- the harness end to end ----------------------------------------------------------------------------------------
def test_tiny_sparse_segmentation_finetune(tmp_path, fashion_mnist_like):
    kwargs = json.dumps({**TINY_KWARGS, "num_classes": 11})
    common = ["task=segmentation", "model.name=convnext_atto", "model.task_head=fpn", f"model.kwargs={kwargs}",
              "data.source=fashion_mnist_scenes", "data.img_size=64", "data.scenes=16", "data.val_scenes=8",
              "data.workers=0", "optim.batch_size=8", "optim.epochs=2", "optim.warmup_epochs=0", "run.device=cpu",
              "run.threads=1", "run.log_every=1", f"data.root={fashion_mnist_like}"]  # fmt: skip
    teacher = finetune(None, overrides=[*common, "sparsify.enabled=false", f"run.output_dir={tmp_path / 't'}"])
    overrides = [*common, f"model.checkpoint={tmp_path / 't' / 'final.pt'}", "loss.kind=spatial", "loss.kl=0",
                 f"run.output_dir={tmp_path / 's'}"]  # fmt: skip
    student = finetune(None, overrides=overrides)
    assert tokenprune.config_of(student.model).kind == "spatial"
    m = student.metrics
    assert m["teacher_miou"] == pytest.approx(teacher.metrics["miou"])
    assert 0 <= m["miou"] <= 100 and 0 <= m["pixel_acc"] <= 100 and m["steps"] == 4
    lines = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if r["kind"] == "eval"]
    assert evals and {"miou", "pixel_acc"} <= set(evals[0])
    train = [r for r in lines if r["kind"] == "train"]
    assert all({"ce", "ratio", "distill"} <= set(r) for r in train) and train[-1]["distill"] > 0


def test_a_sparsified_segmenter_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = tokenprune.create_model("convnext_atto", task_head="fpn", num_classes=5, in_chans=1).eval()
    x = torch.randn(2, 1, 64, 64)
    sparse = tokenprune.sparsify(model, 0.7, example_inputs=x[:1]).eval()
    loaded = tokenprune.load(tokenprune.save(sparse, tmp_path / "seg.safetensors")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), sparse(x))


def test_a_three_block_stage_gets_as_many_keep_ratios_as_locations(tmp_path):
    model = tokenprune.create_model(
        "convnext_atto", task_head="fpn", num_classes=5, in_chans=1, depths=(1, 1, 3, 1), dims=(16, 32, 64, 96)
    ).eval()
    sparse = tokenprune.sparsify(model, 0.7, example_inputs=torch.randn(1, 1, 64, 64))
    config = tokenprune.config_of(sparse)
    assert config.locations == [1, 2] and len(config.keep_ratios) == 2
    tokenprune.load(tokenprune.save(sparse, tmp_path / "seg.safetensors"))
