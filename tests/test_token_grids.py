"""Token chains that are the image's grid (no class token; blocks that fold the tokens into a map, as Twins' and XCiT's
do): the token rules refuse them, and they are sparsified spatially over the grid instead (docs/design.md §2.1).
Layer scale 1 everywhere, and the fast paths given weight, so that a misplaced location would show.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tokenprune
from tokenprune import ConfigError, UnsupportedModelError
from tokenprune.fx.discovery import Chain
from tokenprune.measure.ablation import fixed_keep
from tokenprune.nn.asymmetric import AsymmetricPath


def _on_grid(conv: nn.Module, x: torch.Tensor, h: int, w: int, prefix: int) -> torch.Tensor:
    """`conv` over the tokens after `prefix` folded into their (h, w) grid; zeros for the prefix tokens."""
    grid = x[:, prefix:].transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
    return F.pad(conv(grid).flatten(2).transpose(1, 2), (0, 0, prefix, 0))


class _GridBlock(nn.Module):
    """[B, N, C] tokens (after `prefix` class tokens) folded into their (h, w) grid for a depthwise conv, then a
    per-token MLP; with `conv_in_mlp`, PVT-v2's MLP instead: a conv over the grid between its two Linears."""

    def __init__(self, dim: int, prefix: int, conv_in_mlp: bool = False) -> None:
        super().__init__()
        self.prefix, self.conv_in_mlp = prefix, conv_in_mlp
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.dw_mlp = nn.Conv2d(4 * dim, 4 * dim, 3, padding=1, groups=4 * dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        p = self.prefix
        x = x + _on_grid(self.dw, x, h, w, p)
        hidden = self.fc1(self.norm(x))
        if self.conv_in_mlp:
            hidden = _on_grid(self.dw_mlp, hidden, h, w, p)
        return x + self.fc2(F.gelu(hidden))


class _GridNet(nn.Module):
    def __init__(self, prefix: int = 0, dim: int = 32, conv_in_mlp: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, prefix, dim))
        self.blocks = nn.ModuleList([_GridBlock(dim, prefix, conv_in_mlp) for _ in range(5)])
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h, w = x.shape[2:]
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        for block in self.blocks:
            x = block(x, h, w)
        return self.head(x.mean(1))


IMAGES = torch.randn(2, 3, 32, 48)  # an 8 x 12 grid: rows and columns cannot be swapped unnoticed


def test_a_token_grid_without_a_class_token_is_sparsified_spatially():
    torch.manual_seed(0)
    dense = _GridNet().eval()
    described = tokenprune.plan(dense, 0.7, example_inputs=IMAGES).describe()
    assert "spatial chain of 5 blocks" in described
    assert "sparsified spatially over the 8x12 grid of its tokens: block blocks.1: " in described
    assert "reshapes the token axis" in described
    sparse = tokenprune.sparsify(dense, 0.7, example_inputs=IMAGES)
    assert tokenprune.config_of(sparse).kind == "spatial"
    for m in sparse.modules():  # the fast paths start near zero; give them weight so a misplaced one would show
        if isinstance(m, AsymmetricPath):
            nn.init.normal_(m.fast.proj.weight, std=0.2)
    with torch.no_grad():
        for images in (IMAGES, torch.randn(2, 3, 48, 32)):
            masked = tokenprune.set_execution(sparse, "masked")(images)
            tokenprune.set_execution(sparse, "auto")
            pruned = sparse.eval()(images)
            torch.testing.assert_close(masked, pruned, atol=1e-5, rtol=1e-5)
            with fixed_keep(sparse, 1.0):
                torch.testing.assert_close(sparse(images), dense(images), atol=1e-5, rtol=1e-5)
            assert (pruned - dense(images)).abs().max() > 1e-3  # the fast paths do take part


def test_the_options_of_a_spatial_chain_apply():
    """`decisions="independent"` is refused for token chains; a grid is planned spatially, where it is valid."""
    sparse = tokenprune.sparsify(_GridNet().eval(), 0.7, example_inputs=IMAGES, decisions="independent")
    assert tokenprune.config_of(sparse).decisions == "independent"
    with pytest.raises(ConfigError, match="decisions='independent' needs a spatial chain"):
        tokenprune.sparsify(_GridNet(prefix=1).eval(), 0.7, example_inputs=IMAGES, decisions="independent")


def test_the_attention_scorer_is_refused_with_both_reasons():
    """Spatial chains take learned predictors only: the refusal says so besides the token rules' reason."""
    refused = r"reshapes the token axis .* Sparsified spatially, it is refused too: .* Use scorer='predictor'"
    with pytest.raises(UnsupportedModelError, match=refused):
        tokenprune.sparsify(_GridNet().eval(), 0.7, example_inputs=IMAGES, scorer="attention")


def test_with_a_class_token_the_token_refusal_stands():
    with pytest.raises(UnsupportedModelError, match="reshapes the token axis") as refused:
        tokenprune.sparsify(_GridNet(prefix=1).eval(), 0.7, example_inputs=IMAGES)
    assert "spatially" not in str(refused.value)


def test_without_the_spatial_plan_a_grid_is_refused(monkeypatch):
    """The test's test: the same model is refused by the token rules when no spatial plan is tried."""
    monkeypatch.setattr(Chain, "as_locations", lambda self, image: None)
    with pytest.raises(UnsupportedModelError, match="reshapes the token axis"):
        tokenprune.sparsify(_GridNet().eval(), 0.7, example_inputs=IMAGES)


def test_a_grid_refused_both_ways_gives_both_reasons():
    """PVT-v2's MLP: a conv over the grid between its Linears, so no C -> C run after the last op that mixes locations
    (refused spatially), besides the block's own conv over the grid (refused as tokens)."""
    with pytest.raises(
        UnsupportedModelError,
        match=r"reshapes the token axis .* Sparsified spatially, it is refused too: .*no slow path",
    ):
        tokenprune.sparsify(_GridNet(conv_in_mlp=True).eval(), 0.7, example_inputs=IMAGES)


class _FoldedMlpBlock(nn.Module):
    """Its MLP runs as 1x1 convs on the grid the block folds its tokens into."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Conv2d(dim, 4 * dim, 1), nn.GELU(), nn.Conv2d(4 * dim, dim, 1))

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        grid = self.norm(x).transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
        return x + self.mlp(grid).flatten(2).transpose(1, 2)


def test_a_slow_path_on_a_folded_grid_is_not_taken():
    """How a block numbers the grid it folds its tokens into is the block's own (row-major here, Hiera's unrolled
    order elsewhere): a slow path is found only on the tokens themselves, whose numbering the stages share (the walk
    back from the residual add stops at the unfolding, which has no spatial rule)."""
    net = _GridNet()
    net.blocks = nn.ModuleList([_FoldedMlpBlock(32) for _ in range(5)])
    with pytest.raises(UnsupportedModelError, match=r"Sparsified spatially, it is refused too: .*no slow path found"):
        tokenprune.sparsify(net.eval(), 0.7, example_inputs=IMAGES)
