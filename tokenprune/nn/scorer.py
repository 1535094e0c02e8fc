"""The training-free scorer: token importance from the attention the model already computes (docs/design.md §1.3).

A stage with ``scorer="attention"`` ranks tokens by the attention of the block before it, instead of a learned
predictor. The graph pass makes that block return one score per token besides its tokens:

- with a class token (a never-pruned prefix), the attention the class token pays to each token, averaged over heads
  (EViT's criterion); with fused attention (SDPA) only the class token's row is computed: q_cls k^T, O(N C);
- without one, the mean attention each token receives, averaged over heads and over the (kept) queries: the whole
  [N, N] matrix, O(N^2 C), which the block's fused attention does not keep.

In masked execution dropped keys get no weight and dropped queries do not vote, so a token's score is the one pruned
execution computes over the kept tokens. Scores carry no gradient: the decision is top-k in training and in eval.
Scores are fp32 whatever the model's dtype or autocast (`float32_scoring`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .predictor import float32_scoring

__all__ = ["attention_scores", "attention_weight_scores", "AttentionScores", "AttentionScorer", "SCORES_MODULE"]

#: The attribute name of the `AttentionScores` module in a block that returns scores (reports find its cost there).
SCORES_MODULE = "tokenprune_scores"


def _receive(weights: torch.Tensor, policy: torch.Tensor | None, prefix: int) -> torch.Tensor:
    """[B, H, Nq, N] attention weights -> [B, N]: the class row (prefix > 0) or the mean over kept queries."""
    with float32_scoring(weights.device):
        weights = weights.float().mean(dim=1)
        if prefix:
            return weights[:, 0]
        if policy is None:
            return weights.mean(dim=1)
        vote = policy.float()  # [B, N, 1]: dropped queries do not vote
        return (weights * vote).sum(dim=1) / vote.sum(dim=1).clamp_min(1.0)


@torch.no_grad()
def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    policy: torch.Tensor | None,
    prefix: int,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Token scores [B, N] from the queries and keys [B, H, N, d] of a fused self-attention (the SDPA call's own).

    Args:
        policy: keep policy [B, N, 1] of the tokens (masked execution) or None.
        prefix: never-pruned leading tokens; with one or more, token 0 is the class token whose row is used.
        attn_mask: the SDPA call's additive (or boolean, True = attend) mask, broadcastable to [B, H, N, N].
        scale: the SDPA call's scale; default 1 / sqrt(d).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    queries = q[..., :1, :] if prefix else q
    with float32_scoring(q.device):  # reason: under autocast the product below would be computed in bf16/fp16
        logits = (queries.float() @ k.float().transpose(-2, -1)) * scale  # [B, H, 1 or N, N]
        if attn_mask is not None:
            mask = attn_mask[..., :1, :] if prefix and attn_mask.shape[-2] > 1 else attn_mask
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
        if policy is not None:
            logits = logits.masked_fill(policy[:, None, None, :, 0] == 0, float("-inf"))  # dropped keys
        return _receive(logits.softmax(dim=-1), policy, prefix)


@torch.no_grad()
def attention_weight_scores(weights: torch.Tensor, policy: torch.Tensor | None, prefix: int) -> torch.Tensor:
    """Token scores [B, N] from an explicit self-attention's weights [B, H, N, N] (dropped keys already at 0)."""
    return _receive(weights, policy, prefix)


class AttentionScores(nn.Module):
    """The call a block makes to score its tokens; a module so that FLOP reports can attribute the cost to it.

    Args:
        prefix: never-pruned leading tokens (token 0 is then the class token).
        source: "qk" (called with the fused attention's queries and keys) or "weights" (the explicit attention).
    """

    def __init__(self, prefix: int, source: str) -> None:
        super().__init__()
        self.prefix, self.source = prefix, source

    def extra_repr(self) -> str:
        return f"prefix={self.prefix}, source={self.source}"

    def forward(
        self,
        a: torch.Tensor,
        k: torch.Tensor | None,
        policy: torch.Tensor | None,
        attn_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """[B, N] scores from (q, k) or from the attention weights `a` (then `k` is None)."""
        if self.source == "weights":
            return attention_weight_scores(a, policy, self.prefix)
        return attention_scores(a, k, policy, self.prefix, attn_mask=attn_mask, scale=scale)


class AttentionScorer(nn.Module):
    """Stands where a stage's predictor would: turns attention scores into (keep, drop) log-probabilities.

    It has no parameters; the stage decides by top-k of the keep score in training as in eval.
    """

    def forward(self, score: torch.Tensor) -> torch.Tensor:
        """[B, N] scores in [0, 1] -> [B, N, 2] log-probabilities of (keep, drop), comparable across tokens."""
        keep = score.float().clamp(1e-12, 1.0)
        return torch.stack([keep.log(), (1.0 - keep).clamp_min(1e-12).log()], dim=-1)
