"""The op-rule table shared by the token and the spatial strategies (docs/design.md §2.3, §2.4).

One `Rule` per kind of op: the ops it serves (functions, method names, module types, attribute reads), the
arguments that decide what it does to the token axis (`reads`), the token rule (what the op does to the tokens, as
an `Effect`) and the spatial rule (the map's layout after it, or None where it mixes locations). An op without a rule
is refused by both walkers; adding an op is one entry here plus its case in tests/test_rules.py.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import spatial_rules as S
from . import token_mixers as M
from . import token_rules as T

__all__ = ["Rule", "RULES", "MODULE_CALL", "lookup"]


@dataclass(frozen=True)
class Rule:
    """What tokenprune knows about one kind of op.

    Attributes:
        name: a short unique name.
        ops: keys ("call_function", fn), ("call_method", name), ("call_module", type), ("getattr", attribute).
        why: one line: why the rule is right.
        reads: the arguments that decide what the op does to the token axis (empty: none do).
        token: (Values, node) -> Effect, raising Refused; None: no token rule (refused in token chains).
        spatial: (Block, node, data, layout) -> layout or None; None: not per location (ends a slow path).
    """

    name: str
    ops: tuple[tuple[str, object], ...]
    why: str
    reads: tuple[str, ...] = ()
    token: Callable | None = None
    spatial: Callable | None = None


def _functions(*fns) -> tuple:
    return tuple(("call_function", f) for f in fns if f is not None)


def _methods(*names: str) -> tuple:
    return tuple(("call_method", n) for n in names)


def _modules(*types) -> tuple:
    return tuple(("call_module", t) for t in types if t is not None)


def _attrs(*names: str) -> tuple:
    return tuple(("getattr", n) for n in names)


_rms_norm_module, _rms_norm = getattr(nn, "RMSNorm", None), getattr(F, "rms_norm", None)

RULES: tuple[Rule, ...] = (
    Rule("metadata", _methods("size", "dim") + _attrs("shape", "ndim", "dtype", "device"),
         "reads shape or type, not values: shapes follow the tokens left at run time, so a token count may only set "
         "a shape", reads=("dim", "uses of a token count"), token=T.metadata),
    Rule("unary", _functions(
            operator.neg, torch.neg, torch.exp, torch.sqrt, torch.rsqrt, torch.sigmoid, torch.tanh, torch.relu,
            torch.clamp, torch.erf, torch.abs, torch.square, F.gelu, F.relu, F.silu, F.hardswish, F.mish, F.dropout,
            F.softplus, F.leaky_relu, F.relu6, F.hardsigmoid, F.elu,
         ) + _methods(
            "neg", "exp", "sqrt", "rsqrt", "sigmoid", "tanh", "relu", "clamp", "clamp_", "float", "half",
            "bfloat16", "type", "contiguous", "clone", "detach", "abs", "square", "erf", "sign", "reciprocal",
         ) + _modules(
            nn.GELU, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
            nn.ELU, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout,
         ), "element-wise on one value", token=T.elementwise, spatial=S.same_shape),  # fmt: skip
    Rule("binary", _functions(
            operator.add, operator.sub, operator.mul, operator.truediv, operator.pow, operator.gt, operator.lt,
            operator.ge, operator.le, operator.eq, operator.ne, torch.add, torch.sub, torch.mul, torch.div,
            torch.maximum, torch.minimum, torch.where, torch.addcmul,
         ) + _methods("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "masked_fill", "addcmul"),
         "element-wise over broadcast operands: token axes line up; a full-length constant meeting them is a "
         "position-indexed constant, gathered", reads=("operand shapes",),
         token=T.elementwise, spatial=S.binary),  # fmt: skip
    Rule("cast", _methods("to", "type_as"),
         "changes dtype or device; a tensor argument besides the input (`type_as(other)`, `to(other)`) gives only "
         "its dtype and device, so its tokens do not matter", token=T.cast, spatial=S.cast),
    Rule("glu", _modules(nn.GLU) + _functions(F.glu), "halves and gates along `dim`", reads=("dim",), token=T.glu),
    Rule("linear", _modules(nn.Linear) + _functions(F.linear), "mixes the last dim only", reads=("input layout",),
         token=T.linear, spatial=S.over_last),
    Rule("layer_norm", _modules(nn.LayerNorm, _rms_norm_module) + _functions(F.layer_norm, _rms_norm),
         "normalises over normalized_shape, the last dims", reads=("normalized_shape",),
         token=T.layer_norm, spatial=S.layer_norm),
    Rule("normalize", _functions(F.normalize), "divides by a norm over `dim`", reads=("dim",),
         token=T.normalize, spatial=S.normalize),
    Rule("batch_norm", _modules(nn.BatchNorm2d) + _functions(F.batch_norm),
         "per-channel statistics on a channels-first map; over tokens its training statistics would mix them",
         reads=("input layout",), spatial=S.channels_first),
    Rule("conv", _modules(nn.Conv2d), "per location only as a 1x1 conv", reads=("kernel_size", "stride", "padding"),
         spatial=S.conv_1x1),
    Rule("permute", _methods("permute") + _functions(torch.permute), "moves dims", reads=("dims",),
         token=T.permute, spatial=S.permute),
    Rule("transpose", _methods("transpose") + _functions(torch.transpose), "swaps two dims",
         reads=("dim0", "dim1"), token=T.transpose),
    Rule("mT", _attrs("mT", "mH"), "swaps the last two dims (conjugate for .mH)", reads=("rank",),
         token=T.last_two_swapped),
    Rule("T", _attrs("T"), "reverses the dims", reads=("rank",), token=T.reversed_dims),
    Rule("real", _attrs("real", "data"), "the same elements of a real tensor", token=T.same_value),
    Rule("reshape", _methods("reshape", "view", "flatten", "unflatten", "expand", "unsqueeze", "squeeze")
         + _functions(torch.reshape, torch.flatten, torch.unsqueeze, torch.squeeze),
         "keeps a token axis when the elements before it and the axis are unchanged", reads=("target shape",),
         token=T.reshape),
    Rule("getitem", _functions(operator.getitem), "indexes: token axis sliced only inside the never-pruned prefix",
         reads=("index",), token=T.getitem),
    Rule("cat", _functions(torch.cat, getattr(torch, "concat", None), getattr(torch, "concatenate", None)),
         "along tokens: a derived token set; along another dim: element-wise", reads=("dim",), token=T.cat),
    Rule("stack", _functions(torch.stack), "a new dim; token axes shift", reads=("dim",), token=T.stack),
    Rule("split", _methods("unbind", "chunk", "split", "tensor_split")
         + _functions(torch.unbind, torch.chunk, torch.split, torch.tensor_split), "parts of a dim other than tokens",
         reads=("dim",), token=T.split),
    Rule("reduction", _methods("mean", "sum") + _functions(torch.mean, torch.sum),
         "over tokens: a mean/sum over kept tokens only; over a map's locations, a sum (the dropped ones zeroed in "
         "masked execution)", reads=("dim", "keepdim"), token=M.reduction, spatial=S.location_sum),
    Rule("variance", _methods("var", "std") + _functions(torch.var, torch.std),
         "a statistic over `dim`: over the channels per location (a hand-written norm); over the locations it mixes "
         "them", reads=("dim", "keepdim"), spatial=S.location_sum),
    Rule("norm", _methods("norm") + _functions(torch.norm, torch.linalg.vector_norm),
         "a p-norm over `dim`: over a map's locations a sum of |x|^p, exact over the kept ones when p > 0",
         reads=("p", "dim", "keepdim"), spatial=S.location_sum),
    Rule("softmax", _methods("softmax") + _functions(F.softmax, torch.softmax) + _modules(nn.Softmax),
         "over token keys (the last dim): masked attention weights", reads=("dim",), token=M.softmax),
    Rule("matmul", _functions(operator.matmul, torch.matmul, torch.bmm) + _methods("matmul", "bmm"),
         "contracts token axes of the same tokens only, over kept tokens", reads=("operand layouts",),
         token=M.matmul),
    Rule("sdpa", _functions(F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention),
         "self-attention (or attention over token keys), masked", reads=("attn_mask", "is_causal", "enable_gqa"),
         token=M.sdpa),
    Rule("mha", _modules(nn.MultiheadAttention), "self-attention mha(x, x, x), masked",
         reads=("query", "key", "value", "masks"), token=M.mha),
)  # fmt: skip

#: Modules the trace keeps as one call that are not torch.nn's (drop path, stochastic depth; anything untraceable):
#: accepted only where their own traced code proves them per-sample scalers (`rules/scaler.py`).
MODULE_CALL = Rule("module_call", (), "a per-sample scaler, proven from its traced code in both modes; for the "
                   "spatial walk also a module whose own traced code is a per-location run",
                   reads=("traced code",), token=T.module_call, spatial=S.module_call)  # fmt: skip

_INDEX = {op: rule for rule in RULES for op in rule.ops}
if len(_INDEX) != len({(op, r.name) for r in RULES for op in r.ops}):  # pragma: no cover - a table error
    raise RuntimeError("tokenprune.fx.rules: an op has two rules")


def key(node: fx.Node, gm: fx.GraphModule) -> tuple[str, object]:
    """The table key of a node: its op and target; an attribute read by name; a module by its exact type."""
    if node.op == "call_function" and node.target is builtins.getattr:
        return ("getattr", node.args[1])
    if node.op == "call_module":
        return ("call_module", type(gm.get_submodule(node.target)))
    return (node.op, node.target)


def lookup(gm: fx.GraphModule, node: fx.Node) -> Rule | None:
    """The rule for `node`, or None when there is none.

    A module matches its own type's rule, or a parent type's when it keeps that type's forward (timm's
    `LayerNorm2d` overrides it: no rule); a module that is not torch.nn's and has no rule gets `MODULE_CALL`.
    """
    op = key(node, gm)
    if op in _INDEX or op[0] != "call_module":
        return _INDEX.get(op)
    cls = op[1]
    for parent in cls.__mro__[1:]:
        rule = _INDEX.get(("call_module", parent))
        if rule is not None and cls.forward is parent.forward:
            return rule
    return None if cls.__module__.startswith("torch.nn") else MODULE_CALL
