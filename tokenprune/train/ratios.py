"""Learned keep ratios under one compute budget.

Instead of hand-set rho^s per stage, the ratios are parameters, trained with the model: the ratio loss pulls each
stage's decisions towards its learned ratio and the learned ratio towards what the predictor keeps (which the task
losses push up), while a budget penalty holds a differentiable estimate of the sparse/dense compute at
``target_flops``. This resembles DiffRate's FLOPs-constrained rates (docs/design.md §3.3), applied to DynamicViT's
stages.

The parameterisation and the projection onto the budget are `tokenprune.measure.budget`'s, shared with
`tokenprune.set_keep_ratios(model, flops=...)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..measure.budget import budget_shift, floor_of, logits_of, ratios_of
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
        self.floor = floor_of(patches)
        self.theta = nn.Parameter(torch.zeros(len(init)))
        self.set_ratios(init)

    def set_ratios(self, ratios: Sequence[float]) -> None:
        """Set the parameters so that `forward` returns `ratios` (clamped into the valid range)."""
        with torch.no_grad():
            self.theta.copy_(torch.tensor(logits_of(ratios, self.floor)))

    def forward(self, shift: float | Tensor = 0.0) -> Tensor:
        """The current keep ratios [S]; `shift` is added to every logit (used to project onto a budget)."""
        return ratios_of(self.theta, self.floor, shift)

    @torch.no_grad()
    def budget_shift(self, compute: ComputeModel, target: float) -> float:
        """The scalar to add to every logit so that the compute estimate equals `target` exactly: shifting all
        logits together keeps the learned allocation across stages and makes the budget exact, which the soft
        penalty alone only approaches.

        Raises:
            ConfigError: if no shift reaches `target` (budget below the all-floor or above the dense compute).
        """
        return budget_shift(compute, self.theta, self.floor, target, "target_flops")
