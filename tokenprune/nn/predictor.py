"""The token-importance predictor (docs/design.md §1.1, "Predictor"; Rao et al. 2021, eq. 1-3)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TokenPredictor"]


class TokenPredictor(nn.Module):
    """Scores each token: (keep, drop) log-probabilities from a local and a global feature.

    z = GELU(Linear(LayerNorm(x))); the first half of z's channels is the token's local feature, the second half is
    averaged over the currently kept tokens into a global feature; [local, global] goes through an MLP
    C -> C/2 -> C/4 -> 2 with GELUs and a log-softmax.

    Args:
        dim: channel count C of the tokens (even).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"TokenPredictor needs an even channel count, got {dim}")
        self.embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.score = nn.Sequential(
            nn.Linear(dim, dim // 2),
            nn.GELU(),
            nn.Linear(dim // 2, dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, 2),
            nn.LogSoftmax(dim=-1),
        )

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            x: patch tokens [B, N, C].
            policy: [B, N, 1] keep mask of those tokens, or None when all are kept.

        Returns:
            [B, N, 2] log-probabilities of (keep, drop).
        """
        local, glob = self.embed(x).chunk(2, dim=-1)
        if policy is None:
            glob = glob.mean(dim=1, keepdim=True)
        else:
            weight = policy.to(glob.dtype)
            glob = (glob * weight).sum(dim=1, keepdim=True) / weight.sum(dim=1, keepdim=True).clamp_min(1.0)
        return self.score(torch.cat([local, glob.expand_as(local)], dim=-1))
