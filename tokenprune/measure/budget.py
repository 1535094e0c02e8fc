"""Keep ratios under a compute budget: one parameterisation, one way to move it onto a budget.

Per-stage keep ratios are written as

    rho_s = m + (1 - m) * prod_{j <= s} sigmoid(theta_j + shift),      m = 1 / N

so they never increase across stages (a dropped token never returns, docs/design.md §1.1) and never fall below one
token. Adding one `shift` to every logit moves all stages together: their allocation (which stage keeps relatively
more) is kept, and a rho^s schedule stays geometric at another base (but for the floor m). The chain's estimated
compute (`ComputeModel.ratio`) grows with the shift, so bisection finds the shift that meets a budget exactly.

Two users: learned keep ratios are projected onto `learned_ratios.target_flops` (`tokenprune.train.ratios`), and
`tokenprune.set_keep_ratios(model, flops=...)` moves a model's current keep ratios onto a budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from .cost import ComputeModel

__all__ = ["floor_of", "logits_of", "ratios_of", "budget_shift", "at_budget"]

#: The shifts bisection searches between: sigmoid(+-30) is 1 or 0 to float precision.
_SHIFT_RANGE = (-30.0, 30.0)


def floor_of(patches: int) -> float:
    """The lowest keep ratio, m = 1 / N: one of N prunable tokens (or locations)."""
    return 1.0 / max(1, patches)


def logits_of(ratios: Sequence[float], floor: float) -> list[float]:
    """The logits theta for which `ratios_of(theta, floor)` gives `ratios` (clamped into (floor, 1))."""
    ratios = [min(max(float(r), floor * 1.001), 0.9999) for r in ratios]
    previous, theta = 1.0, []
    for r in ratios:
        frac = (r - floor) / (1.0 - floor)
        step = min(max(frac / previous, 1e-4), 1 - 1e-4)
        theta.append(math.log(step / (1 - step)))
        previous = previous * step
    return theta


def ratios_of(theta: Tensor, floor: float, shift: float | Tensor = 0.0) -> Tensor:
    """The keep ratios [S] of logits `theta` [S], `shift` added to every one."""
    return floor + (1.0 - floor) * torch.cumprod(torch.sigmoid(theta + shift), dim=0)


@torch.no_grad()
def budget_shift(compute: ComputeModel, theta: Tensor, floor: float, target: float, what: str) -> float:
    """The shift to add to every logit of `theta` so that the compute estimate equals `target` (sparse/dense chain).

    `what` names the budget in the error (an option or recipe key).

    Raises:
        ConfigError: no shift reaches `target` (below the chain at one token per stage, or above its dense cost).
    """
    lo, hi = _SHIFT_RANGE

    def estimate(shift: float) -> float:
        return float(compute.ratio(ratios_of(theta, floor, shift)))

    low, high = estimate(lo), estimate(hi)
    if not low <= target <= high:
        raise ConfigError(
            f"{what}={target} is out of reach for this chain: the estimate ranges over [{low:.3f}, {high:.3f}] of "
            "dense; choose a budget in that range."
        )
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if estimate(mid) < target else (lo, mid)
    return (lo + hi) / 2


def at_budget(compute: ComputeModel, ratios: Sequence[float], target: float, what: str = "flops") -> list[float]:
    """`ratios` moved, all stages together, until the chain's compute estimate is `target` of the dense chain's."""
    floor = floor_of(compute.patches)
    theta = torch.tensor(logits_of(ratios, floor), dtype=torch.float64)
    shift = budget_shift(compute, theta, floor, target, what)
    return [float(r) for r in ratios_of(theta, floor, shift)]
