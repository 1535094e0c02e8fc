"""Attention restricted to kept tokens (docs/design.md §1.1); means over kept tokens are in `tokenops`.

In train mode tokens are not removed; instead every later block masks attention so dropped tokens stop influencing
the others:  A_ij = exp(a_ij) G_ij / sum_k exp(a_ik) G_ik,  G_ij = D_j for i != j and G_ii = 1.
G multiplies (it is not an additive -inf whose gradient is zero) so the straight-through gradient reaches the
decisions D.

Each function takes `policy` ([B, N, 1], 1 = kept) last-but-one and falls back to the plain op when it is None, which
is what the pruned (eval) execution passes: there dropped tokens are physically gone.

Two implementations of masked attention give the same values and gradients:
  * `masked_attention`, explicit: builds the [B, H, N, N] weights with `masked_softmax`; autograd saves them (several
    fp32 copies per block), which is what makes masked training cost more memory and time than dense training.
  * `fused_masked_attention`: `F.scaled_dot_product_attention` with the additive mask log G (0 open, -inf closed),
    so nothing [N, N] is kept and q, k, v get SDPA's own gradients; the gate's gradient, which the backward of an
    additive -inf could not give, is added by a backward that recomputes one block's scores in fp32 (`masked_sdpa`
    and `masked_mha` use it unless attention dropout is on).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .leaf import one_call

__all__ = [
    "masked_softmax",
    "gated_softmax",
    "masked_attention",
    "fused_masked_attention",
    "masked_sdpa",
    "masked_mha",
]


def _attention_gate(policy: torch.Tensor, n: int) -> torch.Tensor:
    """G of the paper as [B, 1, N, N]: column j open when token j is kept; the diagonal always open."""
    keep = policy.reshape(policy.shape[0], 1, 1, n).float()
    eye = torch.eye(n, device=policy.device, dtype=keep.dtype)
    return keep + (1.0 - keep) * eye


@one_call
def masked_softmax(scores: torch.Tensor, policy: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """Softmax over the last dim of attention scores [B, H, N, N], restricted to kept tokens.

    Computed in fp32 after subtracting the row max over open entries, so a dropped token with a large score can't
    underflow the kept ones. The diagonal is always open, so no row is empty. An additive term (relative position
    bias, -inf mask) added to the scores before the call is gated the same way (docs/design.md §2.3).
    """
    if policy is None:
        return scores.softmax(dim=dim)
    if dim not in (-1, scores.dim() - 1):
        raise ValueError(f"masked_softmax expects the key dimension last, got dim={dim}")
    return gated_softmax(scores, _attention_gate(policy, scores.shape[-1]))


def gated_softmax(scores: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """exp(a_ij) G_ij / sum_k exp(a_ik) G_ik over the last dim, in fp32, for a 0/1 `gate` broadcastable to `scores`
    with at least one open entry per row."""
    scores32 = scores.float()
    row_max = scores32.masked_fill(gate == 0, float("-inf")).amax(dim=-1, keepdim=True).detach()
    shifted = scores32 - row_max
    # A closed gate's tangent is exp(a_ij - max_open) / Z: unbounded when a dropped token out-scores every kept one
    # (attention sinks), and such outliers then outvote every other token's gradient. Capping the exponent of closed
    # entries at the kept maximum leaves the forward unchanged (their weight is 0) and bounds that tangent by 1/Z.
    shifted = torch.where(gate > 0, shifted, shifted.clamp_max(0.0))
    weights = torch.exp(shifted) * gate
    return (weights / weights.sum(dim=-1, keepdim=True)).to(scores.dtype)


def _additive(attn_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """An SDPA `attn_mask` as an additive term: a boolean mask (True = attend) becomes 0 / -inf."""
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(~attn_mask, float("-inf"))


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    policy: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    softmax=None,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v over heads [B, H, N, d] with the paper's masked softmax (explicit weights).

    Args:
        q, k, v: [B, H, N, d].
        policy: [B, N, 1] keep policy.
        attn_mask: SDPA's `attn_mask`, broadcastable to [B, H, N, N]: additive (e.g. a relative position bias,
            docs/design.md §2.3) or boolean (True = attend). Every query must keep one open key.
        scale: score scale, 1/sqrt(d) by default.
        dropout_p: attention dropout (applied to the weights, as SDPA does).
        softmax: `softmax(scores, policy)` to normalise with; default `masked_softmax` (self-attention, diagonal
            kept). Cross-attention passes `tokenops.masked_cross_softmax`.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q * scale) @ k.transpose(-2, -1)
    bias = _additive(attn_mask, scores.dtype)
    attn = (softmax or masked_softmax)(scores if bias is None else scores + bias, policy)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a gradient over the dims that broadcasting expanded to `shape`."""
    lead = grad.dim() - len(shape)
    dims = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and grad.shape[lead + i] != 1)
    return grad.sum(dims, keepdim=True).reshape(shape) if dims else grad


class _GateGradient(torch.autograd.Function):
    """Identity on the output O of SDPA(q, k, v, log G + bias) whose backward adds the gradients that SDPA cannot give:
    the gate's (and an additive bias's, as the mask reaches SDPA detached). q, k and v get theirs from SDPA itself.

    With m_i the row's maximum score over open entries, Z_i = sum_j exp(s_ij - m_i) G_ij, P_ij = exp(min(s_ij, m_i)
    - m_i) / Z_i (so the weights are A = P G), dA = dO V^T and delta_i = sum_j A_ij dA_ij = dO_i . O_i:
        dG = P (dA - delta),    dS = A (dA - delta) = dG G    (the bias),
    i.e. `masked_softmax`'s gradients, closed exponents capped at the kept maximum (the gate's tangent <= 1/Z).
    """

    @staticmethod
    def forward(ctx, out, q, k, v, policy, bias, scale):
        ctx.save_for_backward(out, q, k, v, policy, bias)
        ctx.scale = scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        out, q, k, v, policy, bias = ctx.saved_tensors
        need_policy, need_bias = ctx.needs_input_grad[4], bias is not None and ctx.needs_input_grad[5]
        if not (need_policy or need_bias):
            return grad_out, None, None, None, None, None, None
        b, n = q.shape[0], q.shape[-2]
        acc = torch.promote_types(q.dtype, torch.float32)  # fp32 at least, as masked_softmax
        gate = _attention_gate(policy, n).to(acc)
        keep = policy.reshape(b, 1, n, 1).to(acc)
        # One block's [B, H, N, N] buffers, only during this backward, updated in place.
        s = (q.to(acc) * ctx.scale) @ k.to(acc).transpose(-2, -1)
        if bias is not None:
            s = s + bias.to(acc)
        row_max = s.masked_fill(gate == 0, float("-inf")).amax(dim=-1, keepdim=True)
        p = s.sub_(row_max).clamp_max_(0.0).exp_()  # open entries are <= the max already: the cap only closes
        z = p @ keep + p.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * (1.0 - keep)  # sum_j p_ij G_ij
        do = grad_out.to(acc)
        delta = (do * out.to(acc)).sum(dim=-1, keepdim=True)
        g = p.mul_(((do / z) @ v.to(acc).transpose(-2, -1)).sub_(delta / z))  # dG per head
        grad_policy = grad_bias = None
        if need_policy:
            g_heads = g.sum(dim=1)  # G is shared by the heads; G_jj = 1 does not depend on the policy
            grad_keep = g_heads.sum(dim=-2) - g_heads.diagonal(dim1=-2, dim2=-1)
            grad_policy = grad_keep.reshape(policy.shape).to(policy.dtype)
        if need_bias:
            grad_bias = _sum_to(g.mul_(gate), bias.shape).to(bias.dtype)
        return grad_out, None, None, None, grad_policy, grad_bias, None


def fused_masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    policy: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """`masked_attention` without dropout, through SDPA: same values (up to SDPA's rounding) and gradients (in fp32),
    without keeping [B, H, N, N] weights for the backward.

    Args:
        q, k, v: [B, H, N, d], any float dtype (their gradients are SDPA's; the gate's is computed in fp32).
        policy: [B, N, 1] keep policy.
        attn_mask: additive or boolean (True = attend) mask broadcastable to [B, H, N, N]; every query must keep
            one open key.
        scale: score scale, 1/sqrt(d) by default.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bias = _additive(attn_mask, torch.float32)
    mask = _attention_gate(policy.detach(), q.shape[-2]).log()  # 0 open, -inf closed: no row is all -inf
    if bias is not None:
        mask = mask + bias.detach()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=scale)
    if policy.requires_grad or (bias is not None and bias.requires_grad):
        out = _GateGradient.apply(out, q, k, v, policy, bias, scale)
    return out


@one_call
def masked_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    policy: torch.Tensor | None,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    softmax: Callable | None = None,
    **kwargs,
) -> torch.Tensor:
    """Drop-in for `F.scaled_dot_product_attention` that also takes the keep policy.

    With a policy, `attn_mask` (additive, e.g. a relative position bias, or boolean, True = attend) is combined with
    the keep gate: A_ij = exp(a_ij + b_ij) G_ij / sum_k exp(a_ik + b_ik) G_ik (docs/design.md §2.3).
    Attention dropout needs the weights, so it takes the explicit path; otherwise the fused one. `softmax` replaces
    the masked softmax of the explicit path (cross-attention from queries that are not tokens: `tokenops`).
    """
    if policy is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs
        )
    if is_causal or kwargs.get("enable_gqa"):
        # The rewrite refuses such blocks; this guards direct calls.
        raise NotImplementedError("masked_sdpa does not combine the keep policy with is_causal or GQA")
    if softmax is not None:
        return masked_attention(q, k, v, policy, attn_mask=attn_mask, scale=scale, dropout_p=dropout_p, softmax=softmax)
    if dropout_p > 0.0:
        return masked_attention(q, k, v, policy, attn_mask=attn_mask, scale=scale, dropout_p=dropout_p)
    return fused_masked_attention(q, k, v, policy, attn_mask=attn_mask, scale=scale)


@one_call
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
    dropout_p = mha.dropout if mha.training else 0.0
    if dropout_p > 0.0:
        out = masked_attention(q, k, v, policy, dropout_p=dropout_p)
    else:
        out = fused_masked_attention(q, k, v, policy)
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
