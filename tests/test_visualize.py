"""Pictures of what was kept: panel layout, shaded pixels where the recorded decisions dropped a patch, the command."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import tokenprune
from tokenprune.cli import EXIT_ERROR, app
from tokenprune.visualize import GAP, LABEL_HEIGHT, SHADE, SHADE_ALPHA, patch_grid

SMALL_VIT = {"depth": 4, "embed_dim": 48, "num_heads": 3, "num_classes": 4}  # stages before blocks 1, 2, 3
MEAN, STD = 0.5, 0.25


def _token_model(**kwargs):
    return tokenprune.create_model("deit_tiny_patch16_224", img_size=64, **SMALL_VIT, **kwargs)


def _grey_model():
    return tokenprune.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, **SMALL_VIT)


# name -> (dense model factory, input [C, H, W], pixels per cell: the patch size, or the sparsified stage's stride)
MODELS = {
    "token": (_token_model, (3, 64, 64), 16),
    "spatial": (lambda: tokenprune.create_model("convnext_atto", num_classes=4), (3, 64, 64), 16),
    "greyscale": (_grey_model, (1, 28, 28), 4),
}


@pytest.fixture(scope="module")
def sparse_models():
    built = {}
    for name, (factory, size, _) in MODELS.items():
        torch.manual_seed(0)
        built[name] = tokenprune.sparsify(factory(), 0.7, example_inputs=torch.randn(1, *size)).eval()
    return built


def _expected_rgb(image: torch.Tensor) -> np.ndarray:
    """The input as the picture should show it where nothing is shaded: de-normalised, grey as RGB, uint8."""
    x = (image * STD + MEAN).clamp(0, 1)
    x = x.expand(3, -1, -1) if x.shape[0] == 1 else x
    return (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _check_cells(panel: np.ndarray, clear: np.ndarray, decision: torch.Tensor, cell: int) -> None:
    """One kept cell equals the input, one dropped cell is the input blended with the shade colour."""
    cols = panel.shape[1] // cell
    kept, dropped = decision.nonzero()[0].item(), (decision == 0).nonzero()[0].item()
    for index, shaded in ((kept, False), (dropped, True)):
        r, c = divmod(index, cols)
        rows, columns = slice(r * cell, (r + 1) * cell), slice(c * cell, (c + 1) * cell)
        want = clear[rows, columns].astype(np.float64)
        if shaded:
            want = want * (1 - SHADE_ALPHA) + np.array(SHADE) * SHADE_ALPHA
            assert np.abs(panel[rows, columns].astype(np.float64) - clear[rows, columns]).mean() > 10
        np.testing.assert_allclose(panel[rows, columns], want, atol=1)


@pytest.mark.parametrize("name", list(MODELS))
def test_dropped_patches_are_shaded_and_kept_ones_are_not(sparse_models, name):
    model, (_, size, cell) = sparse_models[name], MODELS[name]
    images = torch.randn(2, *size).clamp(-2, 2)
    pictures = tokenprune.visualize(model, images, mean=MEAN, std=STD, scale=1, labels=False)
    decisions = [d[..., 0] for d in tokenprune.sparsity_state(model).decisions]  # what the model recorded
    height, width = size[1:]
    assert len(pictures) == 2
    for b, picture in enumerate(pictures):
        assert picture.mode == "RGB"
        assert picture.size == (len(decisions) * (width + GAP) - GAP, height)
        pixels = np.asarray(picture)
        for s, decision in enumerate(decisions):
            panel = pixels[:, s * (width + GAP) : s * (width + GAP) + width]
            _check_cells(panel, _expected_rgb(images[b]), decision[b], cell)


@pytest.mark.parametrize("name", list(MODELS))
def test_one_picture_per_image_one_panel_per_stage(sparse_models, name):
    model, (_, size, _) = sparse_models[name], MODELS[name]
    model.train()
    pictures = tokenprune.visualize(model, torch.randn(3, *size))  # default scale and captions
    assert model.training  # the eval forward left the mode as it was
    stages = len(tokenprune.selectors(model))
    scale = -(-112 // min(size[1:]))
    assert len(pictures) == 3 and stages == 3
    assert {p.size for p in pictures} == {(stages * (size[2] * scale + GAP) - GAP, LABEL_HEIGHT + size[1] * scale)}


def test_non_square_input():
    torch.manual_seed(0)
    model = tokenprune.sparsify(_token_model(dynamic_img_size=True), 0.7).eval()
    images = torch.randn(1, 3, 64, 96)
    (picture,) = tokenprune.visualize(model, images, mean=MEAN, std=STD, scale=1, labels=False)
    decisions = [d[0, :, 0] for d in tokenprune.sparsity_state(model).decisions]
    assert decisions[0].numel() == 4 * 6 and picture.size == (3 * 96 + 2 * GAP, 64)
    pixels = np.asarray(picture)
    for s, decision in enumerate(decisions):
        _check_cells(pixels[:, s * (96 + GAP) : s * (96 + GAP) + 96], _expected_rgb(images[0]), decision, 16)


def test_patch_grid_follows_the_aspect_ratio():
    assert patch_grid(49, 28, 28) == (7, 7)
    assert patch_grid(24, 64, 96) == (4, 6)
    assert patch_grid(24, 96, 64) == (6, 4)
    assert patch_grid(7, 10, 70) == (1, 7)


def test_a_dense_model_is_refused():
    with pytest.raises(tokenprune.TokenPruneError, match="not a sparsified model"):
        tokenprune.visualize(_token_model().eval(), torch.randn(1, 3, 64, 64))


def _run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, sparse_models):
    return tokenprune.save(sparse_models["token"], tmp_path_factory.mktemp("model") / "tiny.safetensors")


def test_command_writes_one_png_per_image(saved_model, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "colour.jpg")
    Image.fromarray(rng.integers(0, 255, (80, 80), dtype=np.uint8), mode="L").save(tmp_path / "grey.png")
    code, text = _run("visualize", saved_model, tmp_path / "colour.jpg", tmp_path / "grey.png", "--out", tmp_path / "o")
    assert code == 0, text
    for stem in ("colour", "grey"):
        with Image.open(tmp_path / "o" / f"{stem}_kept.png") as picture:  # resized to the model's 64 x 64
            assert picture.size == (3 * (64 * 2 + GAP) - GAP, LABEL_HEIGHT + 64 * 2)
        assert f"{stem}_kept.png" in text


def test_command_fails_cleanly_on_bad_images(saved_model, tmp_path):
    code, text = _run("visualize", saved_model, tmp_path / "missing.png", "--out", tmp_path)
    assert code == EXIT_ERROR and "missing.png: no such image file" in text and "Traceback" not in text
    (tmp_path / "notes.png").write_text("not an image")
    code, text = _run("visualize", saved_model, tmp_path / "notes.png", "--out", tmp_path)
    assert code == EXIT_ERROR and "not an image Pillow can read" in text and "Traceback" not in text


@pytest.mark.fashion_mnist
def test_fashion_mnist_example_says_when_its_student_is_untrained(tmp_path, monkeypatch, capsys):
    script = Path(__file__).resolve().parents[1] / "examples" / "visualize_kept.py"
    out = tmp_path / "kept.png"
    argv = [str(script), "--student", str(tmp_path / "none.pt"), "--count", "2", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    assert "UNTRAINED" in capsys.readouterr().out
    with Image.open(out) as picture:
        assert picture.width > 3 * 112 and picture.height > 2 * 112
