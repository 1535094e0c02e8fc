"""Token rules for the recognised token mixers: reductions over tokens, softmax, contractions, attention.

Each rule reads the arguments that decide whether its op mixes tokens in a way the masked execution can restrict to
kept tokens, and returns the `Rewrite` that does so (or token-wise, when the op does not touch the token axis).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ...nn import tokenops
from ...nn.leaf import one_call
from ...nn.masked import masked_mha, masked_sdpa, masked_softmax, supports_masked_mha
from .effects import Effect, Mask, Policy, Refused, Rewrite, Tokens
from .token_rules import Values, _dim, _shape, arg

__all__ = ["reduction", "softmax", "matmul", "sdpa", "mha", "masked_softmax_single_head"]

_SDPA_ARGS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


_REDUCTIONS = {"mean": tokenops.masked_token_mean, "sum": tokenops.masked_token_sum}


def reduction(values: Values, node: fx.Node) -> Effect:
    """A mean or sum over one token axis counts kept tokens only; over other dims it is token-wise."""
    t = values.data_arg(node)
    rank = len(_shape(node.args[0]))
    dim = arg(node, 1, "dim")
    keepdim = arg(node, 2, "keepdim", False)
    dims = list(range(rank)) if dim is None else [_dim(d, rank) for d in (dim if isinstance(dim, (list, tuple))
                                                                           else [dim])]  # fmt: skip
    reduced = [d for d in dims if d in t.axes]
    name = node.target if isinstance(node.target, str) else node.target.__name__
    rewrite = None
    if reduced:
        if len(reduced) != 1 or len(dims) != 1:
            raise Refused("reduces over the token axis together with other dims; only a mean or sum over tokens "
                          "alone can be restricted to kept tokens")  # fmt: skip
        rewrite = Rewrite(
            _REDUCTIONS[name], (node.args[0], Policy(t.tset), reduced[0], keepdim), {},
            f"{node.name}: {name} over tokens counts kept tokens only",
        )  # fmt: skip
    axes = tuple(a - (0 if keepdim else sum(1 for d in dims if d < a)) for a in t.axes if a not in dims)
    return Effect(Tokens(axes, t.tset) if axes else None, rewrite)


def softmax(values: Values, node: fx.Node) -> Effect:
    """Over a non-token dim: token-wise. Over tokens in the last dim: attention weights over token keys, masked
    (self-attention when the queries are the same tokens). Over tokens in any other dim: refused."""
    t = values.data_arg(node)
    rank = len(_shape(node.args[0]))
    dim = values.module(node).dim if node.op == "call_module" else arg(node, 1, "dim")
    if dim is None:
        raise Refused("is a softmax without an explicit dim")
    dim = _dim(dim, rank)
    if dim not in t.axes:
        return Effect(Tokens(t.axes, t.tset))
    if dim != rank - 1:
        raise Refused(f"is a softmax over tokens in dim {dim}, not the last dim (keys)")
    if rank - 2 in t.axes:
        if rank not in (3, 4):
            raise Refused(f"is a softmax over [.., N, N] token scores of rank {rank}; masked attention takes [B, N, N] "
                          "or [B, heads, N, N]")  # fmt: skip
        fn, kind = (masked_softmax, "softmax") if rank == 4 else (masked_softmax_single_head, None)
        rewrite = Rewrite(fn, (node.args[0], Policy(t.tset)), {}, f"{node.name}: attention softmax masked", kind)
    else:
        note = f"{node.name}: attention over token keys (queries are not tokens) masked"
        rewrite = Rewrite(tokenops.masked_cross_softmax, (node.args[0], Policy(t.tset)), {}, note)
    return Effect(Tokens(t.axes, t.tset, weights=True), rewrite)


@one_call
def masked_softmax_single_head(scores: torch.Tensor, policy: torch.Tensor | None) -> torch.Tensor:
    """`masked_softmax` for scores without a heads dim, [B, N, N] (it gates [B, heads, N, N])."""
    return masked_softmax(scores.unsqueeze(1), policy).squeeze(1)


def matmul(values: Values, node: fx.Node) -> Effect:
    """Contracting token axes of both operands (the same tokens): attention weights times values, or a sum over
    tokens whose dropped terms are zeroed. Contracting tokens with anything else mixes them: refused."""
    a, b = node.args[:2]
    ta, tb = values.tokens(a), values.tokens(b)
    ra, rb = len(_shape(a)), len(_shape(b))
    rank = len(_shape(node))
    contract_a = ta is not None and ra - 1 in ta.axes
    contract_b = tb is not None and rb - 2 in tb.axes
    if contract_a != contract_b or (contract_a and ta.tset is not tb.tset):
        raise Refused("contracts a token axis with one that is not the same tokens")
    masks = ()
    if contract_a and not ta.weights:
        # A sum over tokens (attention weights that are not a masked softmax's, e.g. talking heads after the softmax,
        # or a cross-covariance q^T k): zero the dropped tokens of the right operand, so it sums kept tokens only,
        # as pruned execution does.
        masks = (Mask(b, tb.tset, rb - 2),)
    found = []
    for t, r, keep in ((ta, ra, ra - 2), (tb, rb, rb - 1)):
        if t is None:
            continue
        for d in t.axes:
            if d == keep:
                found.append((rank - 2 if t is ta else rank - 1, t.tset))
            elif d < r - 2:
                found.append((d + rank - r, t.tset))
    merged = values.merge(found)
    if merged is None:
        return Effect(None, masks=masks)
    gathers = ()
    for x in (a, b):
        if values.tokens(x) is None:
            gathers += values.constants_meet(rank, tuple(d for d in merged[0] if d < rank - 2), merged[1], [x])
    return Effect(Tokens(*merged), None, gathers, masks)


def sdpa(values: Values, node: fx.Node) -> Effect:
    """Self-attention (or attention over token keys) masked; causal or grouped-query attention refused."""
    q, k, v, *rest = node.args
    kwargs = dict(zip(_SDPA_ARGS, rest, strict=False), **node.kwargs)
    tq, tk, tv = values.tokens(q), values.tokens(k), values.tokens(v)
    rank = len(_shape(q))
    if tk is None or tv is None or tk.axes != (rank - 2,) or tv.axes != (rank - 2,) or tk.tset is not tv.tset:
        raise Refused("is attention whose keys and values are not the same tokens")
    if kwargs.get("is_causal"):
        raise Refused("is causal attention; a causal order is not defined once tokens are pruned")
    if kwargs.get("enable_gqa"):
        raise Refused("uses grouped-query attention, which the masked attention does not support")
    mask = kwargs.get("attn_mask")
    self_attention = tq is not None and tq.axes == (rank - 2,) and tq.tset is tk.tset
    if tq is not None and not self_attention:
        raise Refused("is attention between two different token sets")
    gathers = ()
    if isinstance(mask, fx.Node):
        if values.has_tokens(mask):
            raise Refused("takes an attention mask computed from the tokens")
        dims = (rank - 2, rank - 1) if self_attention else (rank - 1,)
        gathers = values.constants_meet(rank, dims, tk.tset, [mask])
    if self_attention:
        note = f"{node.name}: self-attention masked" + (" (with its bias)" if mask else "")
        rewrite = Rewrite(masked_sdpa, (q, k, v, Policy(tk.tset)), kwargs, note, "sdpa")
        return Effect(Tokens((rank - 2,), tq.tset), rewrite, gathers)
    rewrite = Rewrite(tokenops.masked_cross_attention, (q, k, v, Policy(tk.tset)), kwargs,
                      f"{node.name}: attention over token keys masked")  # fmt: skip
    return Effect(None, rewrite, gathers)


def mha(values: Values, node: fx.Node) -> Effect:
    """nn.MultiheadAttention called as self-attention mha(x, x, x) without masks: masked."""
    m = values.module(node)
    query, key, value, *rest = node.args
    why = supports_masked_mha(m)
    masks = any(node.kwargs.get(k) is not None for k in ("attn_mask", "key_padding_mask"))
    if not (query is key is value) or rest or masks:
        why = why or "it is not called as self-attention mha(x, x, x) without masks"
    t = values.tokens(query)
    if why is not None or t is None or t.axes != (1,):
        raise Refused(f"cannot be masked: {why or 'tokens not on dim 1'}")
    rewrite = Rewrite(masked_mha, (("get_attr", node.target), query, key, value, Policy(t.tset)), node.kwargs,
                      f"{node.target}: self-attention masked", "mha")  # fmt: skip
    return Effect((Tokens((1,), t.tset), None), rewrite)
