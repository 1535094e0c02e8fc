"""A representative slice of the zoo (`examples/zoo_harness.py`), small configurations, within the CI budget.

Each model is checked independently of the self-check inside `sparsify`: masked == pruned, keep-all == original
(with the model's own layer scales and with them at 1), a gradient to every predictor, fewer fvcore multiply-adds
than dense. The models the pass must refuse are refused
with a reason, never a crash, a wrong model or a costlier one. `python examples/zoo_coverage.py` runs the full zoo.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

import pytest


def _harness():
    """The zoo harness lives beside the zoo script, outside the package; load it from there by path."""
    path = Path(__file__).resolve().parent.parent / "examples" / "zoo_harness.py"
    spec = importlib.util.spec_from_file_location("zoo_harness", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # reason: dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


harness = _harness()
ZooEntry, check_model = harness.ZooEntry, harness.check_model


def _e(name: str, library: str = "timm", **kwargs) -> ZooEntry:
    return ZooEntry(name, name, library, tuple(sorted(kwargs.items())))


WORKS = [
    _e("vit_tiny_patch16_224", img_size=64, depth=4),
    _e("deit_tiny_distilled_patch16_224", img_size=64, depth=4),  # two prefix tokens
    _e("vit_small_patch14_reg4_dinov2", img_size=56, depth=4),  # registers
    _e("vit_base_patch16_siglip_224", img_size=64, depth=4, embed_dim=96, num_heads=3),  # attention pooling head
    _e("vit_small_patch16_rope_224", img_size=64, depth=4),  # rotary embeddings
    _e("eva02_tiny_patch14_224", img_size=56, depth=4),  # rotary embeddings, SwiGLU
    _e("qwen3_vit_88m", img_size=64, depth=4),  # rotary embeddings without prefix tokens: an empty prefix split off
    _e("beit_base_patch16_224", img_size=64, depth=4, embed_dim=96, num_heads=3),  # relative position bias (fused)
    _e("vit_relpos_small_patch16_224", img_size=64, depth=4),  # relative position bias (explicit softmax)
    _e("cait_xxs24_224", img_size=64, depth=4),  # class attention in the head, talking heads
    _e("vit_medium_patch16_gap_256", img_size=64, depth=4),  # average pooling, no class token
    _e("vit_pwee_patch16_reg1_gap_256", img_size=64, depth=4),  # parallel blocks: torch.split of a fused projection
    _e("deit_tiny_patch16_224", img_size=64, depth=4, attn_drop_rate=0.1),  # attention dropout
    _e("vit_b_16", "torchvision", image_size=64),  # nn.MultiheadAttention
    _e("convnext_atto"),  # spatial
    _e("swin_tiny_patch4_window7_224", img_size=112, depths=(1, 1, 4, 1)),  # spatial, window attention
    _e("repvit_m0_9"),  # spatial, two per-location branches: the MLP is chosen
    _e("maxvit_rmlp_pico_rw_256", img_size=128),  # spatial, two MLPs per unit (block and grid attention), MBConv dense
    _e("gcvit_xxtiny"),  # spatial, blocks also take the stage's global query (a run-time input)
    # spatial; its attention (a later stage) reads a bias cache in eval only: kept as a call, traced in neither mode
    _e("efficientformer_l1", depths=(1, 1, 4, 2), embed_dims=(16, 32, 64, 96)),
    # spatial; its block branches on the map's size (one window, or a padded partition: 7 x 7 in windows of 5), traced
    # as the example takes it and guarded; its attention reads a bias cache in eval only (kept as a call)
    _e(
        "tiny_vit_5m_224",
        pretrained_cfg_overlay={"input_size": (3, 112, 112)},
        embed_dims=(16, 32, 64, 96),
        depths=(1, 1, 4, 1),
        num_heads=(1, 2, 4, 4),
        window_sizes=(7, 7, 5, 7),
    ),
    _e("crossvit_tiny_240"),  # two token streams; the head that combines them reads a refilled token set
    # token chains that are the image's grid, refused by the token rules, sparsified spatially over the grid:
    _e("xcit_nano_12_p16_224", img_size=64, depth=4),  # cross-covariance attention normalises over the tokens
    # blocks take their grid's (H, W) as a tuple; conditional position encoding and sub-sampled attention on the grid
    _e("twins_svt_small", img_size=128, depths=(1, 1, 4, 1), embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8)),
    _e("mixer_s16_224", img_size=64),  # token-mixing MLP (runs on the whole grid)
    _e("resmlp_12_224", img_size=64),  # token-mixing Linear, affine norms
    _e("convit_tiny", img_size=112),  # gated positional attention; the class token joins after the chain
]

REFUSED = {
    "regnetx_002": _e("regnetx_002"),  # fast path would cost as much as the slow path
    "resnet18": _e("resnet18"),  # no per-location tail
    # a conv over the token grid inside the block (tokens) and inside its MLP: spatially, only attention's output
    # projection is a slow path, as costly as its fast path
    "pvt_v2_b0": _e("pvt_v2_b0"),
    "gmlp_ti16_224": _e("gmlp_ti16_224"),  # token mixing inside the MLP: refused as tokens and spatially
    "levit_128s": _e("levit_128s"),  # its attention, kept as a call (eval reads a bias cache), is opaque in the chain
}


@pytest.mark.slow  # one sparsify + independent checks per family: the full run covers it, the inner loop skips it
@pytest.mark.parametrize("entry", WORKS, ids=lambda e: e.name)
def test_works(entry):
    result = check_model(entry)
    assert result.outcome == "works", result.reason
    assert result.masked_vs_pruned <= 1 and result.keep_all <= 1 and result.macs_ratio < 1


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_with_a_reason(name):
    result = check_model(REFUSED[name], flops=False)
    assert result.outcome == "refused", (result.outcome, result.reason)
    assert name in result.reason and len(result.reason) > 60


def test_the_harness_sees_through_small_layer_scales(monkeypatch):
    """Self-check off, attention masks removed from CaiT (layer scale 1e-5): the harness reports "wrong" — only its
    pass with the layer scales at 1 can see it (with the model's own scales the outputs agree within tolerance)."""
    import importlib

    import torch.fx as fx

    from tokenprune.nn import masked, tokenops

    sparsify_module = importlib.import_module("tokenprune.sparsify")  # reason: the package exports the function
    real = sparsify_module.apply_plan

    def unmasked(target, plan):
        applied = real(target, plan)
        plain = {
            masked.masked_softmax: lambda s, policy, dim=-1: s.softmax(dim),
            tokenops.zero_dropped: lambda x, p, d: x,
        }
        for gm in [m for m in applied.model.modules() if isinstance(m, fx.GraphModule)]:
            for node in gm.graph.nodes:
                node.target = plain.get(node.target, node.target) if node.op == "call_function" else node.target
            gm.recompile()
        return applied

    monkeypatch.setattr(sparsify_module, "apply_plan", unmasked)
    monkeypatch.setattr(sparsify_module, "self_check", lambda *args, **kwargs: None)
    result = check_model(_e("cait_xxs24_224", img_size=64, depth=4), flops=False)
    assert result.outcome == "wrong" and result.masked_vs_pruned > 1, (result.outcome, result.reason)
    monkeypatch.setattr(harness, "unit_layer_scales", lambda *models: contextlib.nullcontext())
    assert check_model(_e("cait_xxs24_224", img_size=64, depth=4), flops=False).outcome == "works"


def test_the_harness_sees_through_zero_weights(monkeypatch):
    """Self-check off, masked execution's zeroing before ConvNeXt V2's GRN removed: the harness reports "wrong", because
    it fills GRN's zero-initialised weights first (an identity at init, GRN would hide its statistics otherwise)."""
    import importlib

    import tokenprune.fx.spatial as spatial_pass

    sparsify_module = importlib.import_module("tokenprune.sparsify")  # reason: the package exports the function
    monkeypatch.setattr(spatial_pass, "mask_locations", lambda x, mask, keep, spatial: x)
    monkeypatch.setattr(sparsify_module, "self_check", lambda *args, **kwargs: None)
    entry = _e("convnextv2_atto", pretrained_cfg_overlay={"input_size": (3, 64, 64)})
    result = check_model(entry, flops=False)
    assert result.outcome == "wrong" and result.masked_vs_pruned > 1, (result.outcome, result.reason)
    monkeypatch.setattr(harness, "_randomize_zero_weights", lambda model: None)
    assert check_model(entry, flops=False).outcome == "works"
