"""Following the token axis through a traced graph (docs/design.md §2.3): analysis first, edits applied after.

After the first stage, every value that carries tokens is tracked with the dims that index them and the *token set*
they belong to. Each node that reads such a value is one of:

- **token-wise** (element-wise ops, Linear/LayerNorm over channels, reshapes and permutes that keep the token axis
  whole, slices of other dims): the token axes are carried to its output;
- a **recognised token mixer**, rewritten: self-attention (SDPA, a softmax over [.., N, N] scores,
  `nn.MultiheadAttention`) masks dropped tokens; attention whose keys are tokens but whose queries are not (class
  attention, attention pooling) masks dropped keys; a mean or sum over tokens counts kept tokens only; a slice or
  concatenation of the token axis derives a new token set;
- a **position-indexed constant** meeting tokens (a relative position bias, rotary embeddings, anything full-length
  that does not come from the tokens): gathered to the tokens left in pruned execution, used whole when masked;
- anything else: a refusal that names the node. Nothing is assumed token-wise without a rule.

`analyse` returns the edits; `apply` makes them. The analysis never changes the graph.
"""

from __future__ import annotations

import builtins
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from ..nn import tokenops
from ..nn.masked import masked_mha, masked_sdpa, masked_softmax, supports_masked_mha
from ._graph import node_shape
from .tracing import call_leaf

__all__ = ["TokenSet", "Tokens", "FlowPlan", "analyse", "apply"]


@dataclass(eq=False)
class TokenSet:
    """A set of tokens: the chain's, or one derived by slicing or concatenating the token axis.

    Attributes:
        size: its length at trace time (no token pruned).
        prefix: leading positions that are never pruned.
        origin: ("root",), ("slice", parent, start, stop) or ("cat", node, ((set or None, count), ...)).
    """

    size: int
    prefix: int
    origin: tuple

    def describe(self) -> str:
        return self.origin[0] if self.origin[0] != "slice" else f"slice [{self.origin[2]}:{self.origin[3]}]"


@dataclass(frozen=True)
class Tokens:
    """What a value carries: `axes` (its dims that index `tset`), and whether its last dim holds attention weights
    over kept keys only (a masked softmax's output), which may then be contracted with token values."""

    axes: tuple[int, ...]
    tset: TokenSet
    weights: bool = False


@dataclass
class FlowPlan:
    """The edits that make a graph's token mixing exact under pruning; applied by `apply`."""

    replace: list[tuple[fx.Node, object, tuple, dict]] = field(default_factory=list)
    gathers: list[tuple[fx.Node, fx.Node, TokenSet, tuple[int, ...], int]] = field(default_factory=list)
    masks: list[tuple[fx.Node, fx.Node, TokenSet, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: self-attention over the tokens, (kind, node) with kind "sdpa", "softmax" or "mha": what the attention scorer
    #: can read (`fx/token.py`).
    attention: list[tuple[str, fx.Node]] = field(default_factory=list)


@dataclass(frozen=True)
class _Policy:
    tset: TokenSet


@dataclass(frozen=True)
class _Index:
    tset: TokenSet


_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_SDPA_ARGS = ("attn_mask", "dropout_p", "is_causal", "scale")
_SHAPE_READS = {("call_method", "size"), ("call_method", "dim"), ("call_function", builtins.getattr)}
# reason: element-wise on every operand (broadcasting); token axes pass through unchanged.
_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow, operator.iadd,
    operator.imul, operator.isub, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.exp,
    torch.sqrt, torch.rsqrt, torch.sigmoid, torch.tanh, torch.relu, torch.clamp, torch.where, torch.erf, torch.abs,
    torch.square, torch.maximum, torch.minimum, F.gelu, F.relu, F.silu, F.hardswish, F.mish, F.sigmoid, F.tanh,
    F.dropout, F.softplus, F.leaky_relu, F.relu6, F.hardsigmoid, F.elu,
}  # fmt: skip
_ELEMENTWISE_METHODS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "exp", "sqrt", "rsqrt", "sigmoid", "tanh",
    "relu", "gelu", "clamp", "clamp_", "pow", "float", "half", "bfloat16", "to", "type", "type_as", "contiguous",
    "clone", "detach", "abs", "square", "masked_fill", "erf", "sign", "reciprocal",
}  # fmt: skip
_ELEMENTWISE_MODULES = (
    nn.GELU, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
    nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.GLU,
)  # fmt: skip
_CHANNEL_MODULES = (nn.Linear, nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))
_PERMUTES = {("call_method", "permute"), ("call_function", torch.permute)}
_TRANSPOSES = {("call_method", "transpose"), ("call_function", torch.transpose)}
_RESHAPES = {("call_method", "reshape"), ("call_method", "view"), ("call_function", torch.reshape)}
_FLATTENS = {("call_method", "flatten"), ("call_function", torch.flatten)}
_UNSQUEEZE = {("call_method", "unsqueeze"), ("call_function", torch.unsqueeze)}
_SQUEEZE = {("call_method", "squeeze"), ("call_function", torch.squeeze)}
_CATS = {torch.cat, getattr(torch, "concat", torch.cat), getattr(torch, "concatenate", torch.cat)}
_SPLITS = {"unbind", "chunk", "split", "tensor_split"}
_REDUCTIONS = {"mean": tokenops.masked_token_mean, "sum": tokenops.masked_token_sum}
_MATMULS = {operator.matmul, torch.matmul, torch.bmm}


_ALONG_TOKENS = "mixes the token axis (a channel-wise op applied along tokens, e.g. token-mixing MLP)"


class _Refusal(Exception):
    pass


def _shape(node: object) -> tuple[int, ...] | None:
    return node_shape(node)


def _dim(d: int, rank: int) -> int:
    return d % rank if rank else d


def _target_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", repr(t))


class _Flow:
    def __init__(self, gm: fx.GraphModule, seeds: dict[fx.Node, Tokens], tracked_leaves: set[int], where: str):
        self.gm, self.where = gm, where
        self.info: dict[fx.Node, object] = dict(seeds)
        self.plan = FlowPlan()
        self.leaves = tracked_leaves

    # -- helpers -------------------------------------------------------------------------------------------------
    def refuse(self, node: fx.Node, why: str) -> None:
        raise _Refusal(f"{node.op} {_target_name(node)!r} ({node.name}) {why}")

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

    def same(self, a: TokenSet, b: TokenSet) -> bool:
        return a is b

    def merge(self, node: fx.Node, found: list[tuple[int, TokenSet]]) -> tuple[tuple[int, ...], TokenSet] | None:
        if not found:
            return None
        tset = found[0][1]
        if any(not self.same(t, tset) for _, t in found):
            self.refuse(node, "combines tokens of different token sets on one axis")
        return tuple(sorted({d for d, _ in found})), tset

    def constants_meet(self, node: fx.Node, out_rank: int, axes: tuple[int, ...], tset: TokenSet, operands) -> None:
        """A value without tokens broadcast against token axes: size 1 there, or full length (gathered)."""
        for a in operands:
            if not isinstance(a, fx.Node) or self.has_tokens(a):
                continue
            shape = _shape(a)
            if shape is None:
                continue
            offset = out_rank - len(shape)
            dims = []
            for d in axes:
                j = d - offset
                if j < 0 or shape[j] == 1:
                    continue
                if shape[j] != tset.size:
                    self.refuse(node, f"combines tokens with {a.name} of shape {list(shape)} along the token axis")
                dims.append(d)
            if dims:
                self.plan.gathers.append((node, a, tset, tuple(dims), out_rank))

    # -- the walk ------------------------------------------------------------------------------------------------
    def run(self) -> FlowPlan:
        for node in self.gm.graph.nodes:
            if node in self.info or node.op in ("placeholder", "get_attr"):
                continue
            if node.op == "output":
                self.output(node)
                continue
            if not self.has_tokens((node.args, node.kwargs)):
                continue
            if (node.op, node.target) in _SHAPE_READS:
                continue  # shapes follow the tokens left at run time
            self.info[node] = self.visit(node)
        return self.plan

    def output(self, node: fx.Node) -> None:
        self.output_tokens = [self.tokens(a) for a in node.all_input_nodes]

    def visit(self, node: fx.Node):
        op, target = node.op, node.target
        if op == "call_module":
            return self.module(node, self.gm.get_submodule(target))
        if target is operator.getitem:
            return self.getitem(node)
        if target in _SDPA:
            return self.sdpa(node)
        if (op == "call_method" and target == "softmax") or target in (F.softmax, torch.softmax):
            return self.softmax(node)
        if target in _MATMULS or (op == "call_method" and target in ("matmul", "bmm")):
            return self.matmul(node)
        if (op, target) in _PERMUTES:
            return self.permute(node)
        if (op, target) in _TRANSPOSES:
            return self.transpose(node)
        if (op, target) in _RESHAPES or (op, target) in _FLATTENS or (op == "call_method" and target == "expand"):
            return self.reshape(node)
        if (op, target) in _UNSQUEEZE or (op, target) in _SQUEEZE:
            return self.reshape(node)
        if target in _CATS:
            return self.cat(node)
        if target is torch.stack:
            return self.stack(node)
        if op == "call_method" and target in _SPLITS:
            return self.split(node)
        if op == "call_method" and target in _REDUCTIONS or target in (torch.mean, torch.sum):
            return self.reduction(node)
        if target in (F.layer_norm, F.linear, F.normalize, F.rms_norm if hasattr(F, "rms_norm") else F.layer_norm):
            return self.channelwise(node, self.data_arg(node))
        if target in _ELEMENTWISE_FUNCTIONS or (op == "call_method" and target in _ELEMENTWISE_METHODS):
            return self.elementwise(node)
        self.refuse(node, "reads tokens and has no rule that keeps it exact when tokens are pruned")

    def data_arg(self, node: fx.Node) -> Tokens:
        t = self.tokens(node.args[0]) if node.args else None
        if t is None or any(self.has_tokens(a) for a in node.args[1:]) or self.has_tokens(node.kwargs):
            self.refuse(node, "takes tokens in an argument other than its input")
        return t

    def channelwise(self, node: fx.Node, t: Tokens) -> Tokens:
        rank = len(_shape(node.args[0]))
        if rank - 1 in t.axes:
            self.refuse(node, _ALONG_TOKENS)
        return Tokens(t.axes, t.tset)

    def module(self, node: fx.Node, m: nn.Module) -> Tokens | None:
        if isinstance(m, nn.MultiheadAttention):
            return self.mha(node, m)
        t = self.data_arg(node)
        if isinstance(m, _CHANNEL_MODULES):
            normalized = len(getattr(m, "normalized_shape", ())) or 1
            rank = len(_shape(node.args[0]))
            if any(a >= rank - normalized for a in t.axes):
                self.refuse(node, _ALONG_TOKENS)
            return Tokens(t.axes, t.tset)
        if isinstance(m, _ELEMENTWISE_MODULES):
            return Tokens(t.axes, t.tset, t.weights and isinstance(m, (nn.Dropout, nn.Identity)))
        if id(m) in self.leaves and _shape(node) == _shape(node.args[0]):
            return Tokens(t.axes, t.tset)  # drop path / stochastic depth: one scale per sample
        self.refuse(node, f"({type(m).__name__}) reads tokens and is not known to act per token")

    def mha(self, node: fx.Node, m: nn.MultiheadAttention):
        query, key, value, *rest = node.args
        why = supports_masked_mha(m)
        if (
            not (query is key is value)
            or rest
            or any(node.kwargs.get(k) is not None for k in ("attn_mask", "key_padding_mask"))
        ):
            why = why or "it is not called as self-attention mha(x, x, x) without masks"
        t = self.tokens(query)
        if why is not None or t is None or t.axes != (1,):
            self.refuse(node, f"(nn.MultiheadAttention) cannot be masked: {why or 'tokens not on dim 1'}")
        with_module = ("get_attr", node.target)
        self.plan.replace.append((node, masked_mha, (with_module, query, key, value, _Policy(t.tset)), node.kwargs))
        self.plan.notes.append(f"{node.target}: self-attention masked")
        self.plan.attention.append(("mha", node))
        return (Tokens((1,), t.tset), None)

    def getitem(self, node: fx.Node):
        src, index = node.args
        v = self.info.get(src)
        if isinstance(v, tuple):
            return v[index]
        t = self.tokens(src)
        if self.has_tokens(index):
            self.refuse(node, "indexes with a token tensor")
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
                    self.refuse(node, "indexes the token axis with a tensor")
                out, d = out + 1, d + 1
                continue
            if d in t.axes:
                if isinstance(item, int):
                    if not 0 <= item < t.tset.prefix:
                        self.refuse(node, f"picks token {item}, which is not a never-pruned prefix token")
                    d += 1
                    continue
                if item != slice(None):
                    tset = self.slice_set(node, t.tset, item)
                axes.append(out)
            out, d = out + (isinstance(item, slice)), d + 1
        if not axes:
            return None
        return Tokens(tuple(axes), tset, t.weights and axes[-1] == out - 1 and tset is t.tset)

    def slice_set(self, node: fx.Node, tset: TokenSet, s: slice) -> TokenSet:
        start, stop = s.start or 0, s.stop
        ok = s.step in (None, 1) and isinstance(start, int) and 0 <= start <= tset.prefix
        ok = ok and (stop is None or (isinstance(stop, int) and 0 <= stop <= tset.prefix))
        if not ok:
            self.refuse(
                node,
                f"slices the token axis at [{s.start}:{s.stop}]; only bounds inside the never-pruned "
                f"prefix ({tset.prefix} tokens) stay the same tokens when tokens are pruned",
            )
        if start == 0 and stop is None:
            return tset
        size = (stop if stop is not None else tset.size) - start
        return TokenSet(size, max(0, tset.prefix - start) if stop is None else size, ("slice", tset, start, stop))

    def elementwise(self, node: fx.Node) -> Tokens:
        shape = _shape(node)
        if shape is None:
            self.refuse(node, "has a token input but no tensor output")
        rank = len(shape)
        operands = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
        found, weights = [], []
        for a in operands:
            t = self.tokens(a)
            if t is None:
                continue
            offset = rank - len(_shape(a))
            found += [(d + offset, t.tset) for d in t.axes]
            weights.append(t.weights)
        axes, tset = self.merge(node, found)
        self.constants_meet(node, rank, axes, tset, operands)
        keeps_zeros = node.target in (operator.mul, torch.mul, F.dropout) or node.target in ("mul", "to", "float")
        return Tokens(axes, tset, all(weights) and len(weights) == 1 and keeps_zeros)

    def permute(self, node: fx.Node) -> Tokens:
        t = self.data_arg(node)
        dims = node.kwargs.get("dims", node.args[1:] if node.op == "call_method" else node.args[1])
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        rank = len(dims)
        dims = [_dim(int(d), rank) for d in dims]
        return Tokens(tuple(sorted(dims.index(a) for a in t.axes)), t.tset, t.weights and dims[-1] == rank - 1)

    def transpose(self, node: fx.Node) -> Tokens:
        t = self.data_arg(node)
        rank = len(_shape(node.args[0]))
        a, b = (_dim(int(d), rank) for d in node.args[1:3])
        swap = {a: b, b: a}
        return Tokens(tuple(sorted(swap.get(d, d) for d in t.axes)), t.tset, t.weights and rank - 1 not in swap)

    def reshape(self, node: fx.Node) -> Tokens:
        """Reshapes keep a token axis when the elements before it and the axis itself are unchanged."""
        t = self.data_arg(node)
        shape_in, shape_out = _shape(node.args[0]), _shape(node)
        axes = []
        for a in t.axes:
            before = math.prod(shape_in[:a])
            match = [d for d in range(len(shape_out)) if math.prod(shape_out[:d]) == before and
                     shape_out[d] == shape_in[a]]  # fmt: skip
            if not match:
                self.refuse(
                    node,
                    f"reshapes the token axis ({list(shape_in)} -> {list(shape_out)}), e.g. into a "
                    "2-D grid for a convolution; pruned tokens leave no grid",
                )
            d = match[0]
            if (node.op, node.target) in _RESHAPES:
                packed = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
                shape = node.args[1] if packed else node.args[1:]
                if len(shape) > d and isinstance(shape[d], int) and shape[d] == shape_in[a] != 1:
                    self.refuse(node, f"reshapes to a fixed token count {shape_in[a]}; it must follow x.shape")
            axes.append(d)
        last = len(shape_in) - 1
        weights = t.weights and shape_in[-1] == shape_out[-1] and last in t.axes
        return Tokens(tuple(axes), t.tset, weights)

    def cat(self, node: fx.Node) -> Tokens:
        tensors = node.args[0] if node.args else node.kwargs["tensors"]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        rank = len(_shape(node))
        dim = _dim(dim, rank)
        infos = [self.tokens(a) for a in tensors]
        if any(self.has_tokens(a) and i is None for a, i in zip(tensors, infos)):
            self.refuse(node, "concatenates token values it cannot follow")
        if not any(i is not None and dim in i.axes for i in infos):
            return self.elementwise_like(node, tensors)
        parts = []
        for a, i in zip(tensors, infos):
            count = _shape(a)[dim]
            if i is not None and dim in i.axes:
                if any(d != dim for d in i.axes):
                    self.refuse(node, "concatenates values with tokens on several axes")
                parts.append((i.tset, count))
            elif i is None:
                parts.append((None, count))
            else:
                self.refuse(node, "concatenates token values along a different axis than their tokens")
        tset = self._canonical_cat(node, parts)
        return Tokens((dim,), tset)

    def _canonical_cat(self, node: fx.Node, parts: list) -> TokenSet:
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

    def elementwise_like(self, node: fx.Node, tensors) -> Tokens:
        """cat/stack along a non-token axis: token axes must line up; constants meeting them are gathered."""
        rank = len(_shape(node))
        found = []
        for a in tensors:
            t = self.tokens(a)
            if t is not None:
                found += [(d, t.tset) for d in t.axes]
        axes, tset = self.merge(node, found)
        self.constants_meet(node, rank, axes, tset, tensors)
        return Tokens(axes, tset)

    def stack(self, node: fx.Node) -> Tokens:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        rank = len(_shape(node))
        dim = _dim(dim, rank)
        found = []
        for a in tensors:
            t = self.tokens(a)
            if t is None:
                if isinstance(a, fx.Node) and _shape(a) is not None:
                    self.refuse(node, "stacks tokens with a value that is not tokens")
                continue
            found += [(d + (d >= dim), t.tset) for d in t.axes]
        axes, tset = self.merge(node, found)
        return Tokens(axes, tset)

    def split(self, node: fx.Node):
        t = self.data_arg(node)
        rank = len(_shape(node.args[0]))
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        if node.target == "unbind":
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        dim = _dim(dim, rank)
        if dim in t.axes:
            self.refuse(node, "splits the token axis")
        axes = tuple(d - (d > dim) for d in t.axes) if node.target == "unbind" else t.axes
        metas = node.meta.get("tensor_meta")
        if not isinstance(metas, (tuple, list)):
            self.refuse(node, "splits tokens into an unknown number of parts")
        return tuple(Tokens(axes, t.tset) for _ in metas)

    def reduction(self, node: fx.Node) -> Tokens | None:
        t = self.data_arg(node)
        rank = len(_shape(node.args[0]))
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        dims = list(range(rank)) if dim is None else [_dim(d, rank) for d in (dim if isinstance(dim, (list, tuple))
                                                                               else [dim])]  # fmt: skip
        reduced = [d for d in dims if d in t.axes]
        name = node.target if isinstance(node.target, str) else node.target.__name__
        if reduced:
            if len(reduced) != 1 or len(dims) != 1 or name not in _REDUCTIONS:
                self.refuse(node, "reduces over the token axis in a way that cannot be restricted to kept tokens")
            fn = _REDUCTIONS[name]
            self.plan.replace.append((node, fn, (node.args[0], _Policy(t.tset), reduced[0], keepdim), {}))
            self.plan.notes.append(f"{node.name}: {name} over tokens counts kept tokens only")
        axes = tuple(a - (0 if keepdim else sum(1 for d in dims if d < a)) for a in t.axes if a not in dims)
        return Tokens(axes, t.tset) if axes else None

    def softmax(self, node: fx.Node) -> Tokens:
        t = self.data_arg(node)
        rank = len(_shape(node.args[0]))
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        dim = _dim(dim, rank) if dim is not None else None
        if dim not in t.axes:
            return Tokens(t.axes, t.tset)
        if dim != rank - 1:
            self.refuse(node, "is a softmax over tokens that is not over the last dim")
        if rank - 2 in t.axes:
            self.plan.replace.append((node, masked_softmax, (node.args[0], _Policy(t.tset)), {}))
            self.plan.notes.append(f"{node.name}: attention softmax masked")
            self.plan.attention.append(("softmax", node))
        else:
            self.plan.replace.append((node, tokenops.masked_cross_softmax, (node.args[0], _Policy(t.tset)), {}))
            self.plan.notes.append(f"{node.name}: attention over token keys (queries are not tokens) masked")
        return Tokens(t.axes, t.tset, weights=True)

    def matmul(self, node: fx.Node) -> Tokens | None:
        a, b = node.args[:2]
        ta, tb = self.tokens(a), self.tokens(b)
        ra, rb = len(_shape(a)), len(_shape(b))
        rank = len(_shape(node))
        contract_a = ta is not None and ra - 1 in ta.axes
        contract_b = tb is not None and rb - 2 in tb.axes
        if contract_a != contract_b or (contract_a and not self.same(ta.tset, tb.tset)):
            self.refuse(node, "contracts a token axis with one that is not the same tokens")
        if contract_a and not ta.weights:
            # A sum over tokens (attention weights that are not a masked softmax's, e.g. talking heads after the
            # softmax, or a cross-covariance q^T k): zero the dropped tokens of the right operand, so it sums
            # kept tokens only, as pruned execution does.
            self.plan.masks.append((node, b, tb.tset, rb - 2))
            self.plan.notes.append(f"{node.name}: contraction over tokens restricted to kept tokens")
        found = []
        for t, r, keep in ((ta, ra, ra - 2), (tb, rb, rb - 1)):
            if t is None:
                continue
            for d in t.axes:
                if d == keep:
                    found.append((rank - 2 if t is ta else rank - 1, t.tset))
                elif d < r - 2:
                    found.append((d + rank - r, t.tset))
        merged = self.merge(node, found)
        if merged is None:
            return None
        for x in (a, b):
            if self.tokens(x) is None:
                self.constants_meet(node, rank, tuple(d for d in merged[0] if d < rank - 2), merged[1], [x])
        return Tokens(*merged)

    def sdpa(self, node: fx.Node) -> Tokens | None:
        q, k, v, *rest = node.args
        kwargs = dict(zip(_SDPA_ARGS, rest, strict=False), **node.kwargs)
        tq, tk, tv = self.tokens(q), self.tokens(k), self.tokens(v)
        rank = len(_shape(q))
        if tk is None or tv is None or tk.axes != (rank - 2,) or tv.axes != (rank - 2,) or tk.tset is not tv.tset:
            self.refuse(node, "is attention whose keys and values are not the same tokens")
        if kwargs.get("is_causal"):
            self.refuse(node, "is causal attention; a causal order is not defined once tokens are pruned")
        if kwargs.get("enable_gqa"):
            self.refuse(node, "uses grouped-query attention, which the masked attention does not support")
        mask = kwargs.get("attn_mask")
        self_attention = tq is not None and tq.axes == (rank - 2,) and tq.tset is tk.tset
        if tq is not None and not self_attention:
            self.refuse(node, "is attention between two different token sets")
        if isinstance(mask, fx.Node):
            if self.has_tokens(mask):
                self.refuse(node, "takes an attention mask computed from the tokens")
            dims = (rank - 2, rank - 1) if self_attention else (rank - 1,)
            self.constants_meet(node, rank, dims, tk.tset, [mask])
        if self_attention:
            fn = masked_sdpa
            self.plan.attention.append(("sdpa", node))
            self.plan.notes.append(f"{node.name}: self-attention masked" + (" (with its bias)" if mask else ""))
        else:
            fn = tokenops.masked_cross_attention
            self.plan.notes.append(f"{node.name}: attention over token keys masked")
        self.plan.replace.append((node, fn, (q, k, v, _Policy(tk.tset)), kwargs))
        return Tokens((rank - 2,), tq.tset) if self_attention else None


def analyse(
    gm: fx.GraphModule, seeds: dict[fx.Node, Tokens], where: str, tracked_leaves: set[int] = frozenset()
) -> tuple[FlowPlan, list[Tokens | None]]:
    """Follow the tokens from `seeds` through `gm`'s graph (shapes propagated) and plan the edits.

    Returns:
        The plan and, for each value the graph returns, the tokens it carries (None for none).

    Raises:
        UnsupportedModelError: a node reads tokens and no rule keeps it exact under pruning; the message names it.
    """
    flow = _Flow(gm, seeds, set(tracked_leaves), where)
    try:
        plan = flow.run()
    except _Refusal as e:
        raise UnsupportedModelError(
            f"{where}: {e}. tokenprune follows the token axis through every op after the first stage and refuses what "
            "it cannot keep exact, rather than return a model whose training and inference computations differ."
        ) from None
    return plan, getattr(flow, "output_tokens", [])


class _Materializer:
    """Creates, once per token set, the graph nodes holding its run-time policy and index."""

    def __init__(self, graph: fx.Graph, roots: dict[TokenSet, tuple[object, object, fx.Node]]):
        self.graph = graph
        self.done: dict[int, tuple[object, object, fx.Node]] = {id(t): v for t, v in roots.items()}

    def get(self, tset: TokenSet) -> tuple[object, object, fx.Node]:
        if id(tset) in self.done:
            return self.done[id(tset)]
        kind = tset.origin[0]
        if kind == "slice":
            _, parent, start, stop = tset.origin
            policy, index, anchor = self.get(parent)
            with self.graph.inserting_after(anchor):
                new_index = call_leaf(self.graph, tokenops.slice_index, (index, start, stop))
            with self.graph.inserting_after(anchor):
                new_policy = call_leaf(self.graph, tokenops.slice_policy, (policy, start, stop))
        else:
            _, node, parts = tset.origin
            resolved = [(self.get(p) if p is not None else (None, None, None), c, p is not None) for p, c in parts]
            with self.graph.inserting_after(node):
                new_index = call_leaf(self.graph, tokenops.cat_index, (node, [(r[1], c, t) for r, c, t in resolved]))
            with self.graph.inserting_after(node):
                new_policy = call_leaf(self.graph, tokenops.cat_policy, (node, [(r[0], c, t) for r, c, t in resolved]))
        self.done[id(tset)] = (new_policy, new_index, new_index)
        return self.done[id(tset)]


def apply(
    gm: fx.GraphModule, plan: FlowPlan, roots: dict[TokenSet, tuple[object, object, fx.Node]]
) -> dict[fx.Node, fx.Node]:
    """Make the edits of `plan` in `gm`'s graph; `roots` gives each root token set's (policy, index, anchor) nodes.

    Returns:
        The node that now stands for each replaced node (the replaced ones are erased).
    """
    graph = gm.graph
    make = _Materializer(graph, roots)

    def resolve(a):
        if isinstance(a, _Policy):
            return make.get(a.tset)[0]
        if isinstance(a, _Index):
            return make.get(a.tset)[1]
        if isinstance(a, tuple) and len(a) == 2 and a[0] == "get_attr":
            return graph.get_attr(a[1])
        return a

    substituted: dict[tuple[fx.Node, fx.Node], fx.Node] = {}  # (consumer, input) -> what the consumer reads now
    replaced: dict[fx.Node, fx.Node] = {}
    for node, value, tset, dims, rank in plan.gathers:
        index = make.get(tset)[1]
        with graph.inserting_before(node):
            gathered = call_leaf(graph, tokenops.gather_positions, (value, index, dims, rank))
        node.replace_input_with(value, gathered)
        substituted[node, value] = gathered
    for node, value, tset, dim in plan.masks:
        with graph.inserting_before(node):
            masked = call_leaf(graph, tokenops.zero_dropped, (value, make.get(tset)[0], dim))
        node.replace_input_with(value, masked)
        substituted[node, value] = masked
    for node, fn, args, kwargs in plan.replace:
        args, kwargs = fx.node.map_arg((args, kwargs), lambda a, n=node: substituted.get((n, a), a))
        with graph.inserting_before(node):
            new = call_leaf(graph, fn, tuple(resolve(a) for a in args), dict(kwargs))
        new.meta = {**node.meta, "is_wrapped": True}
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        replaced[node] = new
    graph.lint()
    gm.recompile()
    return replaced
