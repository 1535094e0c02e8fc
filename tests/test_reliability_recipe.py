"""Every recipe value is checked by the schema: out-of-range, mistyped and non-finite values are a `ConfigError`
naming the key and what it allows; YAML aliases are refused before they can expand (#21 item 1)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenprune.errors import ConfigError
from tokenprune.train.recipe import _SECTIONS, Recipe, describe_recipe, load_recipe
from tokenprune.train.schema import MAX_RECIPE_BYTES, rule_of

FIELDS = {
    f"{section}.{f.name}": (str(f.type), rule_of(f))
    for section, cls in _SECTIONS.items()
    for f in dataclasses.fields(cls)
}
NUMERIC = {k: v for k, v in FIELDS.items() if v[0].split(" | ")[0] in ("int", "float")}
BOUNDED = sorted(k for k, (_, r) in NUMERIC.items() if r.ge is not None or r.gt is not None)


def _value(recipe: Recipe, key: str):
    section, name = key.split(".")
    return getattr(getattr(recipe, section), name)


def _below(key: str) -> float:
    rule = NUMERIC[key][1]
    low = rule.ge if rule.ge is not None else rule.gt
    return low - 1 if rule.ge is not None else low


@pytest.mark.parametrize("key", BOUNDED)
def test_every_lower_bound_is_enforced_naming_the_key(key):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'") + ".*(>=|>) "):
        load_recipe(None, [f"{key}={_below(key)}"])


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=-1e-3",  # the issue's runs that trained backwards
        "optim.clip_grad=-1",
        "optim.weight_decay=-0.05",
        "optim.epochs=0",
        "optim.epochs=-1",
        "optim.batch_size=0",
        "run.device=tpu",
        "optim.lr=nan",
        "optim.lr=.inf",
        "optim.lr=true",
        "optim.betas=[0.9]",
        "optim.betas=[0.9, 1.0]",
        "run.log_every=0",
        "run.seed=-1",
        "sparsify.keep_ratios=[0.7, 0]",
        "data.check_images=maybe",
        "run.resume=[1]",
        "data.scene_items=[4, 2]",
    ],
)
def test_issue_values_are_refused(override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe(None, [override])


def test_the_defaults_satisfy_their_own_schema():
    assert Recipe.from_dict(Recipe().to_dict()) == Recipe()  # every default passes its own rule
    assert all(row["doc"] for row in describe_recipe()), "every key is documented"
    assert {row["key"] for row in describe_recipe()} == {"task", *FIELDS}


_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.one_of(st.integers(-5, 5), st.floats(-2, 2), st.text(max_size=3)), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(sorted(FIELDS)), value=_JUNK)
def test_any_value_is_either_refused_naming_the_key_or_within_the_schema(key, value):
    section, name = key.split(".")
    try:
        recipe = Recipe.from_dict({section: {name: value}})
    except ConfigError as e:
        assert key in str(e) or section in str(e)
        return
    got = _value(recipe, key)
    hint, rule = FIELDS[key]
    items = got if isinstance(got, list) else [got]
    for item in items:
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            assert math.isfinite(item)
            assert rule.ge is None or item >= rule.ge
            assert rule.gt is None or item > rule.gt
            assert rule.le is None or item <= rule.le
            assert rule.lt is None or item < rule.lt
    if got is None:
        assert "None" in hint or hint == "Any"


def test_yaml_aliases_are_refused_before_they_expand(tmp_path):
    # The issue's 656-byte recipe: nested anchors in model.kwargs that expand to gigabytes when merged.
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 12)]
    path = tmp_path / "bomb.yaml"
    path.write_text("model:\n  kwargs:\n" + "".join(f"    {line}\n" for line in lines))
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"alias \*a0 .*line"):
        load_recipe(path)
    with pytest.raises(ConfigError, match="alias"):
        load_recipe(None, ["model.kwargs={a: &x [1], b: *x}"])
    assert time.perf_counter() - start < 5


def test_a_huge_recipe_is_refused_unread(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("# " + "x" * MAX_RECIPE_BYTES + "\n")
    with pytest.raises(ConfigError, match="larger than"):
        load_recipe(path)


def test_string_keys_take_numbers_and_paths():
    recipe = load_recipe(None, ["data.train_split=2017", "run.resume=/runs/a:b/last.pt", "run.device=cuda:1"])
    assert (recipe.data.train_split, recipe.run.resume, recipe.run.device) == ("2017", "/runs/a:b/last.pt", "cuda:1")


@settings(max_examples=300, deadline=None)
@given(
    key=st.one_of(st.sampled_from(sorted(FIELDS) + ["task", "model.kwargs.depth", "data.augment.hflip"]), st.text()),
    raw=st.text(max_size=30),
)
def test_any_override_string_is_applied_or_refused_as_a_config_error(key, raw):
    with contextlib.suppress(ConfigError):  # any other exception fails the test
        load_recipe(None, [f"{key}={raw}"])
