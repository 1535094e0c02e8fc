"""The rule that lets a traced-as-a-call module act per token: it is a per-sample scaler (drop path, stochastic depth).

Such modules stay calls in the graph (`fx/tracing.py::training_dependent`: their traced code changes with the
training flag). A call is opaque to the token rules, so it is accepted only when its own traced code, in both modes,
provably returns its input or its input times a value that holds one scalar per sample and is built without reading
the input's values (timm's `drop_path`: `x * x.new_empty((B, 1, 1)).bernoulli_(p)`; torchvision's
`stochastic_depth(x, p, "row" | "batch", training)`). Such a value scales every token (every location) of a sample
alike, so it commutes with dropping tokens. Tracing, not probing: a probe with random inputs could miss a module that
mixes tokens only sometimes. A module that cannot be traced on its own proves nothing and is refused.
"""

from __future__ import annotations

import builtins
import operator
import weakref

import torch
import torch.fx as fx
from torch import nn

from ...models import copy_model
from .._graph import propagate_shapes

__all__ = ["scaler_refusal", "STOCHASTIC_DEPTH"]

try:  # reason: torchvision is optional; its stochastic_depth is fx-wrapped, so it shows up as one call
    from torchvision.ops import stochastic_depth as _tv_stochastic_depth
except ImportError:  # pragma: no cover
    _tv_stochastic_depth = None

#: Functions that are per-sample scalers of their first argument by their `mode` argument (position 2).
STOCHASTIC_DEPTH = {f for f in (_tv_stochastic_depth,) if f is not None}

_METADATA_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad"}
_METADATA_METHODS = {"size", "dim"}
_LIKE_METHODS = {"new_empty", "new_zeros", "new_ones", "new_full"}  # reason: read only dtype and device of `self`
_MULS = {operator.mul, torch.mul, "mul"}

_cache: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def _reads_values(node: object, x: fx.Node, seen: dict) -> bool:
    """Whether `node`'s value depends on the elements of `x` (not only on its shape, dtype or device)."""
    if not isinstance(node, fx.Node):
        return False
    if node in seen:
        return seen[node]
    if node is x:
        result = True
    elif _is_metadata(node):
        result = False
    elif node.op == "call_method" and node.target in _LIKE_METHODS:
        result = any(_reads_values(a, x, seen) for a in _nodes((node.args[1:], node.kwargs)))
    else:
        result = any(_reads_values(a, x, seen) for a in node.all_input_nodes)
    seen[node] = result
    return result


def _is_metadata(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is builtins.getattr:
        return node.args[1] in _METADATA_ATTRS
    return node.op == "call_method" and node.target in _METADATA_METHODS


def _nodes(args: object) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return found


def _one_per_sample(shape: tuple[int, ...] | None, rank: int) -> bool:
    if shape is None or len(shape) > rank:
        return False
    padded = (1,) * (rank - len(shape)) + tuple(shape)
    return all(s == 1 for s in padded[1:])


def _mode_refusal(gm: fx.GraphModule, example: torch.Tensor) -> str | None:
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if out is x:
        return None
    if not isinstance(out, fx.Node):
        return "returns something other than a tensor"
    if out.op == "call_function" and out.target in STOCHASTIC_DEPTH:
        mode = out.kwargs.get("mode", out.args[2] if len(out.args) > 2 else None)
        if out.args[0] is x and mode in ("row", "batch"):
            return None
        return f"calls stochastic depth with mode {mode!r} on something other than its input"
    if out.target not in _MULS or len(out.args) != 2 or x not in out.args:
        return f"returns {out.name}, not its input times a per-sample scale"
    scale = out.args[1] if out.args[0] is x else out.args[0]
    if _reads_values(scale, x, {}):
        return f"scales its input by {getattr(scale, 'name', scale)}, which is computed from the input's values"
    with torch.random.fork_rng(devices=[]):
        propagate_shapes(gm, example)
    meta = scale.meta.get("tensor_meta") if isinstance(scale, fx.Node) else None
    if isinstance(scale, fx.Node) and not _one_per_sample(tuple(meta.shape) if meta else None, example.dim()):
        return f"scales its input by {scale.name}, which is not one value per sample"
    return None


def scaler_refusal(module: nn.Module, example: torch.Tensor) -> str | None:
    """None when `module`, called on a tensor like `example`, is a per-sample scaler of it in training and evaluation
    mode (see the module docstring); else the reason it is not."""
    from ..tracing import _Tracer, forward_defaults  # reason: tracing imports nothing of the rules; avoid a cycle

    key = (tuple(example.shape), example.dtype)
    known = _cache.setdefault(module, {})
    if key in known:
        return known[key]
    probe, reason = copy_model(module), None  # reason: tracing parks tensor constants on the module it traces
    for mode in (True, False):
        probe.train(mode)
        try:
            graph = _Tracer().trace(probe, concrete_args=forward_defaults(probe) or None)
        except Exception as e:  # reason: torch.fx raises many types; any of them means it proves nothing
            reason = f"cannot be traced on its own ({type(e).__name__}), so nothing shows it acts per token"
            break
        if sum(1 for n in graph.nodes if n.op == "placeholder") != 1:
            reason = "takes more than its input"
            break
        reason = _mode_refusal(fx.GraphModule(probe, graph), example)
        if reason is not None:
            reason += f" in {'training' if mode else 'evaluation'} mode"
            break
    known[key] = reason
    return reason
