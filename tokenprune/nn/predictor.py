"""The token-importance predictor (docs/design.md §1.1, "Predictor"; Rao et al. 2021, eq. 1-3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TokenPredictor", "float32_scoring"]


def float32_scoring(device: torch.device):
    """The context scores are computed in: autocast off, so that every score is fp32 whatever the model runs in.

    Masked and pruned execution run the same tokens through differently shaped computations; in bf16 or fp16 their
    scores round differently and tie often, and the two would choose different tokens (issue #20 item 6).
    """
    return torch.autocast(device.type, enabled=False)


def _run_float32(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """`layers(x)` in fp32, with fp32 copies of weights the model was cast away from (a bf16 model keeps fp32 scores;
    for fp32 weights `.float()` is the weight itself, so training is unchanged)."""
    for layer in layers:
        if isinstance(layer, nn.Linear):
            x = F.linear(x, layer.weight.float(), None if layer.bias is None else layer.bias.float())
        elif isinstance(layer, nn.LayerNorm):
            weight = None if layer.weight is None else layer.weight.float()
            bias = None if layer.bias is None else layer.bias.float()
            x = F.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps)
        else:  # reason: GELU and LogSoftmax have no weights; on fp32 input they compute in fp32
            x = layer(x)
    return x


def _official_init(module: nn.Module) -> None:
    """The official code's initialisation (DynamicViT's `_init_weights`, applied to the whole model there): Linear
    weights from a normal of std 0.02 truncated at +-2, zero biases; LayerNorms at weight 1, bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


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
        self.apply(_official_init)

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            x: patch tokens [B, N, C].
            policy: [B, N, 1] keep mask of those tokens, or None when all are kept.

        Returns:
            [B, N, 2] fp32 log-probabilities of (keep, drop), computed in fp32 whatever the dtype of `x`, the weights
            or an enclosing autocast.
        """
        with float32_scoring(x.device):
            local, glob = _run_float32(self.embed, x.float()).chunk(2, dim=-1)
            if policy is None:
                glob = glob.mean(dim=1, keepdim=True)
            else:
                weight = policy.float()
                glob = (glob * weight).sum(dim=1, keepdim=True) / weight.sum(dim=1, keepdim=True).clamp_min(1.0)
            return _run_float32(self.score, torch.cat([local, glob.expand_as(local)], dim=-1))
