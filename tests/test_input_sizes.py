"""Any input size the model accepts (issue #20 item 5), non-square maps, and the chain rule on shallow stages.

A sparsified model is built on one example input; it must be exact at every other size the original model takes:
keep-all ≡ the original, and masked ≡ pruned, at a second size and at a non-square one.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import tokenprune
from tokenprune import UnsupportedModelError
from tokenprune.fx.selfcheck import max_difference
from tokenprune.measure.ablation import fixed_keep


class _GridBlock(nn.Module):
    """A token block told the grid size as numbers, PVT/Twins-style; its output depends on them (H * W scales the MLP),
    so a grid size frozen to the example's is a wrong model at any other size."""

    def __init__(self, dim: int, as_tuple: bool) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj, self.fc = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.as_tuple = as_tuple

    def _forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        return x + self.fc(self.norm2(x)) * (64.0 / (height * width)) ** 0.5


class _IntsBlock(_GridBlock):
    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:  # noqa: N803 - as PVT/Twins name them
        return self._forward(x, H, W)


class _TupleBlock(_GridBlock):
    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        height, width = size
        return self._forward(x, height, width)


class _GridNet(nn.Module):
    def __init__(self, as_tuple: bool, dim: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 8, 8)
        block = _TupleBlock if as_tuple else _IntsBlock
        self.blocks = nn.ModuleList(block(dim, as_tuple) for _ in range(depth))
        self.head = nn.Linear(dim, 5)
        self.as_tuple = as_tuple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        _, _, height, width = x.shape
        x = x.flatten(2).transpose(1, 2)
        for blk in self.blocks:
            x = blk(x, (height, width)) if self.as_tuple else blk(x, height, width)
        return self.head(x.mean(1))


def _run(model: nn.Module, x: torch.Tensor, execution: str | None = None) -> torch.Tensor:
    if execution is not None:
        tokenprune.set_execution(model, execution)
    with torch.no_grad():
        return model(x)


def _keeping_all(sparse: nn.Module) -> nn.Module:
    """A copy of `sparse` whose stages keep every token (sparsify itself refuses keep ratios of 1: costlier than
    dense)."""
    keep_all = copy.deepcopy(sparse)
    for sel in tokenprune.selectors(keep_all):
        sel.keep_ratio = 1.0
    return keep_all


def _assert_exact_at(dense: nn.Module, sparse: nn.Module, keep_all: nn.Module, size: tuple[int, int]) -> None:
    x = torch.randn(2, 3, *size)
    pruned, masked = _run(sparse, x, "pruned"), _run(sparse, x, "masked")
    d = max_difference(masked, pruned)
    assert d is not None and d <= 1, f"masked vs pruned at {size}: {d}x tolerance"
    d = max_difference(_run(keep_all, x), _run(dense, x))
    assert d is not None and d <= 1, f"keep-all vs original at {size}: {d}x tolerance"


@pytest.mark.parametrize("as_tuple", [False, True], ids=["H-W-ints", "size-tuple"])
def test_block_taking_grid_size_is_exact_at_other_sizes(as_tuple):
    dense = _GridNet(as_tuple).eval()
    example = torch.randn(2, 3, 64, 64)
    sparse = tokenprune.sparsify(dense, 0.5, example_inputs=example).eval()
    keep_all = _keeping_all(sparse)
    for size in [(64, 64), (96, 96), (64, 128)]:
        _assert_exact_at(dense, sparse, keep_all, size)


def test_pvt_v2_takes_its_grid_size_and_is_refused_for_its_grid_convolution():
    """PVT-v2's blocks take (H, W) as a tuple; its MLP reshapes the tokens into that grid for a depthwise conv, which
    pruned tokens do not fill: refused, naming that reshape (not an analysis crash, not a model fixed to 64 px); and
    spatially, since the conv sits inside its MLP."""
    dense = timm.create_model(
        "pvt_v2_b0", depths=(1, 1, 3, 1), embed_dims=(16, 32, 64, 64), num_heads=(1, 1, 2, 2), num_classes=10
    ).eval()
    refused = r"pvt_v2_b0 block stages\.2\.blocks\.1: .*reshapes the token axis .* Sparsified spatially, it is refused"
    with pytest.raises(UnsupportedModelError, match=refused):
        tokenprune.sparsify(dense, 0.7, example_inputs=torch.randn(2, 3, 64, 64))


def test_vit_with_dynamic_size_is_exact_at_other_sizes():
    dense = timm.create_model(
        "vit_tiny_patch16_224", depth=4, embed_dim=64, num_heads=2, img_size=64, num_classes=10, dynamic_img_size=True
    ).eval()
    sparse = tokenprune.sparsify(dense, 0.5).eval()
    keep_all = _keeping_all(sparse)
    for size in [(96, 96), (64, 128)]:
        _assert_exact_at(dense, sparse, keep_all, size)


def _swin(**kwargs) -> nn.Module:
    return timm.create_model(
        "swin_tiny_patch4_window7_224", embed_dim=24, num_heads=(1, 1, 2, 2), num_classes=10, **kwargs
    ).eval()


def test_non_square_swin_is_channels_last_and_exact():
    dense = _swin(depths=(1, 1, 3, 1), window_size=2, img_size=(64, 128))
    plan = tokenprune.plan(dense)
    assert plan.chain.layout == "BHWC" and plan.chain.shape == (2, 4, 8, 96)
    sparse = tokenprune.sparsify(dense, keep_ratios=[0.6, 0.4]).eval()
    keep_all = _keeping_all(sparse)
    _assert_exact_at(dense, sparse, keep_all, (64, 128))


def test_non_square_convnext_is_exact_at_other_sizes():
    dense = timm.create_model("convnext_tiny", depths=(1, 1, 3, 1), dims=(16, 32, 64, 128), num_classes=10).eval()
    example = torch.randn(2, 3, 64, 128)
    plan = tokenprune.plan(dense, example_inputs=example)
    assert plan.chain.layout == "BCHW" and plan.chain.shape == (2, 64, 4, 8)
    sparse = tokenprune.sparsify(dense, keep_ratios=[0.6, 0.4], example_inputs=example).eval()
    keep_all = _keeping_all(sparse)
    for size in [(64, 128), (96, 64)]:
        _assert_exact_at(dense, sparse, keep_all, size)


def test_layout_is_read_off_the_image_grid_then_the_block():
    """A map's spatial dims are the image's grid at one stride; where both readings fit ([B, 2, 4, 8] from a 16 x 32
    image: (2, 4) at stride 8, (4, 8) at stride 4), the block's first layer with a feature count decides."""
    from tokenprune.fx.discovery import Call, _layout

    def layout(shape, image, block=nn.Identity()):
        return _layout(Call("b", block, (), {}, torch.zeros(shape), 0), image)

    assert layout((2, 4, 4, 8), (16, 16)) == "BHWC"  # (4, 4) is a 16 x 16 grid, (4, 8) is not
    assert layout((2, 4, 4, 8), (16, 32)) == "BCHW"  # and the other way round for a 16 x 32 image
    assert layout((2, 8, 16, 4), (30, 62)) == "BHWC"  # rounded up at stride 4
    assert layout((2, 2, 4, 8), (16, 32), nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))) == "BHWC"
    assert layout((2, 2, 4, 8), (16, 32), nn.Sequential(nn.Conv2d(2, 2, 3), nn.LayerNorm(8))) == "BCHW"


class _ChannelsLast(nn.Module):
    """A residual block on [B, H, W, C] maps (a MaxxViT partition block's form), or on [B, C, H, W] maps when it
    permutes to channels-last first (ConvNeXt's form without its depthwise conv)."""

    def __init__(self, dim: int, permute: bool) -> None:
        super().__init__()
        self.permute = permute
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.permute(0, 2, 3, 1) if self.permute else x
        y = self.fc(self.norm(y))
        return x + (y.permute(0, 3, 1, 2) if self.permute else y)


@pytest.mark.parametrize("permute, expected", [(False, "BHWC"), (True, "BCHW")])
def test_layout_of_a_square_map_with_as_many_channels_as_rows_is_read_by_running_the_block(permute, expected):
    """[B, 8, 8, 8] from a 32 x 32 image fits both layouts and every layer counts 8 features; the dim of the block's
    input that its first layer reads as features decides (MaxxViT rmlp nano at 256: 64 channels on a 64 x 64 map was
    taken for channels-first and refused with a wrong reason)."""
    from tokenprune.fx.discovery import Call, _layout

    block = _ChannelsLast(8, permute).eval()
    x = torch.randn(2, 8, 8, 8)
    assert _layout(Call("b", block, (x,), {}, block(x), 0), (32, 32)) == expected


def test_shallow_stages_chain_is_blocks_not_layer_norms():
    """Swin with depths (1, 1, 2, 1): patch_embed.norm -> layers.0.blocks.0.norm1 is a run of two LayerNorms as long
    as stage 2's blocks; the chain is the blocks."""
    plan = tokenprune.plan(_swin(depths=(1, 1, 2, 1), window_size=2, img_size=64))
    assert plan.chain.names == ["layers.2.blocks.0", "layers.2.blocks.1"]


class _SpatialGridBlock(nn.Module):
    """A [B, C, H, W] block that is also told the grid size as numbers; it scales its MLP's input or its output by
    a factor computed from them (a Python number, the same at every location)."""

    def __init__(self, dim: int, scaled: str) -> None:
        super().__init__()
        self.scaled = scaled
        self.mix = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.up, self.act, self.down = nn.Conv2d(dim, 4 * dim, 1), nn.GELU(), nn.Conv2d(4 * dim, dim, 1)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        factor = (64.0 / (height * width)) ** 0.5
        if self.scaled == "input":
            return x + self.down(self.act(self.up(self.mix(x) * factor)))
        return x + self.down(self.act(self.up(self.mix(x)))) * factor


class _SpatialGridNet(nn.Module):
    def __init__(self, scaled: str = "input", dim: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.ModuleList(_SpatialGridBlock(dim, scaled) for _ in range(depth))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for blk in self.blocks:
            x = blk(x, x.shape[2], x.shape[3])
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize(("scaled", "slow_path"), [("input", "mul_1 .. down"), ("output", "up .. mul_1")])
def test_spatial_block_taking_grid_size_takes_it_at_run_time(scaled, slow_path):
    """A block told the grid size takes it as a run-time input, not with the example's size baked in: at another
    input size the rewritten model with every location kept is still the original. A number scales every location
    alike, so it joins the slow path, before the MLP or after it (gathered, it scales the kept locations)."""
    torch.manual_seed(0)
    dense, example = _SpatialGridNet(scaled).eval(), torch.randn(2, 3, 32, 32)
    assert f"slow path {slow_path} (" in tokenprune.plan(dense, 0.7, example_inputs=example).describe()
    sparse = tokenprune.sparsify(dense, 0.7, example_inputs=example).eval()
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        with fixed_keep(sparse, 1.0):
            torch.testing.assert_close(sparse(x), dense(x), atol=1e-5, rtol=1e-5)
        gathered = sparse(x)
        tokenprune.set_execution(sparse, "masked")
        torch.testing.assert_close(sparse(x), gathered, atol=1e-5, rtol=1e-4)
