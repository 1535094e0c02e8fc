"""Keep counts follow the real token count (no hard-coded 14x14 grid), and options are honoured."""

from __future__ import annotations

import math
import warnings

import pytest
import timm
import torch

import tokenprune


def _entering(model, names, x):
    seen = {}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].shape[1]))
        for n in names
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return [seen[n] for n in names]


def _expected(config, patches):
    return [config.prefix_tokens + max(1, math.floor(r * patches + 1e-6)) for r in config.keep_ratios]


@pytest.mark.slow  # over 1.5 s on 2 cores: the full run covers it, the inner loop (-m 'not slow') skips it
def test_384_pixel_model():
    dense = timm.create_model("deit_tiny_patch16_224", img_size=384).eval()
    sparse = tokenprune.sparsify(dense, 0.7).eval()
    config = tokenprune.config_of(sparse)
    assert config.input_size == (3, 384, 384)
    x = torch.randn(1, 3, 384, 384)
    names = [config.chain[loc] for loc in config.locations]
    assert _entering(sparse, names, x) == _expected(config, 24 * 24)


@pytest.mark.slow  # over 2 s on 2 cores: the full run covers it, the inner loop (-m 'not slow') skips it
def test_dynamic_img_size_follows_each_input():
    dense = timm.create_model("deit_tiny_patch16_224", dynamic_img_size=True).eval()
    sparse = tokenprune.sparsify(dense, 0.7).eval()
    config = tokenprune.config_of(sparse)
    names = [config.chain[loc] for loc in config.locations]
    for side in (224, 320):
        x = torch.randn(2, 3, side, side)
        assert _entering(sparse, names, x) == _expected(config, (side // 16) ** 2)
        # Everything kept: same outputs as the dense model at this size too.
    full = sparse  # every stage keeping everything: sparsify refuses that (costlier than dense), so set it after
    for sel in tokenprune.selectors(full):
        sel.keep_ratio = 1.0
    x = torch.randn(2, 3, 320, 320)
    with torch.no_grad():
        torch.testing.assert_close(full(x), dense(x), atol=1e-5, rtol=1e-5)


def test_custom_locations_and_keep_ratios():
    dense = timm.create_model("deit_tiny_patch16_224").eval()
    sparse = tokenprune.sparsify(dense, locations=[2, 8], keep_ratios=[0.5, 0.25]).eval()
    config = tokenprune.config_of(sparse)
    assert config.locations == [2, 8] and config.keep_ratios == [0.5, 0.25]
    assert _entering(sparse, ["blocks.2", "blocks.8"], torch.randn(1, 3, 224, 224)) == [1 + 98, 1 + 49]


def test_register_tokens_are_prefix_tokens():
    dense = timm.create_model("vit_small_patch16_224", depth=8, reg_tokens=4, no_embed_class=True).eval()
    sparse = tokenprune.sparsify(dense, 0.7).eval()
    assert tokenprune.config_of(sparse).prefix_tokens == dense.num_prefix_tokens == 5
    assert tokenprune.config_of(sparse).locations == [2, 4, 6]


def test_tiny_keep_ratio_keeps_one_token_and_warns():
    dense = timm.create_model("deit_tiny_patch16_224", img_size=64).eval()  # 16 patch tokens
    with pytest.warns(UserWarning, match="keeps 1 instead"):
        sparse = tokenprune.sparsify(dense, 0.1).eval()
    config = tokenprune.config_of(sparse)
    names = [config.chain[loc] for loc in config.locations]
    assert _entering(sparse, names, torch.randn(2, 3, 64, 64)) == [2, 2, 2]


def test_inplace_shares_parameters():
    dense = timm.create_model("deit_tiny_patch16_224").eval()
    sparse = tokenprune.sparsify(dense, 0.7, inplace=True)
    assert dense.patch_embed.proj.weight is sparse.patch_embed.proj.weight


def test_training_mode_is_kept():
    dense = timm.create_model("deit_tiny_patch16_224").train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparse = tokenprune.sparsify(dense, 0.7)
    assert sparse.training and dense.training


@pytest.mark.slow  # over 2 s on 2 cores: the full run covers it, the inner loop (-m 'not slow') skips it
def test_drop_path_survives_the_rewrite():
    """Stochastic depth must stay a call: tracing through it would freeze it in eval behaviour for fine-tuning."""
    dense = timm.create_model("deit_tiny_patch16_224", drop_path_rate=0.2, img_size=64)  # 16 patches: the same blocks
    sparse = tokenprune.sparsify(dense, 0.7)
    rewritten = sparse.blocks[5]
    calls = {n.target for n in rewritten.graph.nodes if n.op == "call_module"}
    assert {"drop_path1", "drop_path2"} <= calls
    assert rewritten.drop_path1 is not dense.blocks[5].drop_path1 and rewritten.drop_path1.drop_prob > 0
