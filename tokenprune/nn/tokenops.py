"""Token bookkeeping that the graph pass inserts after the first stage (docs/design.md §2.3, "following tokens").

Every value that carries tokens after a stage belongs to a *token set*: the chain's tokens, or a set derived from
them by slicing the token axis (``x[:, 1:]``) or concatenating along it (``cat([cls, x])``). A token set has, at run
time, a keep ``policy`` [B, n, 1] (masked execution; None in pruned execution) and an ``index`` [B, n] (pruned
execution: each token's position in the set's full-length sequence; None in masked execution). These functions
derive both for derived sets and use them:

- `gather_positions` restricts a position-indexed constant (relative position bias, rotary embedding) to the tokens
  that are left in pruned execution, and leaves it whole in masked execution;
- `masked_cross_softmax` / `masked_cross_attention` are attention whose keys are tokens but whose queries are not
  (class attention, attention pooling): dropped keys get no weight in masked execution;
- `masked_token_sum` sums kept tokens only;
- `refill` gives a head that needs every token (a dense-prediction head that reshapes tokens into a map) the whole
  token set back: kept tokens at their current values, dropped ones with the values they had when they were dropped.

Each takes the policy or index and falls back to the plain operation when it is None.
"""

from __future__ import annotations

import torch

from .leaf import one_call
from .masked import gated_softmax, masked_sdpa

__all__ = [
    "slice_policy",
    "slice_index",
    "cat_policy",
    "cat_index",
    "gather_positions",
    "masked_cross_softmax",
    "masked_cross_attention",
    "masked_token_sum",
    "zero_dropped",
    "masked_token_mean",
    "refill",
]


@one_call
def slice_policy(policy: torch.Tensor | None, start: int, stop: int | None) -> torch.Tensor | None:
    """The keep policy of ``x[:, start:stop]`` (the slice's bounds lie in the never-pruned prefix, or stop is None)."""
    return None if policy is None else policy[:, start:stop]


@one_call
def slice_index(index: torch.Tensor | None, start: int, stop: int | None) -> torch.Tensor | None:
    """The positions of ``x[:, start:stop]``'s tokens in the slice's own full-length sequence."""
    return None if index is None else index[:, start:stop] - start


@one_call
def cat_policy(batch_like: torch.Tensor, parts: list) -> torch.Tensor | None:
    """Keep policy of a concatenation along the token axis; `parts` is a list of (policy or None, count, is_tokens).

    Operands that are not pruned tokens (a class token added after the chain) are always kept.
    """
    if all(p is None for p, _, tokens in parts if tokens):
        return None
    b = batch_like.shape[0]
    pieces = [
        p if tokens else torch.ones(b, count, 1, device=batch_like.device, dtype=batch_like.dtype)
        for p, count, tokens in parts
    ]
    return torch.cat([p.to(batch_like.dtype) for p in pieces], dim=1)


@one_call
def cat_index(batch_like: torch.Tensor, parts: list) -> torch.Tensor | None:
    """Positions of a concatenation's tokens in its full-length sequence; `parts` as in `cat_policy`, with
    (index or None, full-length count, is_tokens) and each part's *current* length read from the index."""
    if all(i is None for i, _, tokens in parts if tokens):
        return None
    b, offset, pieces = batch_like.shape[0], 0, []
    for index, count, tokens in parts:
        if tokens:
            pieces.append(index + offset)
        else:
            pieces.append(torch.arange(offset, offset + count, device=batch_like.device).expand(b, count))
        offset += count
    return torch.cat(pieces, dim=1)


@one_call
def gather_positions(value: torch.Tensor, index: torch.Tensor | None, dims: tuple[int, ...], rank: int) -> torch.Tensor:
    """Restrict a position-indexed constant to the tokens left in pruned execution.

    Args:
        value: a tensor that does not depend on the tokens, broadcast against a tensor of rank `rank` whose dims
            `dims` (counted in that rank, batch first) are token axes.
        index: [B, n] positions of the tokens left, or None (masked execution: the constant is used whole).
        dims: the token dims of the broadcast result.
        rank: the rank `value` is broadcast to.

    Returns:
        `value` itself when `index` is None, else a [B, ...] tensor holding, per sample, the rows of the tokens left
        along each of `dims`.
    """
    if index is None:
        return value
    value = value.reshape((1,) * (rank - value.dim()) + tuple(value.shape))
    b, n = index.shape
    value = value.expand(b, *value.shape[1:])
    for d in dims:
        shape = [1] * rank
        shape[0], shape[d] = b, n
        idx = index.reshape(shape).expand(*value.shape[:d], n, *value.shape[d + 1 :])
        value = value.gather(d, idx)
    return value


def _key_gate(policy: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """[B, 1, ..., 1, N] gate over the keys (the last dim of `scores`), broadcastable to `scores`."""
    n = scores.shape[-1]
    return policy.reshape(policy.shape[0], *([1] * (scores.dim() - 2)), n).float()


@one_call
def masked_cross_softmax(scores: torch.Tensor, policy: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """Softmax over keys that are tokens, for queries that are not (class attention, attention pooling).

    Dropped keys get weight 0: A_ij = exp(a_ij) D_j / sum_k exp(a_ik) D_k, in fp32, with the same bounded gate
    tangent as the self-attention mask (`masked.gated_softmax`). At least one patch token is always kept, so no row
    is empty.
    """
    if policy is None:
        return scores.softmax(dim=dim)
    if dim not in (-1, scores.dim() - 1):
        raise ValueError(f"masked_cross_softmax expects the key dimension last, got dim={dim}")
    return gated_softmax(scores, _key_gate(policy, scores))


@one_call
def masked_cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, policy: torch.Tensor | None, *args, **kwargs
) -> torch.Tensor:
    """Drop-in for `F.scaled_dot_product_attention` whose keys and values are tokens and whose queries are not."""
    return masked_sdpa(q, k, v, policy, *args, softmax=masked_cross_softmax, **kwargs)


def _policy_like(x: torch.Tensor, policy: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[0], shape[dim] = policy.shape[0], policy.shape[1]
    return policy.reshape(shape).to(x.dtype)


@one_call
def zero_dropped(x: torch.Tensor, policy: torch.Tensor | None, dim: int) -> torch.Tensor:
    """`x` with dropped tokens (along `dim`) set to zero: a contraction over tokens then sums kept tokens only."""
    return x if policy is None else x * _policy_like(x, policy, dim)


@one_call
def masked_token_sum(x: torch.Tensor, policy: torch.Tensor | None, dim: int = 1, keepdim: bool = False) -> torch.Tensor:
    """Sum over the token dimension `dim` of kept tokens only."""
    if policy is None:
        return x.sum(dim=dim, keepdim=keepdim)
    return (x * _policy_like(x, policy, dim)).sum(dim=dim, keepdim=keepdim)


@one_call
def masked_token_mean(
    x: torch.Tensor, policy: torch.Tensor | None, dim: int = 1, keepdim: bool = False
) -> torch.Tensor:
    """Mean over the token dimension `dim` of kept tokens only (heads that average tokens)."""
    if policy is None:
        return x.mean(dim=dim, keepdim=keepdim)
    weight = _policy_like(x, policy, dim)
    return (x * weight).sum(dim=dim, keepdim=keepdim) / weight.sum(dim=dim, keepdim=keepdim).clamp_min(1.0)


@one_call
def refill(
    canvas: torch.Tensor | None, x: torch.Tensor, policy: torch.Tensor | None, index: torch.Tensor | None
) -> torch.Tensor:
    """The full token set [B, N, C]: `x`'s live tokens written over `canvas` (docs/design.md §2.7).

    Args:
        canvas: full-length tokens holding each dropped token's value from when it was dropped (None before the
            first stage).
        x: the tokens now: full-length in masked execution, the kept ones [B, n, C] in pruned execution.
        policy: keep policy [B, N, 1] of `x` (masked execution) or None.
        index: positions [B, n] of `x`'s tokens in the full sequence (pruned execution) or None.
    """
    if canvas is None or (policy is None and index is None):
        return x
    if policy is not None:
        return x * policy + canvas * (1.0 - policy)
    return canvas.scatter(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)
