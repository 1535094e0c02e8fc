"""Learned keep ratios under one compute budget.

Instead of hand-set rho^s per stage, the ratios are parameters, trained with the model: the ratio loss pulls each
stage's decisions towards its learned ratio and the learned ratio towards what the predictor keeps (which the task
losses push up), while a budget penalty holds a differentiable estimate of the sparse/dense compute at
``target_flops``. This resembles DiffRate's FLOPs-constrained rates (DESIGN 1.4), applied to DynamicViT's stages.

Parameterisation: rho_s = m + (1 - m) * prod_{j<=s} sigmoid(theta_j), so ratios never increase across stages
(a dropped token never returns, DESIGN 1.1) and never fall below m = 1 / N_patches, so top-k keeps k >= 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["ComputeModel", "LearnedKeepRatios", "budget_penalty"]


@dataclass
class ComputeModel:
    """Multiply-adds of the pruned chain as a function of per-stage keep ratios.

    Token blocks on N tokens of width C cost (4 + 2r) N C^2 (qkv, projection, MLP with ratio r; 12 N C^2 for r = 4)
    plus 2 N^2 C for the attention products. Each predictor costs about 1.625 N C^2 on the tokens it scores
    (Linear C->C, then C->C/2->C/4->2). Spatial blocks (DESIGN 1.2) cost 49 HW C for the 7x7 depthwise mixing on the
    whole map, 2r C^2 per location on the slow path and C^2 on the fast path.

    Attributes:
        kind: "token" or "spatial".
        depth: blocks in the chain.
        locations: chain indices of the blocks each predictor precedes.
        dim: channel width C.
        patches: prunable tokens (or spatial locations) at the chain's input.
        prefix: tokens that are never pruned (class, distillation, registers).
        mlp_ratio: hidden width of the MLP over C.
    """

    kind: str
    depth: int
    locations: list[int]
    dim: int
    patches: int
    prefix: int = 0
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if not self.locations or sorted(self.locations) != list(self.locations) or self.locations[-1] >= self.depth:
            raise ConfigError(f"locations {self.locations} must be increasing chain indices below depth {self.depth}.")

    def _block(self, kept: Tensor) -> Tensor:
        c, r = float(self.dim), self.mlp_ratio
        if self.kind == "spatial":
            hw = float(self.patches)
            return 49 * hw * c + kept * (2 * r * c * c) + (hw - kept) * c * c
        n = kept + self.prefix
        return (4 + 2 * r) * n * c * c + 2 * n * n * c

    def _predictor(self, kept: Tensor) -> Tensor:
        c = float(self.dim)
        return kept * (1.625 * c * c + c / 2)

    def dense(self) -> float:
        """Multiply-adds of the dense chain."""
        return float(self._block(torch.tensor(float(self.patches)))) * self.depth

    def macs(self, keep_ratios: Tensor) -> Tensor:
        """Multiply-adds of the sparse chain, differentiable in `keep_ratios` [S]."""
        full = torch.tensor(float(self.patches), device=keep_ratios.device)
        kept = [full] + [keep_ratios[s] * self.patches for s in range(len(self.locations))]
        bounds = [0, *self.locations, self.depth]
        total = full.new_zeros(())
        for s in range(len(bounds) - 1):
            total = total + (bounds[s + 1] - bounds[s]) * self._block(kept[s])
            if s > 0:
                total = total + self._predictor(kept[s - 1])
        return total

    def ratio(self, keep_ratios: Tensor) -> Tensor:
        """Estimated sparse/dense compute of the chain (predictors included)."""
        return self.macs(keep_ratios) / self.dense()


def budget_penalty(flops_ratio: Tensor, target: float) -> Tensor:
    """Squared relative error of the compute estimate against the budget, ((F - T) / T)^2."""
    return ((flops_ratio - target) / target) ** 2


class LearnedKeepRatios(nn.Module):
    """Per-stage keep ratios as parameters, monotonically non-increasing, clamped so top-k keeps at least one token.

    Args:
        init: initial per-stage keep ratios (e.g. rho^s), non-increasing in (0, 1].
        patches: prunable tokens per image; the floor is 1 / patches.
    """

    def __init__(self, init: Sequence[float], patches: int) -> None:
        super().__init__()
        self.floor = 1.0 / max(1, patches)
        self.theta = nn.Parameter(torch.zeros(len(init)))
        self.set_ratios(init)

    def set_ratios(self, ratios: Sequence[float]) -> None:
        """Set the parameters so that `forward` returns `ratios` (clamped into the valid range)."""
        ratios = [min(max(float(r), self.floor * 1.001), 0.9999) for r in ratios]
        previous, theta = 1.0, []
        for r in ratios:
            frac = (r - self.floor) / (1.0 - self.floor)
            step = min(max(frac / previous, 1e-4), 1 - 1e-4)
            theta.append(math.log(step / (1 - step)))
            previous = previous * step
        with torch.no_grad():
            self.theta.copy_(torch.tensor(theta))

    def forward(self, shift: float | Tensor = 0.0) -> Tensor:
        """The current keep ratios [S]; `shift` is added to every logit (used to project onto a budget)."""
        return self.floor + (1.0 - self.floor) * torch.cumprod(torch.sigmoid(self.theta + shift), dim=0)

    @torch.no_grad()
    def budget_shift(self, compute: ComputeModel, target: float, iters: int = 60) -> float:
        """The scalar to add to every logit so that the compute estimate equals `target` exactly.

        Shifting all logits together keeps the learned allocation across stages and makes the budget exact, which
        the soft penalty alone only approaches. Bisection works because the estimate grows with the shift.

        Raises:
            ConfigError: if no shift reaches `target` (budget below the all-floor or above the dense compute).
        """
        lo, hi = -30.0, 30.0
        low, high = float(compute.ratio(self(lo))), float(compute.ratio(self(hi)))
        if not low <= target <= high:
            raise ConfigError(
                f"target_flops={target} is out of reach for this chain: the estimate ranges over [{low:.3f}, "
                f"{high:.3f}] of dense; choose a budget in that range."
            )
        for _ in range(iters):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if float(compute.ratio(self(mid))) < target else (lo, mid)
        return (lo + hi) / 2
