"""Slow and fast paths of a spatial block (DESIGN 1.2; Rao et al., arXiv 2207.01580, "asymmetric computation").

A spatial block keeps its feature map whole: its spatial mixing (a depthwise conv, window attention) runs on every
location. Only the per-location part of a residual branch (norm, pointwise MLP, layer scale) is split: the block's
own layers, the *slow path*, run at the kept locations, and a cheap *fast path* (LayerNorm + Linear(C, C) + layer
scale) at the others. Both results are written back into one map, so later blocks and the head see an ordinary map.

Maps come in any layout; a layout is described by `channel` (the channel dim) and `spatial` (the adjacent spatial
dims in row-major order: (2, 3) for [B, C, H, W], (1, 2) for [B, H, W, C], (1,) for [B, H*W, C]). Locations are
numbered row-major, as the stages' [B, H*W, 1] masks number them.

Three executions, chosen by what the stage passed:
  * dense (`mask` and `keep` None): the slow path's output as is.
  * masked (train mode; eval with `execution="masked"`): both paths on every location, mixed by the hard mask.
  * gathered (eval): the slow path ran on the kept locations only, gathered into a thin [.., k, 1, ..] map of the
    same layout (per-location layers do not care about the map's extent); the fast path runs on the others.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FastPath", "AsymmetricPath", "gather_locations", "FAST_PATH_INIT"]

#: Initial layer scale of the fast path: ConvNeXt's layer_scale_init_value, so a freshly inserted fast path adds
#: (almost) nothing and a dropped location starts as "branch skipped" (DESIGN 1.2, "layer-scale init like the block's").
FAST_PATH_INIT = 1e-6


def _flat(x: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Merge the spatial dims into one location dim at position spatial[0]."""
    return x.flatten(spatial[0], spatial[-1]) if len(spatial) > 1 else x


def _index(index: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """Expand location indices [B, n] to gather/scatter along `dim` of `like` (all other dims taken whole)."""
    shape = [1] * like.dim()
    shape[0], shape[dim] = index.shape
    sizes = [-1 if d in (0, dim) else like.shape[d] for d in range(like.dim())]
    return index.view(shape).expand(sizes)


def gather_locations(x: torch.Tensor, keep: torch.Tensor | None, spatial: tuple[int, ...]) -> torch.Tensor:
    """The kept locations of map `x` as a thin map of the same rank and layout, [.., k, 1, ..]; `x` if `keep` is None.

    Args:
        x: feature map in the layout that `spatial` describes.
        keep: [B, k] row-major location indices, or None (dense and masked executions).
        spatial: the adjacent spatial dims of `x`.
    """
    if keep is None:
        return x
    flat = _flat(x, spatial)
    thin = flat.take_along_dim(_index(keep, flat, spatial[0]), dim=spatial[0])
    for _ in spatial[1:]:
        thin = thin.unsqueeze(spatial[0] + 1)  # W' = 1: the thin map has k rows of one location each
    return thin


class FastPath(nn.Module):
    """LayerNorm + Linear(C, C) + layer scale over channels-last locations [..., C] (DESIGN 1.2 "fast path").

    Args:
        dim: channel count C.
        init_scale: initial value of the layer scale.
    """

    def __init__(self, dim: int, init_scale: float = FAST_PATH_INIT) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x)) * self.gamma


class AsymmetricPath(nn.Module):
    """Combines a block's slow path (its own per-location layers, left in the block's graph) with a fast path.

    Args:
        dim: channel count C of the branch (its input and output have the same shape).
        channel: channel dim of the branch's input and output.
        spatial: adjacent spatial dims of the branch's input and output.
        init_scale: initial layer scale of the fast path.
    """

    def __init__(self, dim: int, channel: int, spatial: tuple[int, ...], init_scale: float = FAST_PATH_INIT) -> None:
        super().__init__()
        self.fast = FastPath(dim, init_scale)
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
        shape = [entry.shape[0]] + [entry.shape[d] if d in self.spatial else 1 for d in range(1, entry.dim())]
        m = mask.to(slow.dtype).reshape(shape)
        # Straight-through: m is a hard 0/1 sample whose gradient reaches the predictor (DESIGN 1.2 "Training").
        return slow * m + self._fast(entry, self.channel) * (1.0 - m)

    def _scatter(
        self, entry: torch.Tensor, slow: torch.Tensor, keep: torch.Tensor, drop: torch.Tensor | None
    ) -> torch.Tensor:
        dim = self.spatial[0]
        merged = len(self.spatial) - 1
        channel = self.channel - merged if self.channel > self.spatial[-1] else self.channel
        flat = _flat(entry, self.spatial)
        out = flat.new_empty(flat.shape, dtype=slow.dtype)  # contiguous, so it views back as the map
        out.scatter_(dim, _index(keep, flat, dim), _flat(slow, self.spatial))
        if drop is not None and drop.shape[1] > 0:
            where = _index(drop, flat, dim)
            out.scatter_(dim, where, self._fast(flat.take_along_dim(where, dim=dim), channel).to(slow.dtype))
        return out.view(entry.shape)
