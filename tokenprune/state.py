"""What the last forward of a sparsified model decided: per-stage decisions, final tokens, final keep mask.

Training losses need these (docs/design.md §3.1), but the model's forward returns what the original model returned,
so training loops written for the original keep working; the inserted modules record the decisions instead
(`SparsityState` is assembled, and defined, in `tokenprune.nn.recorder`).
"""

from __future__ import annotations

from torch import nn

from .nn.recorder import SparsityState, model_state

__all__ = ["SparsityState", "sparsity_state"]


def sparsity_state(model: nn.Module) -> SparsityState:
    """Return what the last forward of `model` (a result of `tokenprune.sparsify`) decided.

    Args:
        model: a sparsified model that has run at least one forward pass (possibly wrapped by DDP).

    Returns:
        The `SparsityState` of the last forward.

    Raises:
        TokenPruneError: if the model is not sparsified or has not run a forward pass yet.
    """
    return model_state(model)
