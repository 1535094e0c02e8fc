"""Learned keep ratios under one compute budget.

Instead of hand-set rho^s per stage, the ratios are parameters, trained with the model: the ratio loss pulls each
stage's decisions towards its learned ratio and the learned ratio towards what the predictor keeps (which the task
losses push up), while a budget penalty holds a differentiable estimate of the sparse/dense compute at
``target_flops``. This resembles DiffRate's FLOPs-constrained rates (docs/design.md §3.3), applied to DynamicViT's
stages.

Parameterisation: rho_s = m + (1 - m) * prod_{j<=s} sigmoid(theta_j), so ratios never increase across stages
(a dropped token never returns, docs/design.md §1.1) and never fall below m = 1 / N_patches, so top-k keeps k >= 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..measure.cost import ComputeModel

__all__ = ["LearnedKeepRatios", "budget_penalty"]


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
