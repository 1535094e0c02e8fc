"""Spatial rules: does a node act on each location separately, and what does it do to the map's layout?

Each function takes the walk's `Block` (the traced block and its input), the node, its data input and that input's
layout (channel dim, spatial dims), and returns the output's layout, or None when the node mixes locations (or
changes what a C -> C fast path could stand in for). The table (`rules/table.py`) says which op each one serves.

A layout with no spatial dims, (channel, ()), is a *per-sample* value: the map summed over all its locations
(`location_sum`: ConvNeXt V2's GRN takes an L2 norm over H and W). Computed on the kept locations only it is what the
gathered slow path computes; masked execution gets the same value by zeroing the dropped locations before the sum
(the rewrite inserts `nn.asymmetric.mask_locations` there), so such a sum is exact where a mean or a max would not be.
Ops on per-sample values, and a map combined with one per location (`binary`), keep the run per location.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from ...models import copy_model
from .._graph import node_shape, propagate_shapes
from ..discovery import depends_on
from .token_rules import arg

__all__ = ["Block", "Layout"]

Layout = tuple[int, tuple[int, ...]]


@dataclass(frozen=True)
class Block:
    gm: fx.GraphModule
    x: fx.Node  # the block's input
    #: the rule table's lookup (`rules.lookup`), for rules that check a module's own code op by op; passed in by the
    #: walker because the table imports these rules
    lookup: Callable[[fx.GraphModule, fx.Node], object]
    #: the layouts of the nodes walked so far, for ops that combine two values computed from the block input
    states: dict[fx.Node, Layout] = field(default_factory=dict)

    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)


def _locations_kept(node: fx.Node, data: fx.Node, layout: Layout) -> tuple[int, int] | None:
    """(rank, last dim) when the batch and spatial dims pass unchanged, else None."""
    shape_in, shape_out = node_shape(data), node_shape(node)
    if shape_in is None or shape_out is None or len(shape_in) != len(shape_out):
        return None
    if any(shape_in[d] != shape_out[d] for d in (0, *layout[1])):
        return None
    return len(shape_in), len(shape_in) - 1


def same_shape(block: Block, node: fx.Node, data: fx.Node, layout: Layout) -> Layout | None:
    """Element-wise on its one data input: per location when the shape is unchanged."""
    return layout if node_shape(node) == node_shape(data) and _locations_kept(node, data, layout) else None


def cast(block: Block, node: fx.Node, data: fx.Node, layout: Layout) -> Layout | None:
    """A dtype or device change: per location on its input; reached through `type_as(other)`'s other, whose values
    it does not read, it is not a step of the run."""
    return same_shape(block, node, data, layout) if node.args and node.args[0] is data else None


def binary(block: Block, node: fx.Node, data: fx.Node, layout: Layout) -> Layout | None:
    """x op c: per location when every other operand is a number (a literal, or one computed at run time), a
    constant that is 1 off the channel dim, or a value the walk has reached (`Block.states`): a map in the same
    layout (of size 1 on the channels for a value computed per location, as a hand-written norm's), or a per-sample
    value that broadcasts over the locations (GRN's `x * norm`). With a map among the operands the result is a map;
    of per-sample values only, one."""
    operands = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
    states = {**block.states, data: layout}
    reached = [a for a in operands if depends_on(a, {block.x})]
    if any(a not in states for a in reached):
        return None
    maps = [a for a in reached if states[a][1]]
    full = [a for a in maps if node_shape(a) == node_shape(node)] or [data]
    result = states[full[0]]
    if same_shape(block, node, full[0], result) is None:
        return None
    rank = len(node_shape(node))
    for a in reached:
        if states[a][1] and not (states[a] == result and _per_location_of(a, full[0], result[0])):
            return None
        if not states[a][1] and not _broadcasts(a, rank, result):
            return None
    others = [a for a in operands if a not in reached]
    return result if all(_per_channel(o, rank, result[0]) for o in others) else None


def _per_location_of(value: fx.Node, like: fx.Node, channel: int) -> bool:
    """Whether map `value` has `like`'s shape, but for a channel dim of size 1."""
    shape, full = node_shape(value), node_shape(like)
    if shape is None or full is None or len(shape) != len(full):
        return False
    return all(s == f or (d == channel and s == 1) for d, (s, f) in enumerate(zip(shape, full)))


def _broadcasts(value: fx.Node, rank: int, layout: Layout) -> bool:
    """Whether per-sample `value` broadcasts over the locations: of the map's rank, size 1 on its spatial dims."""
    shape = node_shape(value)
    return shape is not None and len(shape) == rank and all(shape[d] == 1 for d in layout[1])


def _per_channel(other: fx.Node, rank: int, channel: int) -> bool:
    """Whether `other` is the same at every location: a Python number (a run-time input's grid size scaling the map)
    or a tensor of size 1 off the channel dim."""
    if other.meta.get("type") in (int, float, bool):
        return True
    shape = node_shape(other)
    if shape is None or len(shape) > rank:
        return False
    padded = (1,) * (rank - len(shape)) + shape
    return all(size == 1 for d, size in enumerate(padded) if d != channel)


def over_last(block: Block, node: fx.Node, data: fx.Node, layout: Layout) -> Layout | None:
    """Linear: per location when the channels are the last dim."""
    kept = _locations_kept(node, data, layout)
    return layout if kept and layout[0] == kept[1] else None


def layer_norm(block: Block, node: fx.Node, data: fx.Node, layout: Layout) -> Layout | None:
    """LayerNorm over `normalized_shape`: per location when that is the last dim alone and holds the channels."""
    if node.op == "call_module":
        count = len(block.module(node).normalized_shape)
    else:
        shape = arg(node, 1, "normalized_shape")
        count = 1 if isinstance(shape, int) else len(shape)
    return over_last(block, node, data, layout) if count == 1 else None


def normalize(block: Block, node: fx.Node, data: fx.Node, layout: Layout) -> Layout | None:
    """F.normalize over `dim` (default 1): per location when `dim` is the channel dim."""
    kept = _locations_kept(node, data, layout)
    return layout if kept and arg(node, 2, "dim", 1) % (kept[1] + 1) == layout[0] else None


#: The reductions `location_sum` serves: (position of `dim`, of `keepdim`, the name and position of the norm's order).
_REDUCTIONS = {
    "sum": (1, 2, None), torch.sum: (1, 2, None), "mean": (1, 2, None), torch.mean: (1, 2, None),
    "var": (1, 3, None), torch.var: (1, 3, None), "std": (1, 3, None), torch.std: (1, 3, None),
    "norm": (2, 3, ("p", 1)), torch.norm: (2, 3, ("p", 1)), torch.linalg.vector_norm: (2, 3, ("ord", 1)),
}  # fmt: skip


#: Those whose zero terms add nothing, so that over the locations they are exact over the kept ones.
_SUMS = frozenset({"sum", torch.sum, "norm", torch.norm, torch.linalg.vector_norm})


def location_sum(block: Block, node: fx.Node, data: fx.Node, layout: Layout) -> Layout | None:
    """A reduction with keepdim=True (`_REDUCTIONS`). A sum or a p-norm (p > 0) over exactly the map's spatial dims:
    a per-sample value (zeroed locations add nothing, so masked execution, zeroing the dropped ones first, sums the
    kept ones only, as gathered execution does). Any of them over dims that are neither the batch nor a location
    (the channels): per location. Over a per-sample value: per sample. A mean or variance over the locations, or a
    sum over some of them, mixes them."""
    dim_at, keepdim_at, order = _REDUCTIONS[node.target]
    shape = node_shape(data)
    if node.args[0] is not data or not arg(node, keepdim_at, "keepdim", False) or not shape:
        return None
    dims = arg(node, dim_at, "dim")
    dims = range(len(shape)) if dims is None else (dims,) if isinstance(dims, int) else dims
    dims = {int(d) % len(shape) for d in dims}
    if 0 in dims:
        return None
    if not layout[1]:
        return layout  # a per-sample value reduced further: still one per sample
    if not dims & set(layout[1]):
        return layout if _locations_kept(node, data, layout) else None
    spatial = list(layout[1])
    adjacent = spatial == list(range(spatial[0], spatial[0] + len(spatial)))
    if dims != set(spatial) or not adjacent or node.target not in _SUMS:
        return None
    p = arg(node, order[1], order[0], 2) if order else 1
    return (layout[0], ()) if p == "fro" or (isinstance(p, (int, float)) and p > 0) else None


def channels_first(block: Block, node: fx.Node, data: fx.Node, layout: Layout) -> Layout | None:
    """BatchNorm: per location (per-channel statistics and affine) when the channels are dim 1."""
    kept = _locations_kept(node, data, layout)
    return layout if kept and layout[0] == 1 else None


def conv_1x1(block: Block, node: fx.Node, data: fx.Node, layout: Layout) -> Layout | None:
    """Conv2d: per location only as a 1x1, stride 1, unpadded conv on a channels-first map."""
    conv = block.module(node)
    one = conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding in ((0, 0), "valid")
    kept = _locations_kept(node, data, layout)
    return layout if one and kept and kept[0] == 4 and layout[0] == 1 else None


def permute(block: Block, node: fx.Node, data: fx.Node, layout: Layout) -> Layout | None:
    """Moves the channel and spatial dims; the layout follows."""
    dims = node.kwargs.get("dims", node.args[1:] if node.op == "call_method" else node.args[1])
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    dims = [int(d) % len(dims) for d in dims]
    channel, spatial = layout
    return dims.index(channel), tuple(dims.index(s) for s in spatial)


def module_call(block: Block, node: fx.Node, data: fx.Node, layout: Layout) -> Layout | None:
    """A module kept as one call (timm's `BatchNormAct2d`, drop path): per location when it is a proven per-sample
    scaler (`rules/scaler.py`), or when its own traced code, in training and evaluation mode, is a run of ops whose
    rules act per location and give the map back in its layout."""
    from .scaler import scaler_refusal
    from .token_rules import Refused, example_like

    if len(node.args) != 1 or node.kwargs:
        return None  # reason: called with more than the map (window partition with its size)
    try:
        example = example_like(data)
    except Refused:
        return None
    m = block.module(node)
    if scaler_refusal(m, example) is None or all(
        _own_code_keeps(block, m, mode, example, layout) for mode in (False, True)
    ):
        return same_shape(block, node, data, layout)
    return None


def _own_code_keeps(block: Block, module: nn.Module, mode: bool, example: torch.Tensor, layout: Layout) -> bool:
    """Whether `module`'s traced code in `mode` maps a map of `layout` to the same layout, every op per location."""
    from ..tracing import _Tracer, forward_defaults  # reason: tracing imports nothing of the rules; avoid a cycle

    copy_ = copy_model(module).train(mode)  # reason: running the training code updates running statistics
    try:
        graph = _Tracer().trace(copy_, concrete_args=forward_defaults(copy_) or None)
        gm = fx.GraphModule(copy_, graph)
        with torch.random.fork_rng(devices=[]):
            propagate_shapes(gm, example)
    except Exception:  # reason: torch.fx raises many types; a module that cannot be traced proves nothing
        return False
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    inner, layouts = Block(gm, x, block.lookup), {x: layout}
    for n in gm.graph.nodes:
        if n.op == "output":
            out = n.args[0]
            return isinstance(out, fx.Node) and layouts.get(out) == layout
        inputs = [a for a in n.all_input_nodes if a in layouts]
        if not inputs or n.op not in ("call_function", "call_method", "call_module"):
            continue
        rule = block.lookup(gm, n)
        if rule is not None and rule.name == "metadata":
            continue  # reason: a shape read, not the map (the asserts on x.ndim)
        if rule is None or rule.spatial is None or len(inputs) != 1:
            return False
        after = rule.spatial(inner, n, inputs[0], layouts[inputs[0]])
        if after is None:
            return False
        layouts[n] = after
    return False
