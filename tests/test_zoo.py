"""A representative slice of the zoo (`tokenprune.coverage`), small configurations, within the CI budget.

Each model is checked independently of the self-check inside `sparsify`: masked == pruned, keep-all == original,
a gradient to every predictor, fewer fvcore multiply-adds than dense. The models the pass must refuse are refused
with a reason, never a crash, a wrong model or a costlier one. `python examples/zoo_coverage.py` runs the full zoo.
"""

from __future__ import annotations

import pytest

from tokenprune.coverage import ZooEntry, check_model


def _e(name: str, library: str = "timm", **kwargs) -> ZooEntry:
    return ZooEntry(name, name, library, tuple(sorted(kwargs.items())))


WORKS = [
    _e("vit_tiny_patch16_224", img_size=64, depth=4),
    _e("deit_tiny_distilled_patch16_224", img_size=64, depth=4),  # two prefix tokens
    _e("vit_small_patch14_reg4_dinov2", img_size=56, depth=4),  # registers
    _e("vit_base_patch16_siglip_224", img_size=64, depth=4, embed_dim=96, num_heads=3),  # attention pooling head
    _e("vit_small_patch16_rope_224", img_size=64, depth=4),  # rotary embeddings
    _e("eva02_tiny_patch14_224", img_size=56, depth=4),  # rotary embeddings, SwiGLU
    _e("beit_base_patch16_224", img_size=64, depth=4, embed_dim=96, num_heads=3),  # relative position bias (fused)
    _e("vit_relpos_small_patch16_224", img_size=64, depth=4),  # relative position bias (explicit softmax)
    _e("cait_xxs24_224", img_size=64, depth=4),  # class attention in the head, talking heads
    _e("vit_medium_patch16_gap_256", img_size=64, depth=4),  # average pooling, no class token
    _e("deit_tiny_patch16_224", img_size=64, depth=4, attn_drop_rate=0.1),  # attention dropout
    _e("vit_b_16", "torchvision", image_size=64),  # nn.MultiheadAttention
    _e("convnext_atto"),  # spatial
    _e("swin_tiny_patch4_window7_224", img_size=112, depths=(1, 1, 4, 1)),  # spatial, window attention
    _e("repvit_m0_9"),  # spatial, two per-location branches: the MLP is chosen
    _e("crossvit_tiny_240"),  # two token streams; the head that combines them reads a refilled token set
]

REFUSED = {
    "regnetx_002": _e("regnetx_002"),  # fast path would cost as much as the slow path
    "resnet18": _e("resnet18"),  # no per-location tail
    "pvt_v2_b0": _e("pvt_v2_b0"),  # a conv over the token grid inside the block
    "mixer_s16_224": _e("mixer_s16_224"),  # token-mixing MLP
    "xcit_nano_12_p16_224": _e("xcit_nano_12_p16_224"),  # normalisation over tokens (cross-covariance attention)
}


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
