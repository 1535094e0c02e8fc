"""What the last forward of a sparsified model decided: per-stage decisions, final tokens, final keep mask.

Training losses need these (docs/design.md §3.1), but the model's forward returns what the original model returned,
so training loops written for the original keep working. The inserted modules record their decisions here instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["SparsityState", "sparsity_state"]


@dataclass
class SparsityState:
    """Decisions of the last forward pass of a sparsified model.

    Attributes:
        decisions: one tensor per stage, [B, N_patches, 1], the stage's keep decision over the *initial* patch
            tokens (1 = kept). In train mode these are hard Gumbel-softmax samples with straight-through gradients,
            already multiplied by the earlier stages' decisions (docs/design.md §1.1, D_s). In pruned (eval)
            execution they are the top-k masks, without gradient.
        keep_ratios: the per-stage target fraction of initial patch tokens, as a float tensor [S] (a learned
            parameter's current value when keep ratios are learned).
        final_tokens: the output of the chain's last block, [B, N_final, C]. In masked execution N_final equals the
            initial token count; in pruned execution only kept tokens remain.
        final_mask: [B, N_final, 1] keep mask of `final_tokens` (prefix tokens are 1). In pruned execution all ones.
        final_index: [B, N_final] position of each final token in the initial sequence (prefix tokens included), so
            a teacher's tokens can be compared at the same positions.
        prefix_tokens: number of leading tokens that are never pruned.
        chain_output: qualified name of the chain's last block; hook the same name on the teacher to get its tokens.
    """

    decisions: list[torch.Tensor]
    keep_ratios: torch.Tensor
    final_tokens: torch.Tensor | None
    final_mask: torch.Tensor | None
    final_index: torch.Tensor | None
    prefix_tokens: int
    chain_output: str


def sparsity_state(model: nn.Module) -> SparsityState:
    """Return what the last forward of `model` (a result of `tokenprune.sparsify`) decided.

    Args:
        model: a sparsified model that has run at least one forward pass (possibly wrapped by DDP).

    Returns:
        The `SparsityState` of the last forward.

    Raises:
        TokenPruneError: if the model is not sparsified or has not run a forward pass yet.
    """
    from .nn.recorder import model_state

    return model_state(model)
