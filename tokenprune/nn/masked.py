"""Attention and pooling restricted to kept tokens (DESIGN 1.1, "Training").

In train mode tokens are not removed; instead every later block masks attention so dropped tokens stop influencing
the others:  A_ij = exp(a_ij) G_ij / sum_k exp(a_ik) G_ik,  G_ij = D_j for i != j and G_ii = 1.
The mask multiplies (it is not an additive -inf) so the straight-through gradient reaches the decisions D.

Each function takes `policy` ([B, N, 1], 1 = kept) last-but-one and falls back to the plain op when it is None, which
is what the pruned (eval) execution passes: there dropped tokens are physically gone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["masked_softmax", "masked_attention", "masked_sdpa", "masked_mha", "masked_token_mean", "index_policy"]


def _attention_gate(policy: torch.Tensor, n: int) -> torch.Tensor:
    """G of the paper as [B, 1, N, N]: column j open when token j is kept; the diagonal always open."""
    keep = policy.reshape(policy.shape[0], 1, 1, n).float()
    eye = torch.eye(n, device=policy.device, dtype=keep.dtype)
    return keep + (1.0 - keep) * eye


def masked_softmax(scores: torch.Tensor, policy: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """Softmax over the last dim of attention scores [B, H, N, N], restricted to kept tokens.

    Computed in fp32 after subtracting the row max over open entries, so a dropped token with a large score can't
    underflow the kept ones. The diagonal is always open, so no row is empty.
    """
    if policy is None:
        return scores.softmax(dim=dim)
    if dim not in (-1, scores.dim() - 1):
        raise ValueError(f"masked_softmax expects the key dimension last, got dim={dim}")
    gate = _attention_gate(policy, scores.shape[-1])
    scores32 = scores.float()
    row_max = scores32.masked_fill(gate == 0, float("-inf")).amax(dim=-1, keepdim=True).detach()
    shifted = scores32 - row_max
    # A closed gate's tangent is exp(a_ij - max_open) / Z: unbounded when a dropped token out-scores every kept one
    # (attention sinks), and such outliers then outvote every other token's gradient. Capping the exponent of closed
    # entries at the kept maximum leaves the forward unchanged (their weight is 0) and bounds that tangent by 1/Z.
    shifted = torch.where(gate > 0, shifted, shifted.clamp_max(0.0))
    weights = torch.exp(shifted) * gate
    return (weights / weights.sum(dim=-1, keepdim=True)).to(scores.dtype)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    policy: torch.Tensor,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T * scale) v over heads [B, H, N, d], with the paper's masked softmax."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = masked_softmax((q * scale) @ k.transpose(-2, -1), policy)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v


def masked_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    policy: torch.Tensor | None,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    **kwargs,
) -> torch.Tensor:
    """Drop-in for `F.scaled_dot_product_attention` that also takes the keep policy."""
    if policy is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs
        )
    if attn_mask is not None or is_causal or kwargs.get("enable_gqa"):
        # The rewrite refuses such blocks; this guards direct calls.
        raise NotImplementedError("masked_sdpa does not combine the keep policy with attn_mask, is_causal or GQA")
    return masked_attention(q, k, v, policy, scale=scale, dropout_p=dropout_p)


def masked_mha(
    mha: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    policy: torch.Tensor | None,
    need_weights: bool = True,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Self-attention of a batch-first `nn.MultiheadAttention` with the paper's masked softmax.

    The rewrite only routes modules here that `supports_masked_mha` accepts: batch_first, packed q/k/v projection,
    no bias_k/bias_v, no zero attention, called as self-attention without masks.
    """
    if policy is None:
        return mha(query, key, value, need_weights=need_weights, **kwargs)
    if kwargs.get("attn_mask") is not None or kwargs.get("key_padding_mask") is not None:
        raise NotImplementedError("masked_mha does not combine the keep policy with attn_mask or key_padding_mask")
    b, n, c = query.shape
    heads = mha.num_heads
    qkv = F.linear(query, mha.in_proj_weight, mha.in_proj_bias).reshape(b, n, 3, heads, c // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = masked_attention(q, k, v, policy, dropout_p=mha.dropout if mha.training else 0.0)
    out = mha.out_proj(out.transpose(1, 2).reshape(b, n, c))
    return out, None


def supports_masked_mha(mha: nn.MultiheadAttention) -> str | None:
    """Why `masked_mha` cannot stand in for this module, or None when it can."""
    if not mha.batch_first:
        return "it is not batch_first"
    if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
        return "its q, k, v projections are separate"
    if mha.bias_k is not None or mha.add_zero_attn:
        return "it adds bias_k/bias_v or zero attention"
    return None


def masked_token_mean(
    x: torch.Tensor, policy: torch.Tensor | None, dim: int = 1, keepdim: bool = False
) -> torch.Tensor:
    """Mean over the token dimension of kept tokens only (heads that average tokens, DESIGN 1.1)."""
    if policy is None:
        return x.mean(dim=dim, keepdim=keepdim)
    weight = policy.to(x.dtype)
    total = (x * weight).sum(dim=dim, keepdim=keepdim)
    return total / weight.sum(dim=dim, keepdim=keepdim).clamp_min(1.0)


def index_policy(policy: torch.Tensor | None, index) -> torch.Tensor | None:
    """Index a keep policy as its tokens were indexed (e.g. `x[:, 1:]` drops the class token from pooling)."""
    return None if policy is None else policy[index]
