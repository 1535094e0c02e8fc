"""Token rules: for one node, read the arguments that decide what it does to the token axis and return an `Effect`.

Each function takes the walk's `Values` (what every earlier node carries) and the node, and returns an `Effect` or
raises `Refused`. The table (`rules/table.py`) says which op each function serves; the mixers that get rewritten
(attention, softmax, contractions and reductions over tokens) are in `token_mixers.py`.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .._graph import node_shape
from .effects import Effect, Gather, Refused, Tokens, TokenSet

__all__ = ["Values"]

ALONG_TOKENS = "mixes the token axis (a channel-wise op applied along tokens, e.g. token-mixing MLP)"


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
    """Shape, rank, dtype or device: no values. A token axis's length (`x.shape[1]`, `x.size(1)`) is the number of
    tokens left, all of them in masked execution and the kept ones in pruned execution: it may set the shape of the
    same tokens (reshape, view, expand), never a value (`x.sum(1) / x.shape[1]`, `torch.arange(n)`)."""
    t = values.tokens(node.args[0]) if node.args else None
    is_size = node.target == "size" or (node.op == "call_function" and node.args[1:2] == ("shape",))
    if t is not None and is_size:
        reason = _count_as_value(node, t.axes, len(_shape(node.args[0])))
        if reason is not None:
            raise Refused(reason)
    return Effect(None)


#: Ops whose arguments after the first are a shape: a token count there sizes a token value, whose axes the reshape
#: rule checks (a constant reshaped to the token count would fail in pruned execution: the self-check refuses it).
_SHAPE_ARGS = {("call_method", m) for m in ("reshape", "view", "expand", "unflatten")} | {
    ("call_function", torch.reshape)
}
_INT_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod}


def _count_as_value(node: fx.Node, axes: tuple[int, ...], rank: int) -> str | None:
    """Why the token counts that `node` (a size read) yields are used as a value, or None when every use sets a shape.

    Follows them by the graph's users through indexing of the size, integer arithmetic and sizes concatenated. A
    size is tracked as which of its entries are token counts (True), other dims (False) or unknown (None)."""
    count = "count"
    dim = arg(node, 1, "dim") if node.target == "size" else None
    if dim is None:
        frontier: list = [(node, tuple(d in axes for d in range(rank)))]
    else:
        frontier = [(node, count)] if _dim(dim, rank) in axes else []
    while frontier:
        value, held = frontier.pop()
        if isinstance(held, tuple) and not any(h is not False for h in held):
            continue  # a size without token counts (the batch and channel dims): anything may use it
        for user in value.users:
            if (user.op, user.target) in _SHAPE_ARGS and user.args[0] is not value:
                continue
            if held is not count and user.op == "call_function" and user.target is operator.getitem:
                index = user.args[1]
                if isinstance(index, slice):
                    frontier.append((user, held[index] if held is not None else None))
                elif isinstance(index, int) and held is not None and -len(held) <= index < len(held):
                    if held[index] is not False:
                        frontier.append((user, count))
                else:
                    frontier.append((user, count))  # an entry of a size whose layout is not known: maybe a count
                continue
            if user.target in _INT_ARITHMETIC and node_shape(user) is None:
                frontier.append((user, count if held is count else _concatenated(user, value, held)))
                continue
            what = "the token count" if held is count else "a size holding the token count"
            return (
                f"uses {what} ({value.name}) as a value at {user.name}: it counts every token in masked execution "
                "and the kept ones in pruned execution (only a shape may follow it: reshape, view, expand)"
            )
    return None


def _concatenated(user: fx.Node, value: fx.Node, held: tuple | None) -> tuple | None:
    """Which entries of `size + other` (or `other + size`) are token counts; None when the other's length is not
    known here (another size)."""
    if held is None or user.target is not operator.add or len(user.args) != 2:
        return None
    left, right = user.args
    other = right if left is value else left
    if not isinstance(other, (tuple, list)) or value not in (left, right):
        return None
    return (held + (False,) * len(other)) if left is value else ((False,) * len(other) + held)


# -- element-wise ----------------------------------------------------------------------------------------------------
_KEEPS_ZEROS = {operator.mul, torch.mul, F.dropout, "mul", "float"}


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


def cast(values: Values, node: fx.Node) -> Effect:
    """A dtype or device change of its input: the input's tokens, attention weights still. Another tensor argument
    (`x.type_as(other)`, `x.to(other)`) is read for its dtype and device only: a constant cast like the tokens
    carries no tokens (it is still a constant where it meets them)."""
    t = values.tokens(node.args[0])
    if t is None:
        if values.has_tokens(node.args[0]):
            raise Refused("casts several token values packed in one argument")
        return Effect(None)
    return Effect(Tokens(t.axes, t.tset, t.weights))


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
    if isinstance(tensors, fx.Node):
        return _parts_put_back(values, node, tensors, dim, "concatenates")
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
    prefix and patch tokens and put them back). Empty parts are left out: a model without prefix tokens splits off an
    empty prefix (``x[:, :0]``) and the rest, ``x[:, 0:]``, which is the whole set."""
    parts = [(p, count) for p, count in parts if count] or parts
    if len(parts) == 1 and parts[0][0] is not None:
        return parts[0][0]
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


def _parts_put_back(values: Values, node: fx.Node, parts: fx.Node, dim: int, verb: str) -> Effect:
    """cat/stack of one value holding several parts (`torch.cat(x.chunk(2, -1), -1)`): every part carries the same
    tokens on the same axes (a split of another dim), so they are put back token-wise unless along a token axis."""
    infos = values.info.get(parts)
    if not isinstance(infos, tuple) or not infos or any(not isinstance(i, Tokens) for i in infos):
        raise Refused(f"{verb} the parts of {parts.name}, which do not all carry tokens")
    t = infos[0]
    if any(i != t for i in infos):
        raise Refused(f"{verb} parts of {parts.name} that carry tokens on different axes")
    if verb == "stacks":
        return Effect(Tokens(tuple(d + (d >= dim) for d in t.axes), t.tset))
    if dim in t.axes:
        raise Refused(f"{verb} the parts of {parts.name} along the token axis")
    return Effect(Tokens(t.axes, t.tset))


def stack(values: Values, node: fx.Node) -> Effect:
    tensors = arg(node, 0, "tensors")
    rank = len(_shape(node))
    dim = _dim(arg(node, 1, "dim", 0), rank)
    if isinstance(tensors, fx.Node):
        return _parts_put_back(values, node, tensors, dim, "stacks")
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
    unbind = node.target in ("unbind", torch.unbind)
    dim = _dim(arg(node, 1, "dim", 0) if unbind else arg(node, 2, "dim", 0), rank)
    if dim in t.axes:
        raise Refused("splits the token axis")
    axes = tuple(d - (d > dim) for d in t.axes) if unbind else t.axes
    metas = node.meta.get("tensor_meta")
    if not isinstance(metas, (tuple, list)):
        raise Refused("splits tokens into an unknown number of parts")
    return Effect(tuple(Tokens(axes, t.tset) for _ in metas))


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
        raise Refused(f"is kept as one call and is not known to act per token: it {reason}")
    return per_sample_scaler(values, node)


def example_like(node: object) -> torch.Tensor:
    """A zero tensor shaped like the traced value (what a module kept as a call is checked on)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if meta is None or not hasattr(meta, "shape"):
        raise Refused("is called on a value without a recorded shape")
    return torch.zeros(meta.shape, dtype=meta.dtype)
