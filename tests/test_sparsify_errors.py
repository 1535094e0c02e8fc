"""Bad input gets a clear tokenprune error naming the model, the reason and what to do."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

import tokenprune
from tokenprune import ConfigError, TokenPruneError, UnsupportedModelError


@pytest.fixture(scope="module")
def deit():
    return timm.create_model("deit_tiny_patch16_224").eval()


@pytest.mark.parametrize("ratio", [0, -0.5, 1.01, math.nan, "a lot"])
def test_bad_ratio(deit, ratio):
    with pytest.raises(ConfigError, match="ratio"):
        tokenprune.sparsify(deit, ratio)


@pytest.mark.parametrize("locations", [[0, 3], [3, 12], [6, 3], [3, 3], []])
def test_bad_locations(deit, locations):
    with pytest.raises(ConfigError, match="deit_tiny_patch16_224.*locations"):
        tokenprune.sparsify(deit, 0.7, locations=locations)


@pytest.mark.parametrize("keep_ratios", [[0.7, 0.5], [0.5, 0.7, 0.3], [0.7, 0.0, 0.0]])
def test_bad_keep_ratios(deit, keep_ratios):
    with pytest.raises(ConfigError):
        tokenprune.sparsify(deit, 0.7, keep_ratios=keep_ratios)


class _DataDependent(nn.Module):
    """Token blocks, but Python control flow on tensor values: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.blocks = nn.Sequential(*[timm.models.vision_transformer.Block(32, 2) for _ in range(4)])

    def forward(self, x):
        x = self.blocks(self.embed(x))
        if x.mean() > 0:
            x = x * 2
        return x.mean(1)


def test_untraceable_model():
    with pytest.raises(UnsupportedModelError, match="_DataDependent.*cannot trace") as info:
        tokenprune.sparsify(_DataDependent(), 0.7, example_inputs=torch.randn(2, 10, 8))
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no torch.fx traceback chained


@timm.layers.register_notrace_module
class _OpaqueStage(nn.Module):
    """Token blocks inside a module timm's registry marks untraceable: the trace keeps the stage as one call."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[timm.models.vision_transformer.Block(32, 2) for _ in range(4)])

    def forward(self, x):
        return self.blocks(x)


def test_blocks_inside_a_leaf_of_the_trace_are_refused_naming_it():
    model = nn.Sequential(nn.Linear(8, 32), _OpaqueStage()).eval()
    with pytest.raises(UnsupportedModelError, match=r"run inside 1 \(_OpaqueStage\), which the trace keeps as one"):
        tokenprune.sparsify(model, 0.7, example_inputs=torch.randn(2, 10, 8))


def test_cnn_without_token_chain_is_refused_until_supported():
    model = timm.create_model("resnet18").eval()
    with pytest.raises(UnsupportedModelError, match="resnet18"):
        tokenprune.sparsify(model, 0.7)


def test_no_chain_at_all():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    with pytest.raises(UnsupportedModelError, match="no chain of blocks"):
        tokenprune.sparsify(model, 0.7, example_inputs=torch.randn(2, 3, 8, 8))


def test_token_mixing_inside_the_mlp_is_refused_naming_the_node():
    """gMLP's spatial gating unit mixes tokens between its MLP's Linears: refused as tokens (naming the node), and
    spatially (no per-location MLP after it). MLP-Mixer, whose token mixing is a branch of its own, is sparsified
    spatially (tests/test_zoo.py)."""
    model = timm.create_model("gmlp_ti16_224", img_size=64).eval()
    with pytest.raises(UnsupportedModelError, match=r"gmlp_ti16_224 block blocks\.8: .*mixes the token axis"):
        tokenprune.sparsify(model, 0.7)


def test_already_sparsified(deit):
    sparse = tokenprune.sparsify(deit, 0.7)
    with pytest.raises(UnsupportedModelError, match="already sparsified"):
        tokenprune.sparsify(sparse, 0.7)


def test_not_a_sparsified_model(deit):
    with pytest.raises(TokenPruneError, match="not a sparsified model"):
        tokenprune.sparsity_state(deit)
    with pytest.raises(TokenPruneError, match="not a sparsified model"):
        tokenprune.set_execution(deit, "masked")


def test_state_before_any_forward(deit):
    with pytest.raises(TokenPruneError, match="has not run a forward pass"):
        tokenprune.sparsity_state(tokenprune.sparsify(deit, 0.7))


def test_bad_execution(deit):
    with pytest.raises(ConfigError, match="execution"):
        tokenprune.set_execution(tokenprune.sparsify(deit, 0.7), "sometimes")


def test_errors_share_one_base():
    for cls in (ConfigError, UnsupportedModelError, tokenprune.CheckpointError, tokenprune.DataError):
        assert issubclass(cls, TokenPruneError)
