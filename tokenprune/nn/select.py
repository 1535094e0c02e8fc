"""A sparsification stage: predictor + decision (Gumbel in training, top-k in eval) (docs/design.md §1.1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .predictor import TokenPredictor
from .scorer import AttentionScorer

__all__ = ["TokenSelector", "EXECUTIONS", "SCORERS", "drop_transient", "top_k", "positions"]

EXECUTIONS = ("auto", "masked", "pruned")
#: How a stage ranks tokens: a learned predictor (DynamicViT) or the attention of the block before it (no training).
SCORERS = ("predictor", "attention")


def top_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """[B, N] bool: the k highest fp32 scores of each row, equal scores going to the lower position: the one rule
    every stage's top-k follows, in masked and in pruned execution alike.

    `topk` does not order ties, and ties are common (a bf16 model's scores, tokens dropped to -inf). The k-th value
    is a threshold: everything above it is kept, and of the scores equal to it the first ones by position fill the
    rest. Exact, and made of ops every backend and exporter has (a stable sort is not one of them). Pruned execution
    keeps its tokens in position order, so "lower position" means the same tokens there as over the full sequence.
    """
    score = score.float()
    k = min(k, score.shape[1])
    threshold = score.topk(k, dim=1).values[:, -1:]
    above, tied = score > threshold, score == threshold
    return above | (tied & (tied.cumsum(dim=1) <= k - above.sum(dim=1, keepdim=True)))


def positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """[B, count] positions of the True entries of each row of `mask` (`count` of them), in increasing order."""
    n = mask.shape[1]
    later_first = torch.where(mask, n - torch.arange(n, device=mask.device), 0)  # distinct per True entry
    return later_first.topk(count, dim=1).indices


def drop_transient(module: nn.Module) -> dict:
    """`__getstate__` that leaves out what the last forward recorded: copies and pickles start clean (and a
    recorded tensor with autograd history could not be deep-copied)."""
    state = module.__dict__.copy()
    for name in module._transient:
        state[name] = None
    return state


class TokenSelector(nn.Module):
    """One pruning stage of a token chain.

    Masked execution (train mode by default) keeps the sequence length and returns a keep policy over all tokens that
    later blocks use to mask attention; pruned execution (eval mode by default) gathers the top-k tokens so later
    blocks run on a shorter sequence. Prefix tokens (class, distillation, registers) are always kept.

    Args:
        dim: token channel count.
        keep_ratio: fraction of the *initial* patch tokens this stage keeps; k = max(1, floor(keep_ratio * N0)).
        prefix_tokens: number of leading tokens never pruned.
        stage: index of this stage, for the recorded state.
        scorer: "predictor" (a learned `TokenPredictor`; Gumbel decisions in training) or "attention" (scores that
            the block before the stage returns, `nn/scorer.py`; top-k decisions in training too).
    """

    def __init__(self, dim: int, keep_ratio: float, prefix_tokens: int, stage: int, scorer: str = "predictor") -> None:
        super().__init__()
        if scorer not in SCORERS:
            raise ValueError(f"scorer={scorer!r}; choose one of {SCORERS}")
        self.scorer = scorer
        self.predictor = TokenPredictor(dim) if scorer == "predictor" else AttentionScorer()
        self.keep_ratio = float(keep_ratio)
        self.prefix_tokens = prefix_tokens
        self.stage = stage
        self.execution = "auto"
        self.last_decision: torch.Tensor | None = None
        self.last_index: torch.Tensor | None = None
        self.last_initial_patches = 0

    _transient = ("last_decision", "last_index")
    __getstate__ = drop_transient

    def extra_repr(self) -> str:
        return (
            f"stage={self.stage}, keep_ratio={self.keep_ratio:.4f}, prefix_tokens={self.prefix_tokens}, "
            f"scorer={self.scorer}"
        )

    def keep_count(self, initial_patches: int) -> int:
        """Tokens kept out of the initial patch count: the same k for the whole batch."""
        return max(1, math.floor(self.keep_ratio * initial_patches + 1e-6))

    def pruned(self) -> bool:
        return self.execution == "pruned" or (self.execution == "auto" and not self.training)

    def forward(
        self,
        x: torch.Tensor,
        policy: torch.Tensor | None,
        index: torch.Tensor | None,
        initial_tokens: int,
        score: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Args:
            x: tokens [B, N, C], prefix first.
            policy: [B, N, 1] keep policy from the previous stage (masked execution), or None.
            index: [B, N] position of each token in the chain's input (pruned execution after a stage), or None.
            initial_tokens: token count (prefix included) entering the chain, so keep counts follow the real input.
            score: [B, N] attention scores of these tokens (scorer "attention"), else None.

        Returns:
            (tokens, policy, index): in masked execution the same tokens, the new policy [B, N, 1] and None; in
            pruned execution the kept tokens [B, prefix + k, C], None, and their positions [B, prefix + k] in the
            chain's input (position-indexed constants such as relative position biases are gathered with them).
        """
        p = self.prefix_tokens
        patches, patch_policy = x[:, p:], None if policy is None else policy[:, p:]
        if self.scorer == "attention":
            log_probs = self.predictor(score[:, p:])
        else:
            log_probs = self.predictor(patches, patch_policy)
        self.last_initial_patches = initial_tokens - p
        k = self.keep_count(self.last_initial_patches)
        if self.pruned():
            return self._gather(x, log_probs[..., 0], k, index)
        if self.training and self.scorer == "predictor":
            # Hard sample with straight-through gradients; a dropped token never returns (D_s = sample * D_{s-1}).
            decision = F.gumbel_softmax(log_probs, hard=True)[..., :1]
        else:
            decision = self._topk_mask(log_probs[..., 0], patch_policy, k)
        if patch_policy is not None:
            decision = decision * patch_policy
        self.last_decision, self.last_index = decision, None
        prefix = torch.ones_like(decision[:, :1]).expand(-1, p, -1)
        return x, torch.cat([prefix, decision], dim=1), None

    @staticmethod
    def _topk_mask(score: torch.Tensor, policy: torch.Tensor | None, k: int) -> torch.Tensor:
        """The deterministic eval decision as a mask: top-k among the tokens still kept."""
        if policy is not None:
            score = score.masked_fill(policy[..., 0] == 0, float("-inf"))
        return top_k(score, k).to(score.dtype).unsqueeze(-1)

    def _gather(
        self, x: torch.Tensor, score: torch.Tensor, k: int, position: torch.Tensor | None
    ) -> tuple[torch.Tensor, None, torch.Tensor]:
        p = self.prefix_tokens
        # In position order: the tie-break of the next stage reads positions (`top_k`), and it reads better.
        index = positions(top_k(score, k), min(k, score.shape[1]))
        self.last_index, self.last_decision = index, None
        rows = index + p  # the kept tokens' rows in x, prefix first: one copy of the kept tokens, no concatenation
        if p:
            rows = torch.cat([torch.arange(p, device=x.device).expand(x.shape[0], -1), rows], dim=1)
        batch = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
        # reason: advanced indexing copies rows 1.3x to 3x faster than `gather` with the index expanded over the
        # channels (batch 256 to 1, DeiT-S's tokens, one CPU thread)
        kept = x[batch, rows]
        return kept, None, rows if position is None else position.gather(1, rows)
