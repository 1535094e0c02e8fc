"""Exact FLOP (multiply-add) counts of spatially sparsified ConvNeXt-T and Swin-T at 224x224, by hand, per block.

Spatial sparsification (docs/design.md §1.2) keeps the map whole: three stages before blocks 1, 2 and 3 of stage 3 pick
k = floor(rho_s * H*W) locations; from there every block runs its spatial mixing (depthwise 7x7 conv, window
attention) on the whole map, its pointwise MLP (the slow path, 8 C^2 per location) on the k kept locations and the
fast path (LayerNorm + Linear(C, C): C^2) on the others. Each stage's predictor scores every location:
Linear(C, C) then C -> C/2 -> C/4 -> 2. Norms, activations, gathers, rolls and masks count zero (fvcore convention).
"""

from __future__ import annotations

import pytest
import timm
import torch

import tokenprune
from tokenprune.measure.flops import profile_flops


def kept_locations(hw: int, depth: int, ratios=(0.7, 0.5, 0.3)) -> list[int]:
    """Locations on the slow path in each block of the chain: all before the first stage, then k_s = floor(rho_s HW)
    (spatial default rho_s = 0.7, 0.5, 0.3 at ratio 0.7: 137, 98, 58 of 196)."""
    k = [int(r * hw + 1e-6) for r in ratios]
    return [hw] + k[:2] + [k[2]] * (depth - 3)


def predictor(c: int, locations: int) -> int:
    return locations * (c * c + c * (c // 2) + (c // 2) * (c // 4) + (c // 4) * 2)


def mlp(c: int, locations: int) -> int:
    return locations * 8 * c * c  # Linear(C, 4C) + Linear(4C, C)


def fast(c: int, locations: int) -> int:
    return locations * c * c


def convnext_mixing(c: int, hw: int, window: int) -> int:
    return hw * c * 49  # depthwise 7x7: 49 multiply-adds per output element


def swin_mixing(c: int, hw: int, window: int) -> int:
    # qkv (3 C^2) and proj (C^2) per location; q k^T and attn v within windows of `window` locations
    return hw * (4 * c * c + 2 * window * c)


def dense_total(mixing, dims, depths, sizes, window: int) -> int:
    """Stem/patch embedding (4x4 conv, stride 4), stages, downsampling and the 1000-way head."""
    total = sizes[0] ** 2 * dims[0] * 3 * 4 * 4
    for s, (c, d, h) in enumerate(zip(dims, depths, sizes)):
        if s:  # ConvNeXt: 2x2 conv, stride 2; Swin: patch merging, Linear(4 C/2, C). Both 4 C_{s-1} C per location.
            total += h * h * 4 * dims[s - 1] * c
        total += d * (mixing(c, h * h, min(window, h * h)) + mlp(c, h * h))
    return total + dims[-1] * 1000


# name, constructor kwargs, image size, dims, depths, window (locations per attention window)
MODELS = {
    "convnext_tiny": ("convnext_tiny", {}, 224, (96, 192, 384, 768), (3, 3, 9, 3), 49),
    "swin_tiny": ("swin_tiny_patch4_window7_224", {}, 224, (96, 192, 384, 768), (2, 2, 6, 2), 49),
    "convnext_small_dims": ("convnext_tiny", {"depths": (1, 1, 4, 1), "dims": (8, 16, 32, 64)}, 64, None, None, 49),
    "swin_small_dims": (
        "swin_tiny_patch4_window7_224",
        {"depths": (1, 1, 4, 1), "embed_dim": 16, "num_heads": (1, 1, 2, 2), "window_size": 2, "img_size": 64},
        64,
        (16, 32, 64, 128),
        (1, 1, 4, 1),
        4,
    ),
}
SLOW = {"convnext_tiny", "swin_tiny"}  # full size at 224x224: ~15 s each on a loaded CPU


@pytest.fixture(scope="module", params=[pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in MODELS])
def reports(request):
    arch, kwargs, size, dims, depths, window = MODELS[request.param]
    dims = dims or kwargs["dims"]
    depths = depths or kwargs["depths"]
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    model = timm.create_model(arch, pretrained=False, **kwargs).eval()
    dense = profile_flops(model, x)
    sparse = tokenprune.sparsify(model, 0.7, example_inputs=x)
    mixing = convnext_mixing if arch.startswith("convnext") else swin_mixing
    sizes = tuple(size // 4 // 2**s for s in range(4))
    geometry = (mixing, dims, depths, sizes, window)
    return geometry, dense, profile_flops(sparse, x), tokenprune.config_of(sparse)


def test_dense_exact(reports):
    (mixing, dims, depths, sizes, window), dense, _, config = reports
    c, hw = dims[2], sizes[2] ** 2
    assert dense.uncounted_ops == {}
    assert dense.total_macs == dense_total(mixing, dims, depths, sizes, window)
    assert [dense.by_module[b] for b in config.chain] == [mixing(c, hw, window) + mlp(c, hw)] * depths[2]


def test_sparse_exact_per_block(reports):
    (mixing, dims, depths, sizes, window), dense, sparse, config = reports
    c, hw = dims[2], sizes[2] ** 2
    assert config.kind == "spatial" and config.locations == [1, 2, 3] and len(config.chain) == depths[2]
    assert sparse.uncounted_ops == {}
    expected = [mixing(c, hw, window) + mlp(c, k) + fast(c, hw - k) for k in kept_locations(hw, depths[2])]
    assert list(sparse.blocks.values()) == expected
    assert list(sparse.predictors.values()) == [predictor(c, hw)] * 3  # each stage scores the whole map
    # nothing outside the chain changes
    saved = sum(dense.by_module[b] for b in config.chain) - sum(expected)
    assert sparse.total_macs == dense.total_macs - saved + 3 * predictor(c, hw)
