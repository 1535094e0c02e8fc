"""Token rules: for one node, read the arguments that decide what it does to the token axis and return an `Effect`.

Each function takes the walk's `Values` (what every earlier node carries) and the node, and returns an `Effect` or
raises `Refused`. The table (`rules/table.py`) says which op each function serves.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ...nn import tokenops
from ...nn.masked import masked_mha, masked_sdpa, masked_softmax, supports_masked_mha
from .._graph import node_shape
from .effects import Effect, Gather, Mask, Policy, Refused, Rewrite, Tokens, TokenSet

__all__ = ["Values"]

ALONG_TOKENS = "mixes the token axis (a channel-wise op applied along tokens, e.g. token-mixing MLP)"
_SDPA_ARGS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _dim(d: int, rank: int) -> int:
    return d % rank if rank else d


def arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    """The argument passed by position `index` or keyword `name` (a method's `self` is position 0)."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _shape(node: object) -> tuple[int, ...]:
    shape = node_shape(node)
    if shape is None:
        raise Refused("has a token value without a recorded shape")
    return shape


class Values:
    """What the walk knows so far: for each node, the `Tokens` it carries (or a tuple of them, or None)."""

    def __init__(self, gm: fx.GraphModule, info: dict[fx.Node, object]) -> None:
        self.gm, self.info = gm, info

    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)

    def tokens(self, a: object) -> Tokens | None:
        v = self.info.get(a) if isinstance(a, fx.Node) else None
        return v if isinstance(v, Tokens) else None

    def has_tokens(self, a: object) -> bool:
        if isinstance(a, fx.Node):
            v = self.info.get(a)
            return v is not None and (isinstance(v, Tokens) or any(p is not None for p in v))
        if isinstance(a, (list, tuple)):
            return any(self.has_tokens(x) for x in a)
        if isinstance(a, dict):
            return any(self.has_tokens(x) for x in a.values())
        return False

    def data_arg(self, node: fx.Node) -> Tokens:
        """The tokens of the node's first argument, which must be the only one carrying tokens."""
        t = self.tokens(node.args[0]) if node.args else None
        if t is None or any(self.has_tokens(a) for a in node.args[1:]) or self.has_tokens(node.kwargs):
            raise Refused("takes tokens in an argument other than its input")
        return t

    def merge(self, found: list[tuple[int, TokenSet]]) -> tuple[tuple[int, ...], TokenSet] | None:
        if not found:
            return None
        tset = found[0][1]
        if any(t is not tset for _, t in found):
            raise Refused("combines tokens of different token sets on one axis")
        return tuple(sorted({d for d, _ in found})), tset

    def constants_meet(self, out_rank: int, axes: tuple[int, ...], tset: TokenSet, operands) -> tuple[Gather, ...]:
        """Values without tokens broadcast against token axes: size 1 there, or full length (gathered)."""
        gathers = []
        for a in operands:
            if not isinstance(a, fx.Node) or self.has_tokens(a):
                continue
            shape = node_shape(a)
            if shape is None:
                continue
            offset = out_rank - len(shape)
            dims = []
            for d in axes:
                j = d - offset
                if j < 0 or shape[j] == 1:
                    continue
                if shape[j] != tset.size:
                    raise Refused(f"combines tokens with {a.name} of shape {list(shape)} along the token axis")
                dims.append(d)
            if dims:
                gathers.append(Gather(a, tset, tuple(dims), out_rank))
        return tuple(gathers)


# -- reads that carry no tokens --------------------------------------------------------------------------------------
def metadata(values: Values, node: fx.Node) -> Effect:
    return Effect(None)


# -- element-wise ----------------------------------------------------------------------------------------------------
_KEEPS_ZEROS = {operator.mul, torch.mul, F.dropout, "mul", "to", "float"}


def elementwise(values: Values, node: fx.Node) -> Effect:
    """Every tensor operand broadcast against the others: token axes line up; constants meeting them are gathered."""
    shape = node_shape(node)
    if shape is None:
        raise Refused("has a token input but no tensor output")
    rank = len(shape)
    operands = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
    found, weights = [], []
    for a in operands:
        t = values.tokens(a)
        if t is None:
            if values.has_tokens(a):
                raise Refused("takes several token values packed in one argument")
            continue
        offset = rank - len(_shape(a))
        found += [(d + offset, t.tset) for d in t.axes]
        weights.append(t.weights)
    axes, tset = values.merge(found)
    gathers = values.constants_meet(rank, axes, tset, operands)
    keeps_zeros = node.target in _KEEPS_ZEROS
    if node.op == "call_module":
        keeps_zeros = isinstance(values.module(node), (nn.Dropout, nn.Identity))
    return Effect(Tokens(axes, tset, all(weights) and len(weights) == 1 and keeps_zeros), gathers=gathers)


def glu(values: Values, node: fx.Node) -> Effect:
    """GLU halves `dim` and gates one half by the other: per token unless `dim` indexes tokens."""
    t = values.data_arg(node)
    rank = len(_shape(node.args[0]))
    dim = values.module(node).dim if node.op == "call_module" else arg(node, 1, "dim", -1)
    if _dim(dim, rank) in t.axes:
        raise Refused(f"mixes the token axis (gates over dim {dim}, which indexes tokens: it pairs tokens)")
    return Effect(Tokens(t.axes, t.tset))


# -- channel ops: act on the last dims only --------------------------------------------------------------------------
def _over_last(values: Values, node: fx.Node, count: int) -> Effect:
    t = values.data_arg(node)
    rank = len(_shape(node.args[0]))
    if any(a >= rank - count for a in t.axes):
        raise Refused(ALONG_TOKENS)
    return Effect(Tokens(t.axes, t.tset))


def linear(values: Values, node: fx.Node) -> Effect:
    return _over_last(values, node, 1)


def _normalized_count(node: fx.Node, values: Values) -> int:
    if node.op == "call_module":
        return len(values.module(node).normalized_shape)
    shape = arg(node, 1, "normalized_shape")
    return 1 if isinstance(shape, int) else len(shape)


def layer_norm(values: Values, node: fx.Node) -> Effect:
    """Normalises over its `normalized_shape`, the last dims: per token unless those hold a token axis."""
    return _over_last(values, node, _normalized_count(node, values))


def normalize(values: Values, node: fx.Node) -> Effect:
    """F.normalize divides by a norm over `dim` (default 1): per token unless `dim` indexes tokens."""
    t = values.data_arg(node)
    rank = len(_shape(node.args[0]))
    dim = arg(node, 2, "dim", 1)
    if _dim(dim, rank) in t.axes:
        raise Refused(f"mixes the token axis (normalises over dim {dim}, which indexes tokens)")
    return Effect(Tokens(t.axes, t.tset))


# -- layout: permutes, transposes, reshapes --------------------------------------------------------------------------
def _permuted(t: Tokens, dims: list[int]) -> Effect:
    rank = len(dims)
    return Effect(Tokens(tuple(sorted(dims.index(a) for a in t.axes)), t.tset, t.weights and dims[-1] == rank - 1))


def permute(values: Values, node: fx.Node) -> Effect:
    t = values.data_arg(node)
    dims = node.kwargs.get("dims", node.args[1:] if node.op == "call_method" else node.args[1])
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    return _permuted(t, [_dim(int(d), len(dims)) for d in dims])


def _swapped(t: Tokens, rank: int, a: int, b: int) -> Effect:
    dims = list(range(rank))
    dims[a], dims[b] = b, a
    return _permuted(t, dims)


def transpose(values: Values, node: fx.Node) -> Effect:
    t = values.data_arg(node)
    rank = len(_shape(node.args[0]))
    return _swapped(t, rank, _dim(int(arg(node, 1, "dim0")), rank), _dim(int(arg(node, 2, "dim1")), rank))


def last_two_swapped(values: Values, node: fx.Node) -> Effect:
    """`.mT`, `.mH`: the last two dims swapped (conjugated for .mH: element-wise)."""
    t = values.data_arg(node)
    rank = len(_shape(node.args[0]))
    if rank < 2:
        raise Refused("transposes a value of rank below 2")
    return _swapped(t, rank, rank - 2, rank - 1)


def reversed_dims(values: Values, node: fx.Node) -> Effect:
    """`.T`, `.H`: every dim reversed."""
    t = values.data_arg(node)
    return _permuted(t, list(range(len(_shape(node.args[0]))))[::-1])


def same_value(values: Values, node: fx.Node) -> Effect:
    """`.real` of a real tensor, `.data`: the same elements."""
    t = values.data_arg(node)
    return Effect(Tokens(t.axes, t.tset, t.weights))


_FIXED_SHAPE = {("call_method", "reshape"), ("call_method", "view"), ("call_function", torch.reshape)}


def reshape(values: Values, node: fx.Node) -> Effect:
    """A token axis survives a reshape when the elements before it and the axis itself are unchanged (the target
    shape, read from the traced shapes, decides); a target that pins the token count is refused."""
    t = values.data_arg(node)
    shape_in, shape_out = _shape(node.args[0]), _shape(node)
    axes = []
    for a in t.axes:
        before = math.prod(shape_in[:a])
        match = [d for d in range(len(shape_out)) if math.prod(shape_out[:d]) == before and
                 shape_out[d] == shape_in[a]]  # fmt: skip
        if not match:
            raise Refused(
                f"reshapes the token axis ({list(shape_in)} -> {list(shape_out)}), e.g. into a 2-D grid for a "
                "convolution; pruned tokens leave no grid"
            )
        d = match[0]
        if (node.op, node.target) in _FIXED_SHAPE:
            packed = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
            target = node.args[1] if packed else node.args[1:]
            if len(target) > d and isinstance(target[d], int) and target[d] == shape_in[a] != 1:
                raise Refused(f"reshapes to a fixed token count {shape_in[a]}; it must follow x.shape")
        axes.append(d)
    last = len(shape_in) - 1
    weights = t.weights and shape_in[-1] == shape_out[-1] and last in t.axes
    return Effect(Tokens(tuple(axes), t.tset, weights))


# -- indexing, slicing, concatenation: may derive a token set --------------------------------------------------------
def getitem(values: Values, node: fx.Node) -> Effect:
    src, index = node.args
    v = values.info.get(src)
    if isinstance(v, tuple):
        return Effect(v[index])
    t = values.tokens(src)
    if values.has_tokens(index):
        raise Refused("indexes with a token tensor")
    rank = len(_shape(src))
    items = list(index) if isinstance(index, tuple) else [index]
    if any(i is Ellipsis for i in items):
        e = items.index(Ellipsis)
        used = sum(1 for i in items if i is not None and i is not Ellipsis)
        items[e : e + 1] = [slice(None)] * (rank - used)
    items += [slice(None)] * (rank - sum(1 for i in items if i is not None))
    axes, out, d, tset = [], 0, 0, t.tset
    for item in items:
        if item is None:
            out += 1
            continue
        if isinstance(item, fx.Node) or not isinstance(item, (int, slice)):
            if d in t.axes:
                raise Refused("indexes the token axis with a tensor")
            out, d = out + 1, d + 1
            continue
        if d in t.axes:
            if isinstance(item, int):
                if not 0 <= item < t.tset.prefix:
                    raise Refused(f"picks token {item}, which is not a never-pruned prefix token")
                d += 1
                continue
            if item != slice(None):
                tset = _slice_set(t.tset, item)
            axes.append(out)
        out, d = out + (isinstance(item, slice)), d + 1
    if not axes:
        return Effect(None)
    return Effect(Tokens(tuple(axes), tset, t.weights and axes[-1] == out - 1 and tset is t.tset))


def _slice_set(tset: TokenSet, s: slice) -> TokenSet:
    start, stop = s.start or 0, s.stop
    ok = s.step in (None, 1) and isinstance(start, int) and 0 <= start <= tset.prefix
    ok = ok and (stop is None or (isinstance(stop, int) and 0 <= stop <= tset.prefix))
    if not ok:
        raise Refused(
            f"slices the token axis at [{s.start}:{s.stop}]; only bounds inside the never-pruned prefix "
            f"({tset.prefix} tokens) stay the same tokens when tokens are pruned"
        )
    if start == 0 and stop is None:
        return tset
    size = (stop if stop is not None else tset.size) - start
    return TokenSet(size, max(0, tset.prefix - start) if stop is None else size, ("slice", tset, start, stop))


def cat(values: Values, node: fx.Node) -> Effect:
    """Along a token axis: a derived token set (or the parent, for consecutive slices rebuilding it); along another
    axis: element-wise."""
    tensors = arg(node, 0, "tensors")
    rank = len(_shape(node))
    dim = _dim(arg(node, 1, "dim", 0), rank)
    infos = [values.tokens(a) for a in tensors]
    if any(values.has_tokens(a) and i is None for a, i in zip(tensors, infos)):
        raise Refused("concatenates token values it cannot follow")
    if not any(i is not None and dim in i.axes for i in infos):
        found = [(d, i.tset) for i in infos if i is not None for d in i.axes]
        axes, tset = values.merge(found)
        return Effect(Tokens(axes, tset), gathers=values.constants_meet(rank, axes, tset, tensors))
    parts = []
    for a, i in zip(tensors, infos):
        count = _shape(a)[dim]
        if i is not None and dim in i.axes:
            if any(d != dim for d in i.axes):
                raise Refused("concatenates values with tokens on several axes")
            parts.append((i.tset, count))
        elif i is None:
            parts.append((None, count))
        else:
            raise Refused("concatenates token values along a different axis than their tokens")
    return Effect(Tokens((dim,), _canonical_cat(node, parts)))


def _canonical_cat(node: fx.Node, parts: list) -> TokenSet:
    """A concatenation of consecutive slices that rebuilds their parent is the parent (rotary embeddings split
    prefix and patch tokens and put them back)."""
    origins = [p.origin for p, _ in parts if p is not None]
    if all(p is not None for p, _ in parts) and all(o[0] == "slice" for o in origins):
        parent = origins[0][1]
        bounds = [(o[2], o[3]) for o in origins]
        if (
            all(o[1] is parent for o in origins)
            and bounds[0][0] == 0
            and bounds[-1][1] is None
            and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        ):
            return parent
    prefix = 0
    for p, count in parts:
        if p is not None:
            prefix += p.prefix
            break
        prefix += count
    return TokenSet(sum(c for _, c in parts), prefix, ("cat", node, tuple(parts)))


def stack(values: Values, node: fx.Node) -> Effect:
    tensors = arg(node, 0, "tensors")
    rank = len(_shape(node))
    dim = _dim(arg(node, 1, "dim", 0), rank)
    found = []
    for a in tensors:
        t = values.tokens(a)
        if t is None:
            if isinstance(a, fx.Node) and node_shape(a) is not None:
                raise Refused("stacks tokens with a value that is not tokens")
            continue
        found += [(d + (d >= dim), t.tset) for d in t.axes]
    axes, tset = values.merge(found)
    return Effect(Tokens(axes, tset))


def split(values: Values, node: fx.Node) -> Effect:
    """unbind/chunk/split/tensor_split of a dim other than the token axis: each part carries the tokens."""
    t = values.data_arg(node)
    rank = len(_shape(node.args[0]))
    dim = _dim(arg(node, 1, "dim", 0) if node.target == "unbind" else arg(node, 2, "dim", 0), rank)
    if dim in t.axes:
        raise Refused("splits the token axis")
    axes = tuple(d - (d > dim) for d in t.axes) if node.target == "unbind" else t.axes
    metas = node.meta.get("tensor_meta")
    if not isinstance(metas, (tuple, list)):
        raise Refused("splits tokens into an unknown number of parts")
    return Effect(tuple(Tokens(axes, t.tset) for _ in metas))


# -- recognised mixers -----------------------------------------------------------------------------------------------
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
        raise Refused(f"(nn.MultiheadAttention) cannot be masked: {why or 'tokens not on dim 1'}")
    rewrite = Rewrite(masked_mha, (("get_attr", node.target), query, key, value, Policy(t.tset)), node.kwargs,
                      f"{node.target}: self-attention masked", "mha")  # fmt: skip
    return Effect((Tokens((1,), t.tset), None), rewrite)


def per_sample_scaler(values: Values, node: fx.Node) -> Effect:
    """Output = input x one scalar per sample (drop path): every token of a sample scaled alike."""
    t = values.data_arg(node)
    return Effect(Tokens(t.axes, t.tset))


def module_call(values: Values, node: fx.Node) -> Effect:
    """A module the trace keeps as one call (not torch.nn's): accepted only as a proven per-sample scaler."""
    from .scaler import scaler_refusal

    m = values.module(node)
    reason = scaler_refusal(m, example_like(node.args[0]))
    if reason is not None:
        raise Refused(f"({type(m).__name__}) is kept as one call and is not known to act per token: it {reason}")
    return per_sample_scaler(values, node)


def example_like(node: object) -> torch.Tensor:
    """A zero tensor shaped like the traced value (what a module kept as a call is checked on)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if meta is None or not hasattr(meta, "shape"):
        raise Refused("is called on a value without a recorded shape")
    return torch.zeros(meta.shape, dtype=meta.dtype)
