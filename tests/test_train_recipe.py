"""Recipes: schema, overrides, unknown keys, the shipped YAML files, and the saved resolved copy."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tokenprune.errors import ConfigError
from tokenprune.train.recipe import Recipe, apply_overrides, load_recipe, save_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.yaml")))
def test_shipped_recipes_load(name):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.optim.lr > 0


def test_paper_settings_in_recipes():
    deit = load_recipe(RECIPES / "deit_small_imagenet.yaml")
    assert (deit.optim.epochs, deit.optim.lr, deit.optim.backbone_lr_scale) == (30, 1e-3, 0.01)
    assert (deit.optim.warmup_epochs, deit.optim.global_batch_size, deit.loss.ratio) == (5, 1024, 2.0)
    convnext = load_recipe(RECIPES / "convnext_tiny_imagenet.yaml")
    assert (convnext.optim.epochs, convnext.optim.lr, convnext.optim.backbone_lr_scale) == (120, 4e-3, 0.2)
    assert (convnext.loss.kind, convnext.loss.ratio, convnext.loss.distill_type) == ("spatial", 10.0, "mse")


def test_overrides_dotted_and_typed():
    recipe = load_recipe(None, ["optim.lr=5e-4", "sparsify.locations=[2,4]", "model.kwargs.depth=6", "run.amp=false"])
    assert recipe.optim.lr == 5e-4 and isinstance(recipe.optim.lr, float)
    assert recipe.sparsify.locations == [2, 4]
    assert recipe.model.kwargs == {"depth": 6}
    assert recipe.run.amp is False


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.backbone_lr_sacle=0.1", "optim.backbone_lr_sacle"),
        ("optimizer.lr=1", "optimizer.lr"),
        ("optim.lr.x=1", "optim.lr.x"),
    ],
)
def test_unknown_override_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe(None, [override])


def test_unknown_key_in_file_names_it(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim:\n  lr: 1.0e-3\n  warmup: 3\n")
    with pytest.raises(ConfigError, match=r"optim\.warmup"):
        load_recipe(path)


def test_bad_values_and_files(tmp_path):
    with pytest.raises(ConfigError, match="optim.lr"):
        load_recipe(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="key=value"):
        load_recipe(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="cannot read"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)


def test_save_roundtrip(tmp_path):
    recipe = apply_overrides(Recipe(), ["optim.epochs=3", "data.augment={hflip: 0.5}"])
    save_recipe(recipe, tmp_path / "out" / "recipe.yaml")
    again = load_recipe(tmp_path / "out" / "recipe.yaml")
    assert again == recipe
    assert yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())["optim"]["epochs"] == 3


def test_save_recipe_into_an_unusable_folder_names_it(tmp_path):
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(ConfigError, match=r"cannot write the recipe to \S+file/recipe\.yaml"):
        save_recipe(Recipe(), tmp_path / "file" / "recipe.yaml")
