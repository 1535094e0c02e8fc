"""Slow and fast paths of a spatial block (docs/design.md §1.2; Rao et al., arXiv 2207.01580, "asymmetric computation").

A spatial block keeps its feature map whole: its spatial mixing (a depthwise conv, window attention) runs on every
location. Only the per-location part of a residual branch (norm, pointwise MLP, layer scale) is split: the block's
own layers, the *slow path*, run at the kept locations, and a cheap *fast path* (LayerNorm + Linear(C, C), and a
layer scale where the block has one) at the others. Both results are written back into one map, so later blocks and
the head see an ordinary map.

Maps come in any layout; a layout is described by `channel` (the channel dim) and `spatial` (the adjacent spatial
dims in row-major order: (2, 3) for [B, C, H, W], (1, 2) for [B, H, W, C], (1,) for [B, H*W, C]). Locations are
numbered row-major, as the stages' [B, H*W, 1] masks number them. Gathered execution works on channels-last rows
[B, L, C] (contiguous per location, what LayerNorm and Linear read best) and returns the full map as a view of them.
It reads the locations it needs straight from the map in the map's own layout, so a [B, C, H, W] map is never copied
whole into rows: only the k gathered locations are (docs/design.md §2.4).

Three executions, chosen by what the stage passed:
  * dense (`mask` and `keep` None): the slow path's output as is.
  * masked (train mode; eval with `execution="masked"`): both paths on every location, mixed by the hard mask.
  * gathered (eval): the slow path ran on the kept locations only, gathered into a thin [.., k, 1, ..] map of the
    same layout (per-location layers do not care about the map's extent); the fast path runs on the others.
"""

from __future__ import annotations

import torch
from torch import nn

from .leaf import one_call

__all__ = ["FastPath", "AsymmetricPath", "gather_locations", "mask_locations", "FAST_PATH_INIT"]

#: Initial layer scale of the fast path: ConvNeXt's layer_scale_init_value, so a freshly inserted fast path adds
#: (almost) nothing and a dropped location starts as "branch skipped" (docs/design.md §1.2).
FAST_PATH_INIT = 1e-6
#: Spread of the fast path's Linear weights at init (the official trunc_normal_(std=.02)).
_PROJ_STD = 0.02


def _rows(x: torch.Tensor, channel: int) -> torch.Tensor:
    """Map -> row-major locations [B, L, C] (a view for channels-last maps, one copy for [B, C, H, W])."""
    return x.movedim(channel, -1).flatten(1, -2)


def _map(rows: torch.Tensor, sizes: tuple[int, ...], channel: int) -> torch.Tensor:
    """Locations [B, L, C] -> a map of spatial `sizes` with the channel dim at `channel` (a view)."""
    return rows.view(rows.shape[0], *sizes, rows.shape[-1]).movedim(-1, channel)


def _gather_rows(x: torch.Tensor, index: torch.Tensor, channel: int, spatial: tuple[int, ...]) -> torch.Tensor:
    """Locations `index` [B, k] of map `x` as contiguous rows [B, k, C], read in `x`'s own layout.

    `_rows(x)` followed by a gather would first copy the whole map into channels-last rows when `x` is
    channels-first; indexing the flattened spatial dim copies only the k locations asked for (and on a CPU, advanced
    indexing copies rows about twice as fast as `gather` with an index expanded over the channels).
    """
    flat = x.flatten(spatial[0], spatial[-1])  # [B, L, C] or [B, C, L]; a view for maps contiguous in their layout
    batch = torch.arange(flat.shape[0], device=flat.device).unsqueeze(1)
    if channel < spatial[0]:
        return flat[batch, :, index]  # advanced indices first: [B, k, C]
    return flat[batch, index]


@one_call
def gather_locations(
    x: torch.Tensor, keep: torch.Tensor | None, channel: int, spatial: tuple[int, ...]
) -> torch.Tensor:
    """The kept locations of map `x` as a thin map of the same rank and layout, [.., k, 1, ..]; `x` if `keep` is None.

    The thin map is a view of contiguous channels-last rows, so per-location layers (LayerNorm, Linear over the
    channels) read it without another copy.

    Args:
        x: feature map in the layout that `channel` and `spatial` describe.
        keep: [B, k] row-major location indices, or None (dense and masked executions).
        channel: the channel dim of `x`.
        spatial: the adjacent spatial dims of `x`.
    """
    if keep is None:
        return x
    kept = _gather_rows(x, keep, channel, spatial)
    return _map(kept, (keep.shape[1],) + (1,) * (len(spatial) - 1), channel)  # W' = 1: k rows of one location


def _location_mask(mask: torch.Tensor, like: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """The [B, H*W, 1] hard mask shaped to broadcast over map `like` (its spatial dims `spatial`), in its dtype."""
    shape = [like.shape[0]] + [like.shape[d] if d in spatial else 1 for d in range(1, like.dim())]
    return mask.to(like.dtype).reshape(shape)


@one_call
def mask_locations(
    x: torch.Tensor, mask: torch.Tensor | None, keep: torch.Tensor | None, spatial: tuple[int, ...]
) -> torch.Tensor:
    """`x` with the dropped locations zeroed in masked execution, for a sum over the locations inside a slow path
    (ConvNeXt V2's GRN), so it sums the kept locations as gathered execution does; `x` itself in the others.

    Args:
        x: a map inside the slow path, full size in masked execution.
        mask: [B, H*W, 1] hard keep mask, or None (dense, gathered).
        keep: [B, k] kept location indices (gathered execution: `x` holds only those), or None.
        spatial: the adjacent spatial dims of `x`, in row-major order.
    """
    if mask is None or keep is not None:
        return x
    return x * _location_mask(mask, x, spatial)


class FastPath(nn.Module):
    """LayerNorm + Linear(C, C) [+ layer scale] over channels-last locations [..., C] (docs/design.md §1.2).

    As in the official code, a block with a layer scale of its own (ConvNeXt) gets a fast path with one, initialised
    to `init_scale`, and a block without (Swin) a fast path without. The Linear is initialised as the official code
    does (truncated normal std 0.02, zero bias), and both start (almost) harmless: the scale at 1e-6 in the first
    case; in the second the Linear's weights times 1e-6, which is what that scale does at init, folded into them
    (the official AdaSwin leaves them at 0.02, so its fresh fast path adds W LN(x) to every dropped location;
    docs/design.md §3.1 says why tokenprune does not). Not exactly zero: where the slow path also starts at zero
    (RepViT's zero-initialised last BatchNorm) the keep decision would otherwise get no gradient at all.

    Args:
        dim: channel count C.
        init_scale: initial value of the layer scale, or None for a fast path without one.
        eps: the LayerNorm's epsilon (the block's own norm's: 1e-6 in ConvNeXt, 1e-5 in Swin, as the official code).
    """

    def __init__(self, dim: int, init_scale: float | None = FAST_PATH_INIT, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.bias)
        nn.init.trunc_normal_(self.proj.weight, std=_PROJ_STD)
        if init_scale is None:
            with torch.no_grad():
                self.proj.weight.mul_(FAST_PATH_INIT)
            self.register_parameter("gamma", None)
        else:
            self.gamma = nn.Parameter(torch.full((dim,), float(init_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(self.norm(x))
        return y if self.gamma is None else y * self.gamma


class AsymmetricPath(nn.Module):
    """Combines a block's slow path (its own per-location layers, left in the block's graph) with a fast path.

    Args:
        dim: channel count C of the branch (its input and output have the same shape).
        channel: channel dim of the branch's input and output.
        spatial: adjacent spatial dims of the branch's input and output.
        init_scale: initial layer scale of the fast path, or None for a fast path without one.
        eps: the fast path's LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        channel: int,
        spatial: tuple[int, ...],
        init_scale: float | None = FAST_PATH_INIT,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.fast = FastPath(dim, init_scale, eps)
        self.channel = int(channel)
        self.spatial = tuple(int(d) for d in spatial)

    def extra_repr(self) -> str:
        return f"channel={self.channel}, spatial={self.spatial}"

    def _fast(self, x: torch.Tensor, channel: int) -> torch.Tensor:
        return self.fast(x.movedim(channel, -1)).movedim(-1, channel)

    def forward(
        self,
        entry: torch.Tensor,
        slow: torch.Tensor,
        mask: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args:
            entry: the branch's input map (what both paths read), full size.
            slow: the slow path's output: full size (dense, masked) or thin over `keep` (gathered).
            mask: [B, H*W, 1] hard keep mask (masked execution), or None.
            keep: [B, k] kept location indices (gathered execution), or None.
            drop: [B, H*W - k] the other locations (gathered execution), or None.

        Returns:
            The branch's output, a full map shaped like `entry`.
        """
        if keep is not None:
            return self._scatter(entry, slow, keep, drop)
        if mask is None:
            return slow
        m = _location_mask(mask, slow, self.spatial)
        # Straight-through: m is a hard 0/1 sample whose gradient reaches the predictor (docs/design.md §1.2).
        return slow * m + self._fast(entry, self.channel) * (1.0 - m)

    def _scatter(
        self, entry: torch.Tensor, slow: torch.Tensor, keep: torch.Tensor, drop: torch.Tensor | None
    ) -> torch.Tensor:
        kept = _rows(slow, self.channel)
        out = kept.new_empty(
            entry.shape[0], entry.numel() // (entry.shape[0] * entry.shape[self.channel]), kept.shape[-1]
        )
        batch = torch.arange(out.shape[0], device=out.device).unsqueeze(1)
        out[batch, keep] = kept  # index_put: the locations are distinct, so no accumulation order to worry about
        if drop is not None and drop.shape[1] > 0:
            out[batch, drop] = self.fast(_gather_rows(entry, drop, self.channel, self.spatial)).to(out.dtype)
        return _map(out, tuple(entry.shape[d] for d in self.spatial), self.channel)
