"""Fashion-MNIST objects (train/objects.py): one item on a cluttered canvas, 196 patch tokens at 112 px / patch 8.

Most tests write their own small IDX files; the ones marked `fashion_mnist` read the installed dataset and are
skipped, with the reason, when it is absent (tests/conftest.py).
"""

from __future__ import annotations

import gzip
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tokenprune.errors import ConfigError, DataError
from tokenprune.train import build_datasets, finetune, load_recipe
from tokenprune.train.checkpoint import load_checkpoint
from tokenprune.train.data import SeededDataset
from tokenprune.train.objects import FashionMNISTObjects
from tokenprune.train.recipe import DataSection

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "scene_vit_cpu.yaml"
PEAK = 0.5  # the clutter setting of these tests


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _items(n: int, split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Items a split can be told by: training items are full-ink (255) vertical bars, test items horizontal ones;
    their length grows with the class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = np.zeros((n, 28, 28), np.uint8)
    for i, label in enumerate(labels):
        long, short = slice(2, 8 + 2 * label), slice(11, 17)
        images[i][(long, short) if split == "train" else (short, long)] = 255
    return images, labels


@pytest.fixture(scope="module")
def idx_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("objects-idx")
    for prefix, split, n in (("train", "train", 24), ("t10k", "test", 12)):
        images, labels = _items(n, split, seed=len(prefix))
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images, 0x803)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels, 0x801)
    return root


def _bundle(root: Path, img_size: int = 112, seed: int = 0, **data):
    section = DataSection(source="fashion_mnist_objects", root=str(root), clutter=PEAK, **data)
    return build_datasets(section, img_size=img_size, in_chans=1, seed=seed)


def _placed(item: np.ndarray, side: int) -> np.ndarray:
    """The item at `side` px as the test reads the generator's promise: bilinear (antialiased when shrinking)."""
    x = torch.from_numpy(item.astype(np.float32) / 255.0)[None, None]
    if side == item.shape[-1]:
        return x[0, 0].numpy()
    shrink = side < item.shape[-1]
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=shrink)[0, 0].numpy()


# -- determinism ---------------------------------------------------------------------------------------------------
def test_same_image_for_the_same_seed_and_index_whatever_the_order(idx_root):
    first, again = _bundle(idx_root).train, _bundle(idx_root).train
    forward = [first[i][0] for i in range(len(first))]
    backward = {i: again[i][0] for i in reversed(range(len(again)))}
    assert all(torch.equal(forward[i], backward[i]) for i in range(len(first)))
    assert torch.equal(first[5][0], first[5][0])  # reading others in between changes nothing
    other = _bundle(idx_root, seed=1).train
    assert sum(not torch.equal(forward[i], other[i][0]) for i in range(len(first))) == len(first)


def test_augmentation_is_seeded_per_sample(idx_root):
    train = _bundle(idx_root, augment={"hflip": 0.5}).train
    a, b = SeededDataset(train, seed=3), SeededDataset(train, seed=3)
    assert all(torch.equal(a[i][0], b[i][0]) for i in (4, 0, 7))
    plain = [_bundle(idx_root).train[i][0] for i in range(len(train))]
    flipped = [not torch.equal(a[i][0], plain[i]) for i in range(len(train))]
    assert any(flipped) and not all(flipped)
    assert all(torch.equal(a[i][0], plain[i].flip(-1)) for i, f in enumerate(flipped) if f)


# -- splits, labels, placement ---------------------------------------------------------------------------------------
def test_train_and_test_images_come_from_their_own_files(idx_root):
    bundle = _bundle(idx_root)
    assert (len(bundle.train), len(bundle.val), bundle.num_classes, bundle.in_chans) == (24, 12, 10, 1)
    for dataset, own, foreign in ((bundle.train, "train", "test"), (bundle.val, "test", "train")):
        own_items, own_labels = _items(len(dataset), own, seed=5 if own == "train" else 4)
        foreign_items = _items(24, foreign, seed=5 if foreign == "train" else 4)[0]
        for i in range(len(dataset)):
            scene = dataset.scene(i)
            top, left, side = scene.box
            region = scene.canvas[top : top + side, left : left + side]
            expected = np.maximum(scene.clutter[top : top + side, left : left + side], _placed(own_items[i], side))
            assert np.allclose(region, expected, atol=1e-6)
            wrong = np.maximum(scene.clutter[top : top + side, left : left + side], _placed(foreign_items[i], side))
            assert not np.allclose(region, wrong, atol=0.1)
            assert scene.label == int(own_labels[i]) == dataset[i][1]


def test_the_object_is_where_the_box_says_and_nowhere_else(idx_root):
    train = _bundle(idx_root, object_size=[20, 40]).train
    sides = set()
    for i in range(len(train)):
        scene = train.scene(i)
        top, left, side = scene.box
        sides.add(side)
        assert 20 <= side <= 40 and 0 <= top <= 112 - side and 0 <= left <= 112 - side
        outside = np.ones((112, 112), bool)
        outside[top : top + side, left : left + side] = False
        assert np.array_equal(scene.canvas[outside], scene.clutter[outside])  # the object draws only in its box
        assert scene.clutter.max() <= PEAK + 1e-6 < scene.canvas.max()  # the full-ink item is brighter
        bright = np.argwhere(scene.canvas > PEAK + 1e-3)
        assert bright[:, 0].min() >= top and bright[:, 0].max() < top + side
        assert bright[:, 1].min() >= left and bright[:, 1].max() < left + side
    assert len(sides) > 3  # scales vary


def test_clutter_never_reads_the_objects_item_or_label(idx_root):
    images, labels = _items(24, "train", seed=5)
    base = FashionMNISTObjects(images, labels, seed=2, clutter=PEAK)
    for i in (0, 7, 23):
        changed_images, changed_labels = images.copy(), labels.copy()
        changed_images[i] = 255 - changed_images[i]
        changed_labels[i] = (labels[i] + 3) % 10
        changed = FashionMNISTObjects(changed_images, changed_labels, seed=2, clutter=PEAK)
        assert np.array_equal(changed.scene(i).clutter, base.scene(i).clutter)
        assert changed.scene(i).label != base.scene(i).label
    # ...while it does show the other items (fragments): change them all and the clutter changes
    others = 255 - images
    others[7] = images[7]
    assert not np.array_equal(FashionMNISTObjects(others, labels, seed=2, clutter=PEAK).scene(7).clutter,
                              base.scene(7).clutter)  # fmt: skip
    assert not FashionMNISTObjects(images, labels, seed=2, clutter=0.0).scene(7).clutter.any()


def test_smaller_input_is_the_same_canvas_resized(idx_root):
    """The static baseline's input: the same content in fewer pixels (fewer tokens at the same patch size)."""
    full, small = _bundle(idx_root).val, _bundle(idx_root, img_size=80).val
    for i in (0, 5):
        canvas = torch.from_numpy(full.scene(i).canvas)[None, None]
        expected = F.interpolate(canvas, size=(80, 80), mode="bilinear", align_corners=False, antialias=True)[0]
        assert small[i][0].shape == (1, 80, 80)
        assert torch.allclose(small[i][0], (expected - 0.5) / 0.5, atol=1e-6)
        assert torch.allclose(full[i][0], (canvas[0] - 0.5) / 0.5)


def test_bad_settings_are_refused_naming_the_key(idx_root):
    with pytest.raises(DataError, match=r"data.object_size=\[30, 120\].*data.canvas=112"):
        _bundle(idx_root, object_size=[30, 120])
    with pytest.raises(DataError, match="unknown fashion_mnist_objects augmentation.*crop_padding"):
        _bundle(idx_root, augment={"crop_padding": 2})
    with pytest.raises(ConfigError, match="data.clutter"):
        load_recipe(None, ["data.clutter=1.5"])
    with pytest.raises(ConfigError, match="data.object_size"):
        load_recipe(None, ["data.object_size=[28]"])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*apt-get install"):
        _bundle(idx_root / "absent")
    with pytest.raises(DataError, match="fashion_mnist_objects"):
        build_datasets(DataSection(source="objects"), img_size=112, in_chans=1)


# -- geometry and the training machinery -----------------------------------------------------------------------------
def test_the_recipe_sees_196_patch_tokens(idx_root):
    from tokenprune.train import build_teacher

    recipe = load_recipe(RECIPE, ["model.checkpoint=null", f"data.root={idx_root}", "model.kwargs.depth=2"])
    teacher = build_teacher(recipe).eval()
    assert recipe.data.source == "fashion_mnist_objects" and recipe.data.canvas == 112
    assert teacher.patch_embed.patch_size == (8, 8) and teacher.patch_embed.num_patches == 196
    bundle = build_datasets(recipe.data, img_size=112, in_chans=1)
    x = torch.stack([bundle.train[i][0] for i in range(2)])
    with torch.no_grad():
        assert teacher.forward_features(x).shape == (2, 197, 64)  # 14 x 14 patches + the class token
        assert teacher(x).shape == (2, 10)


def test_a_recipe_with_this_source_finetunes_a_sparse_vit(tmp_path, idx_root):
    overrides = [
        "model.checkpoint=null", f"data.root={idx_root}", "data.train_subset=8", "data.val_subset=4",
        "model.kwargs.depth=4", "model.kwargs.embed_dim=32", "sparsify.locations=[1,2,3]",
        "optim.batch_size=4", "optim.max_steps=2", "optim.warmup_epochs=0", "run.threads=1", "run.log_every=1",
        f"run.output_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    result = finetune(RECIPE, overrides=overrides)
    assert result.metrics["steps"] == 2 and 0.0 <= result.metrics["top1"] <= 100.0
    saved = load_checkpoint(tmp_path / "run" / "final.pt")
    assert saved["sparsify_config"]["keep_ratios"] == pytest.approx([0.7, 0.49, 0.343])
    assert saved["data"]["train"]["count"] == 8 and saved["data"]["train"]["labels"] is not None


# -- the installed dataset -------------------------------------------------------------------------------------------
def _features(images: np.ndarray) -> np.ndarray:
    """Cheap features that see objects wherever they are: a 32-bin intensity histogram (log counts, so the few
    bright pixels count) and 8x8 average pooling."""
    hist = np.stack([np.histogram(im, bins=32, range=(0, 1))[0] for im in images]) / images[0].size
    pooled = F.avg_pool2d(torch.from_numpy(images)[:, None], 14)[:, 0].flatten(1).numpy()
    return np.concatenate([np.log1p(hist * 1000), pooled], axis=1)


def _nearest_mean_accuracy(train_x, train_y, test_x, test_y) -> float:
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mu) / sd, (test_x - mu) / sd
    means = np.stack([train_x[train_y == c].mean(0) for c in range(10)])
    predicted = ((test_x[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    return float((predicted == test_y).mean())


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_installed_clutter_alone_is_at_chance_and_the_probe_can_see_objects():
    bundle = build_datasets(DataSection(source="fashion_mnist_objects"), img_size=112, in_chans=1)
    assert (len(bundle.train), len(bundle.val)) == (60000, 10000)
    train = [bundle.train.scene(i) for i in range(1500)]
    test = [bundle.val.scene(i) for i in range(1000)]
    train_y, test_y = np.array([s.label for s in train]), np.array([s.label for s in test])
    clutter = _nearest_mean_accuracy(
        _features(np.stack([s.clutter for s in train])), train_y, _features(np.stack([s.clutter for s in test])), test_y
    )
    full = _nearest_mean_accuracy(
        _features(np.stack([s.canvas for s in train])), train_y, _features(np.stack([s.canvas for s in test])), test_y
    )
    chance_sd = (0.1 * 0.9 / len(test)) ** 0.5
    assert clutter < 0.1 + 4 * chance_sd, f"clutter-only probe {clutter:.3f}: the clutter carries the label"
    assert full > 0.1 + 6 * chance_sd, f"the same probe on whole images reaches only {full:.3f}"


# -- the proof script ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_proof_stages_chain_and_a_rerun_skips_finished_work(tmp_path, idx_root, monkeypatch, capsys):
    import runpy
    import sys

    examples = Path(__file__).resolve().parents[1] / "examples"
    monkeypatch.syspath_prepend(str(examples))  # the proof imports scene_curve, as `python examples/...` allows
    out = tmp_path / "proof"
    argv = ["scene_proof.py", "--smoke", "--out", str(out), "--data-root", str(idx_root), "--curve-ratios", "0.5",
            "--stages", "teacher,student,static,static@0.5,curve,report", "--speed-repeats", "0"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(examples / "scene_proof.py"), run_name="__main__")
    first = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(results["curve"]) == {"0.5", "0.7"}
    row = results["curve"]["0.7"]
    assert {"student", "static", "attention_untrained", "random_untrained"} <= set(row)
    assert row["student"]["flops_vs_teacher"] < 1 and row["static"]["tokens"] < 196
    assert "learned predictors" in (out / "curve.md").read_text() and (out / "curve.png").stat().st_size > 0
    finals = sorted(out.rglob("final.pt"))
    stamps = [p.stat().st_mtime_ns for p in finals]
    trained = re.compile(r"^step \d+ ", re.MULTILINE)  # the trainer's progress lines
    assert trained.search(first) and len(finals) >= 4  # teacher, student, curve student, static grid(s)
    runpy.run_path(str(examples / "scene_proof.py"), run_name="__main__")
    again = capsys.readouterr().out
    assert not trained.search(again) and "already finished" in again  # nothing is trained or evaluated again
    assert [p.stat().st_mtime_ns for p in finals] == stamps and json.loads(
        (out / "results.json").read_text()
    ) == results
    # the picture script draws this student on its own test canvases (the recipe stored in the checkpoint)
    picture = tmp_path / "kept.png"
    argv = ["visualize_kept.py", "--student", str(out / "student" / "final.pt"), "--data-root", str(idx_root),
            "--count", "2", "--out", str(picture)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(examples / "visualize_kept.py"), run_name="__main__")
    assert "trained student" in capsys.readouterr().out
    with Image.open(picture) as drawn:
        assert drawn.height > 2 * 112 and drawn.width > 3 * 112  # two canvases, three stage panels each


#: The spatial proof's two routes: its own recipe (a ConvNeXt), and XCiT, a token chain without a class token that is
#: sparsified spatially over its 7x7 grid of tokens (design.md §2.1).
SPATIAL_ROUTES = {
    "convnext_atto": [],
    "xcit_nano_12_p16_224": ["--set", "model.name=xcit_nano_12_p16_224",
                             "--set", "model.kwargs={img_size: 112, in_chans: 1, num_classes: 10}"],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("route", SPATIAL_ROUTES)
def test_spatial_proof_stages_chain_into_a_report(route, tmp_path, idx_root, monkeypatch, capsys):
    """examples/spatial_scene_proof.py (a sparsified spatial classifier on these images): teacher, student, control
    and report chain on a few items, and the report measures the student against the rest."""
    import runpy
    import sys

    examples = Path(__file__).resolve().parents[1] / "examples"
    monkeypatch.syspath_prepend(str(examples))  # the proof imports its neighbours, as `python examples/...` allows
    out = tmp_path / "spatial"
    argv = ["spatial_scene_proof.py", "--out", str(out), "--data-root", str(idx_root), "--train-subset", "8",
            "--val-subset", "4", "--teacher-epochs", "1", "--student-epochs", "1", "--speed-repeats", "0",
            "--set", "optim.batch_size=4", *SPATIAL_ROUTES[route]]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(examples / "spatial_scene_proof.py"), run_name="__main__")
    results = json.loads((out / "results.json").read_text())
    assert results["test_images"] == 12  # the whole test split, not the per-epoch subset
    assert results["model"] == route
    student = results["student"]
    assert student["keep_ratios"] == [0.7, 0.5, 0.3] and 0.5 < student["flops_vs_dense"] < 0.85
    assert {"random_locations_top1", "keep_all_top1", "keep_one_top1", "gap_to_control"} <= set(student)
    assert results["control"]["epochs"] == 1 and student["speedup"] is None
    assert student["masked_agrees"] == 12  # the trained student's two executions predict alike
    assert "random locations" in (out / "results.md").read_text()
    # where the student keeps its locations: shares of the object and of the background, per stage
    monkeypatch.setattr(sys, "argv", ["kept_on_object.py", str(out / "student" / "final.pt")])
    runpy.run_path(str(examples / "kept_on_object.py"), run_name="__main__")
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\| \d \|", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2", "3"]
    kept = [float(row.split("|")[2]) for row in rows]
    assert kept == pytest.approx([0.7, 0.5, 0.3], abs=0.03)  # of 49 locations: 34, 24, 14 (top-k rounds down)


def test_object_cover_is_the_share_of_the_box_each_cell_holds():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        from kept_on_object import object_cover
    finally:
        sys.path.pop(0)
    grid = object_cover((0, 0, 16), 112, (7, 7))  # the top-left cell exactly
    assert grid[0] == 1.0 and grid.sum() == 1.0
    grid = object_cover((8, 16, 16), 112, (7, 7)).view(7, 7)  # rows 8..24, columns 16..32: two cells, one column
    assert grid[0, 1] == grid[1, 1] == 0.5 and grid.sum() == 1.0
    grid = object_cover((30, 50, 40), 112, (7, 7))
    assert float(grid.sum()) == pytest.approx(1.0) and (grid >= 0).all()
