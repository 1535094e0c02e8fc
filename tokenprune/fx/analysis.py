"""Analysis: the strategy a chain calls for turns a model into a `Plan` (docs/design.md §2.6).

The token strategy (`fx/token.py`) serves [B, N, C] chains, the spatial one (`fx/spatial.py`) feature maps. Both work
on traced copies only, so every refusal happens here, before `fx/plan.py::apply_plan` touches the model.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import resolve_decisions
from ..errors import UnsupportedModelError
from .discovery import Chain
from .plan import Plan
from .spatial import plan_spatial
from .token import plan_tokens

__all__ = ["build_plan"]


def build_plan(
    model: nn.Module,
    chain: Chain,
    example: torch.Tensor,
    locations: list[int],
    keep_ratios: list[float],
    name: str,
    scorer: str = "predictor",
    decisions: str = "auto",
    fast_path: str = "block",
) -> Plan:
    """Analyse `model` into a `Plan` with the strategy its chain calls for. Changes nothing in `model`.

    Raises:
        UnsupportedModelError: the reason the model cannot be sparsified exactly, naming the block or node.
    """
    decisions = resolve_decisions(decisions, chain.kind, name)
    if chain.kind == "token":
        plan = plan_tokens(model, chain, example, locations, keep_ratios, name, scorer)
    elif scorer != "predictor":
        raise UnsupportedModelError(
            f"{name}: scorer={scorer!r} ranks tokens by a ViT's attention; this model is sparsified spatially (slow "
            "and fast paths over a feature map), where only learned predictors are available. Use scorer='predictor'."
        )
    else:
        plan = plan_spatial(
            model, chain, example, locations, keep_ratios, name, nested=decisions == "nested", fast_path=fast_path
        )
    plan.decisions, plan.fast_path = decisions, fast_path
    for attr, child in plan.graph_module.named_children():
        if not hasattr(model, attr):  # modules the trace itself added (e.g. the training-flag switch)
            plan.add.setdefault(attr, child)
    return plan
