"""recipes/detection_coco.yaml: the COCO detection recipe says what its header says (the 1x schedule's shape, a
transform fixed to the letterboxed size, no logit KL), and the harness runs it end to end at toy scale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tokenprune
from tokenprune.detect.models import HEADS
from tokenprune.train.recipe import load_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "detection_coco.yaml"
COCO_TRAIN_IMAGES = 118_287  # instances_train2017.json


def test_detection_recipe_has_the_1x_shape_its_header_states():
    text = RECIPE.read_text()
    assert "UNTESTED at this scale" in text and '"1x"' in text and "cosine" in text
    recipe = load_recipe(RECIPE)
    assert recipe.task == "detection" and recipe.data.source == "coco" and recipe.model.task_head in HEADS
    optim = recipe.optim
    assert (optim.epochs, optim.global_batch_size, optim.lr, optim.weight_decay) == (12, 16, 1e-4, 0.05)
    iterations = COCO_TRAIN_IMAGES / optim.global_batch_size
    assert 450 <= optim.warmup_epochs * iterations <= 550  # "~500 iterations"
    assert optim.warmup_lr == pytest.approx(1e-3 * optim.lr)  # 1x's warm-up ratio
    # the detector's transform must not resize the letterboxed images again
    kwargs = recipe.model.kwargs
    assert kwargs["min_size"] == kwargs["max_size"] == recipe.data.img_size
    assert kwargs["num_classes"] == 80 + 1  # COCO's 80 categories and the background
    assert recipe.loss.kl == 0 and recipe.loss.kind == "spatial"
    assert (recipe.data.train_split, recipe.data.val_split) == ("train2017", "val2017")


def _coco(root: Path, split: str) -> None:
    """Two 48x32 images with two categories (ids 1 and 18, as COCO's are sparse)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    images = []
    for i in range(2):
        name = f"{split}{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(root / "images" / name)
        images.append({"id": i + 1, "file_name": name, "width": 48, "height": 32})
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 18, "bbox": [2, 3, 20, 16], "iscrowd": 0},
        {"id": 11, "image_id": 2, "category_id": 1, "bbox": [10, 5, 30, 20], "iscrowd": 0},
    ]
    categories = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]
    data = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


@pytest.mark.slow  # builds and sparsifies the recipe's ConvNeXt-T Faster R-CNN, one training step: ~20 s on 2 cores
def test_detection_recipe_runs_at_toy_scale(tmp_path):
    pytest.importorskip("torchmetrics", reason="torchmetrics (and pycocotools) not installed: pip install torchmetrics")
    from tokenprune.train import finetune

    for split in ("train2017", "val2017"):
        _coco(tmp_path / "coco", split)
    # Only what no CPU test can have changes: no download, no teacher file, 64 px, 3 classes, one step.
    overrides = [
        "model.pretrained=false", "model.checkpoint=null", "model.kwargs.num_classes=3", "model.kwargs.min_size=64",
        "model.kwargs.max_size=64", f"data.root={tmp_path / 'coco'}", "data.img_size=64", "data.workers=0",
        "optim.batch_size=2", "optim.global_batch_size=null", "optim.max_steps=1", "run.device=cpu", "run.threads=1",
        f"run.output_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    result = finetune(str(RECIPE), overrides=overrides)
    recipe = load_recipe(RECIPE)
    assert type(result.model).__name__ == "FasterRCNN"
    config = tokenprune.config_of(result.model)
    assert config.kind == "spatial" and config.ratio == recipe.sparsify.ratio
    assert config.source["name"] == recipe.model.name and config.source["kwargs"]["fpn_channels"] == 256
    assert result.metrics["steps"] == 1 and 0 <= result.metrics["map"] <= 100
