"""Input geometry lives in one place (`tokenprune.inputs`); the tracer, the CLI and the fine-tuning harness use it."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

from tokenprune import inputs, models
from tokenprune.errors import ConfigError, UnsupportedModelError
from tokenprune.fx import tracing
from tokenprune.train import api
from tokenprune.train.recipe import Recipe


@pytest.mark.parametrize(
    ("text", "size"),
    [("224", (3, 224, 224)), ("224,160", (3, 224, 160)), ("1,28,28", (1, 28, 28)), ("1x28x28", (1, 28, 28)),
     (" 3, 64 ,64", (3, 64, 64)), (None, None)],
)  # fmt: skip
def test_parse_input_size(text, size):
    assert inputs.parse_input_size(text) == size


@pytest.mark.parametrize("text", ["", "0", "a,b", "1,2,3,4", "-3", "3.5"])
def test_parse_input_size_refuses_with_usage(text):
    with pytest.raises(ConfigError, match="give H, H,W or C,H,W"):
        inputs.parse_input_size(text)


def _own() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())


@pytest.mark.parametrize(
    ("make", "size"),
    [
        (lambda: timm.create_model("test_vit", img_size=48, in_chans=1), (1, 48, 48)),  # built size, not pretrained
        (lambda: timm.create_model("test_convnext", in_chans=1), (1, 160, 160)),  # cfg size, the stem's channels
        # a patch embedding after a convolutional stem records the stem's output size (112), not the image's
        (lambda: timm.create_model("visformer_tiny", depth=(1, 1, 1)), (3, 224, 224)),
        (lambda: timm.create_model("vit_tiny_r_s16_p8_224", img_size=96, depth=2), (3, 96, 96)),  # hybrid embed
        # a space-to-depth stem: the first convolution takes 16 x 2 channels; timm's in_chans says what the image has
        (lambda: timm.create_model("tresnet_m", in_chans=2), (2, 224, 224)),
        (lambda: torchvision.models.VisionTransformer(32, 16, 2, 2, 8, 16), (3, 32, 32)),
        (_own, (2, 224, 224)),
        (lambda: nn.Linear(3, 3), None),
    ],
)
def test_input_size_of_models(make, size):
    assert inputs.input_size(make()) == size


def test_example_input_follows_the_model_or_the_caller():
    model = timm.create_model("test_vit", img_size=48)
    assert inputs.example_input(model, batch=3).shape == (3, 3, 48, 48)
    given = torch.zeros(1, 3, 8, 8)
    assert inputs.example_input(model, given) is given
    with pytest.raises(UnsupportedModelError, match="example_inputs"):
        inputs.example_input(nn.Linear(3, 3))


def test_the_other_places_use_it():
    sparsify_module = importlib.import_module("tokenprune.sparsify")  # the package rebinds the name to the function
    flops_module = importlib.import_module("tokenprune.measure.flops")
    assert sparsify_module.example_input is inputs.example_input
    assert not hasattr(tracing, "example_input")  # one place: the tracer no longer re-exports it
    assert "from ..inputs import example_input" in Path(flops_module.__file__).read_text()
    assert models.geometry_kwargs is inputs.geometry_kwargs
    recipe = Recipe()
    assert recipe.data.img_size is None and "img_size" not in recipe.model.kwargs
    model = timm.create_model("test_convnext", in_chans=1)
    assert api._input_geometry(recipe, model) == (160, 1)  # from inputs.input_size, not timm's data config (3)


def test_a_guess_the_model_does_not_take_is_named_in_the_refusal():
    """A stem that is not the image's first convolution (space-to-depth, as TResNet's) misleads the guess: the
    refusal shows the input tokenprune guessed and how to give the right one, rather than only "please report it"."""
    import tokenprune

    model = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(12, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert inputs.input_size(model) == (12, 224, 224)
    with pytest.raises(UnsupportedModelError, match=r"fails on an input tokenprune guessed, \[2, 12, 224, 224\].*"
                       r"example_inputs="):  # fmt: skip
        tokenprune.sparsify(model)
    with pytest.raises(UnsupportedModelError, match=r"fails on the example input given, \[1, 5, 32, 32\]") as given:
        tokenprune.sparsify(model, example_inputs=torch.randn(1, 5, 32, 32))
    assert "please report" not in str(given.value)  # the user's input, not a tokenprune bug
    with pytest.raises(UnsupportedModelError, match="no chain of blocks") as given:
        tokenprune.sparsify(model, example_inputs=torch.randn(1, 3, 32, 32))
    assert "guessed" not in str(given.value)


def test_a_model_built_at_another_size_is_analysed_at_it():
    """timm's MaxViT family has no patch embedding to record the size it was built for; the model's own `img_size`
    does (its pretrained_cfg still says 256, and the model fails there: windows no longer divide the map)."""
    model = timm.create_model("maxvit_rmlp_pico_rw_256", img_size=128).eval()
    assert model.pretrained_cfg["input_size"] == (3, 256, 256)
    assert inputs.input_size(model) == (3, 128, 128)
