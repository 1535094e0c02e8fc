"""The graph pass for spatial chains (ConvNeXt, Swin): slow/fast paths after learned stages (docs/design.md §2.4).

The structural rule that finds a block's slow path, with no class names:

1. Trace the block and find its residual adds: adds whose two operands both depend on the block's input.
2. From the branch operand walk back over ops with a spatial rule in the op-rule table (`fx/rules/`), as long as
   each has one input that depends on the block's input and nothing outside the run reads it (or, combining several,
   they all come from one node of the run through such ops: a closed diamond); then forward, each rule reads its
   op's arguments and gives the map's layout after it, or None where it mixes locations (LayerNorm over the channel
   dim alone, Linear with channels last, BatchNorm and 1x1 convs channels first, per-channel constants such as a
   layer scale, permutes, stochastic depth; a sum over all the locations gives a per-sample value, exact over the
   kept ones: ConvNeXt V2's GRN). The run starts after the last op that mixes locations (ConvNeXt's depthwise 7x7
   conv) or at the residual stream itself (Swin's MLP residual, norm2 -> mlp -> add). That maximal run is the slow
   path.
3. Accept it when it holds a Linear/1x1 conv (there is compute to save) and maps its input's shape to the same shape
   in the same layout (a C -> C fast path can stand in for it). Of several accepted runs, those within a factor of 2
   of the costliest are the block's slow paths: the MLP, not attention's output projection (8 C^2 against C^2 per
   location); both MLPs of a unit that holds two transformer blocks (DaViT, MaxViT).

ResNet's bottleneck fails rule 3: the run after its 3x3 conv maps 256 to 1024 channels, and the 1x1 conv before the
3x3 conv (the spatial mixing sits *inside* the branch) would still run everywhere; it gets UnsupportedModelError.

Stochastic depth and similar modules whose traced graph depends on the training flag stay calls (leaves), so
fine-tuning keeps them while the rewrite runs in eval mode; the table accepts such a call only where its own traced
code proves it per location (`fx/rules/scaler.py`, `spatial_rules.module_call`).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from ..nn.asymmetric import FAST_PATH_INIT, AsymmetricPath, gather_locations, mask_locations
from ..nn.spatial_predictor import SpatialRecorder, SpatialSelector
from . import rules
from ._graph import (
    applied_norm,
    block_inputs,
    chain_nodes,
    node_shape,
    propagate_shapes,
    recorded_arguments,
    recorded_inputs,
    runtime_kwargs,
)
from .discovery import Call, Chain, depends_on
from .plan import RECORDER, Plan
from .rules import spatial_rules
from .rules.scaler import STOCHASTIC_DEPTH, scaler_refusal
from .rules.token_rules import Refused, example_like
from .tracing import call_leaf, trace

__all__ = ["SlowPath", "find_slow_paths", "plan_spatial", "final_map", "FinalMap", "BLOCK_INPUTS"]

#: Names of the block inputs the rewrite adds: a stage's mask (masked execution), kept and dropped locations (gathered).
BLOCK_INPUTS = ("tokenprune_mask", "tokenprune_keep", "tokenprune_drop")

_RESIDUAL_ADDS = {operator.add, operator.iadd, torch.add}


@dataclass
class SlowPath:
    """A block's slow path: the run of per-location nodes between `entry` (exclusive) and `exit` (inclusive).

    `scalers` are the per-sample scalers (stochastic depth, drop path) that ended the branch's run after `exit`: the
    two paths are mixed before them, so they scale the fast path's contribution as they scale the slow path's.
    """

    entry: fx.Node
    exit: fx.Node
    nodes: list[fx.Node]
    channel: int
    spatial: tuple[int, ...]
    dim: int
    scalers: list[fx.Node] = field(default_factory=list)
    layer_scale: bool = True
    eps: float = 1e-6
    #: the nodes that sum the map over its locations (GRN's norm), each with its input's spatial dims: masked
    #: execution zeroes the dropped locations of that input (`mask_locations`), so the sum is over the kept ones
    sums: list[tuple[fx.Node, tuple[int, ...]]] = field(default_factory=list)


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _spatial_rule(gm: fx.GraphModule, node: fx.Node):
    """The table's spatial rule for `node` (`fx/rules/`), or None: no rule, or one that never acts per location."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return None
    rule = rules.lookup(gm, node)
    return rule.spatial if rule is not None else None


def _entry_layout(node: fx.Node, chain: Chain, x: fx.Node) -> tuple[int, tuple[int, ...]] | None:
    """The layout of map `node` inside a block, from its shape: the chain's channels and locations in some order;
    failing that, the chain's locations with another channel count (an expanded hidden map: MobileNet's 6C after its
    1x1 conv). None when the locations are not the chain's (windows). Where the shape fits two layouts (C = H = W),
    the permutes between the block's input and `node` decide (`_permuted_layout`)."""
    shape = node_shape(node)
    if not shape:
        return None
    c = chain.shape[chain.channel]
    h, w = chain.grid or [chain.shape[d] for d in range(1, 4) if d != chain.channel]
    first = {"BCHW": (1, (2, 3)), "BHWC": (3, (1, 2))}.get(chain.layout, (2, (1,)))
    for channels in (c, None):
        fits = _layouts_of(shape, h, w, channels)
        if len(fits) > 1:
            permuted = _permuted_layout(node, x, first)
            return permuted if permuted in fits else first if first in fits else fits[0]
        if fits:
            return fits[0]
    return None


def _layouts_of(shape: tuple[int, ...], h: int, w: int, c: int | None) -> list[tuple[int, tuple[int, ...]]]:
    """The layouts in which `shape` holds H x W locations of `c` channels (None: any count)."""
    if len(shape) == 3:
        return [(2, (1,))] if shape[1] == h * w and c in (None, shape[2]) else []  # Swin's `x.reshape(B, -1, C)`
    if len(shape) != 4:
        return []
    fits = [(1, (2, 3))] if shape[2:] == (h, w) and c in (None, shape[1]) else []
    return fits + ([(3, (1, 2))] if shape[1:3] == (h, w) and c in (None, shape[3]) else [])


#: Ops that move or reinterpret dims without a permute's explicit order: the layout cannot be followed through them.
_DIM_MOVERS = frozenset({"transpose", "movedim", "swapaxes", "reshape", "view", "flatten", "unflatten"})


def _permuted_layout(node: fx.Node, x: fx.Node, layout: tuple[int, tuple[int, ...]]):
    """The layout of the block's input (`layout`) carried to `node` through the permutes on the way (following each
    op's first input computed from it; other ops that keep the rank keep the layout), or None where the way holds an
    op that moves dims otherwise or changes the rank."""
    permutes: list[fx.Node] = []
    while node is not x:
        data = [a for a in node.all_input_nodes if depends_on(a, {x})]
        name = getattr(node.target, "__name__", node.target)
        shape_in, shape = (node_shape(data[0]) if data else None), node_shape(node)
        moves = name in _DIM_MOVERS or node.target is getattr  # reason: `.mT`, `.T` are attribute reads
        if not data or moves or not shape_in or not shape or len(shape_in) != len(shape):
            return None
        if name == "permute":
            permutes.append(node)
        node = data[0]
    for p in reversed(permutes):
        layout = spatial_rules.permute(None, p, None, layout)
    return layout


def _walk_back(gm: fx.GraphModule, exit_: fx.Node, x: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The maximal run of nodes with a spatial rule ending at `exit_`, in graph order, and the node feeding it.

    The run is a chain, but for closed diamonds: a node that combines several values computed from the block input
    (GRN's `x + gamma * x * norm(x)`) is crossed when they all come from one earlier node of the run (`_diamond`)."""
    run: list[fx.Node] = []
    node = exit_
    while _spatial_rule(gm, node) is not None:
        if run and any(u not in run for u in node.users):
            break  # its value is also read outside the branch (the residual stream itself)
        data = [a for a in node.all_input_nodes if depends_on(a, {x})]
        inner: list[fx.Node] = []
        if len(data) != 1:
            found = _diamond(gm, node, data, x)
            if found is None:
                break
            data, inner = [found[0]], found[1]
        run += [node, *reversed(inner)]
        node = data[0]
    return node, sorted(run, key=_order(gm))


def _order(gm: fx.GraphModule):
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    return position.__getitem__


def _diamond(gm: fx.GraphModule, join: fx.Node, data: list[fx.Node], x: fx.Node):
    """(fork, the nodes between it and `join`) when every value `join` combines is computed from one earlier node
    (the fork) by nodes with a spatial rule that nothing but `join` and each other reads; None otherwise."""
    ancestors: set[fx.Node] = set()
    stack = list(data)
    while stack:
        n = stack.pop()
        if n not in ancestors and depends_on(n, {x}):
            ancestors.add(n)
            stack.extend(n.all_input_nodes)
    for fork in sorted(ancestors, key=_order(gm), reverse=True):
        if fork is x:
            return None
        inner = [n for n in ancestors if n is not fork and depends_on(n, {fork})]
        if not all(depends_on(d, {fork}) for d in data) or any(_spatial_rule(gm, n) is None for n in inner):
            continue
        inside = {fork, *inner}
        closed = all(
            all(a in inside for a in n.all_input_nodes if depends_on(a, {x}))
            and all(u in inside or u is join for u in n.users)
            for n in inner
        )
        if closed:
            return fork, sorted(inner, key=_order(gm))
    return None


def _propagate(
    gm: fx.GraphModule, x: fx.Node, entry: fx.Node, layout, run: list[fx.Node]
) -> tuple[dict[fx.Node, tuple], int | None]:
    """The layout of each node of `run` fed `entry` in `layout`, by the table's spatial rules, and the position of the
    first node that mixes locations (None when none does)."""
    block = rules.Block(gm, x, rules.lookup, {entry: layout})
    for i, node in enumerate(run):
        data = [a for a in node.all_input_nodes if a in block.states]
        after = _spatial_rule(gm, node)(block, node, data[0], block.states[data[0]]) if data else None
        if after is None:
            return block.states, i
        block.states[node] = after
    return block.states, None


def _cuts(entry: fx.Node, run: list[fx.Node]) -> set[int]:
    """Positions in `run` whose node alone carries everything before it to what follows (a run may restart after it)."""
    cuts, seen, members = set(), {entry}, set(run)
    for i, node in enumerate(run):
        seen.add(node)
        if all(u in seen for n in seen if n is not node for u in n.users if u in members):
            cuts.add(i)
    return cuts


def _per_location(
    gm: fx.GraphModule, entry: fx.Node, run: list[fx.Node], x: fx.Node, chain: Chain
) -> tuple[fx.Node, list[fx.Node]]:
    """The run without its front up to the last node that mixes locations (a rule answering None for the layout it
    gets: ConvNeXt's depthwise 7x7 conv, which has a conv rule but is not 1x1), and the node feeding what is left. A
    node inside a diamond that mixes them drops the front up to the diamond's join."""
    cuts, start = _cuts(entry, run), 0
    while start < len(run):
        feed = entry if start == 0 else run[start - 1]
        current = _entry_layout(feed, chain, x)
        if current is None:
            break
        _, mixing = _propagate(gm, x, feed, current, run[start:])
        if mixing is None:
            break
        start = min((c for c in cuts if c >= start + mixing), default=len(run) - 1) + 1
    return (entry if start == 0 else run[start - 1]), run[start:]


def _location_sums(states: dict, nodes: list[fx.Node]) -> list[tuple[fx.Node, tuple[int, ...]]]:
    """The nodes of a slow path that turn a map into a per-sample value (`spatial_rules.location_sum`)."""
    sums = []
    for n in nodes:  # reason: only a location sum makes a per-sample value of a map (binary keeps a map a map)
        data = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        if not states[n][1] and data in states and states[data][1]:
            sums.append((n, states[data][1]))
    return sums


def _trailing_scalers(gm: fx.GraphModule, run: list[fx.Node]) -> list[fx.Node]:
    """The per-sample scalers that end `run` (stochastic depth: `rules/scaler.py` proves a module kept as a call is
    one), never its first node. One value per sample scales every location alike, so it commutes with mixing the
    paths per location: applied after the mix, it drops the fast path's contribution exactly when the slow path's,
    as the official AdaConvNeXt applies its block's drop path to both paths (docs/design.md §1.2)."""
    count = 0
    for node in reversed(run[1:]):
        if node.op == "call_function" and node.target in STOCHASTIC_DEPTH:
            count += 1
            continue
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            break
        try:
            example = example_like(node.args[0])
        except Refused:
            break
        if scaler_refusal(gm.get_submodule(node.target), example) is not None:
            break
        count += 1
    return run[len(run) - count :]


_MULTIPLY = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}


def _has_layer_scale(gm: fx.GraphModule, exit_: fx.Node, x: fx.Node) -> bool:
    """Whether the slow path's last arithmetic (layout ops and dropout aside) multiplies by a learned value that does
    not depend on the block's input: a layer scale (ConvNeXt's gamma, timm's LayerScale, torchvision's layer_scale).
    The fast path gets one of its own only then, as the official AdaConvNeXt (fast_path_gamma) and AdaSwin (none:
    Swin's block has none) do. A learned factor inside the MLP (ConvNeXt V2's GRN) is not a layer scale."""
    node = exit_
    while (_is_layout(gm, node) or isinstance(_module(gm, node), nn.Dropout)) and len(node.all_input_nodes) == 1:
        node = node.all_input_nodes[0]
    if node.target not in _MULTIPLY:
        return False
    for other in node.args[:2]:
        if not isinstance(other, fx.Node) or depends_on(other, {x}):
            continue
        while other.op != "get_attr" and len(other.all_input_nodes) == 1:
            other = other.all_input_nodes[0]  # reason: a reshape/view of the parameter to broadcast it
        if other.op == "get_attr" and _is_parameter(gm, str(other.target)):
            return True
    return False


def _is_parameter(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
    except AttributeError:  # a buffer or a constant
        return False
    return True


def _norm_eps(gm: fx.GraphModule, nodes: list[fx.Node]) -> float:
    """The epsilon of the slow path's first LayerNorm (the fast path's norm takes it: 1e-6 in ConvNeXt, 1e-5 in Swin,
    as in the official code); 1e-6 when it has none."""
    for node in nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.LayerNorm):
            return float(gm.get_submodule(node.target).eps)
        if node.op == "call_function" and node.target is F.layer_norm:
            return float(node.kwargs.get("eps", node.args[4] if len(node.args) > 4 else 1e-5))
    return 1e-6


def _inside_a_layout_change(entry: fx.Node, x: fx.Node) -> str:
    """Why a run can start inside the block's layout change: where the walk back stopped."""
    inputs = [a.name for a in entry.all_input_nodes if depends_on(a, {x})]
    return (
        f"the run starts inside the block's layout change, where the walk back stopped at {entry.name}, which "
        f"combines {len(inputs)} values computed from the block input ({', '.join(inputs)}), e.g. a hand-written norm"
    )


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    m = _module(gm, node)
    if isinstance(m, nn.Conv2d):
        return f"{node.target} (a {m.kernel_size[0]}x{m.kernel_size[1]} conv)"
    return f"{node.target if node.op == 'call_module' else node.name}"


def find_slow_paths(gm: fx.GraphModule, chain: Chain, where: str) -> list[SlowPath]:
    """Find the slow paths of a traced, shape-propagated block by the structural rule of this module's docstring.

    Usually one: of several acceptable runs (attention's output projection, the MLP) the MLP, with clearly the most
    compute per location. A unit of the chain that holds two transformer blocks (DaViT's spatial and channel blocks,
    MaxViT's block and grid attention) has two MLPs of the same cost: each is a slow path, under the same decisions.

    Raises:
        UnsupportedModelError: no residual branch, or none ending in an acceptable run.
    """
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    found: list[SlowPath] = []
    reasons: list[str] = []
    bottleneck = False
    for add in gm.graph.nodes:
        is_add = (add.op == "call_function" and add.target in _RESIDUAL_ADDS) or (
            add.op == "call_method" and add.target in ("add", "add_")
        )
        operands = [a for a in add.args[:2] if isinstance(a, fx.Node)]
        if not is_add or len(operands) != 2 or not all(depends_on(a, {x}) for a in operands):
            continue
        for branch in operands:
            if len(branch.users) != 1:
                continue
            entry, run = _per_location(gm, *_walk_back(gm, branch, x), x, chain)
            if not run:
                continue
            params = [n for n in run if isinstance(_module(gm, n), (nn.Linear, nn.Conv2d)) or n.target is F.linear]
            if not params:
                continue
            shape_in, shape_out = node_shape(entry), node_shape(branch)
            layout = _entry_layout(entry, chain, x)
            if shape_in != shape_out:
                maps = (
                    f"the per-location run {run[0].name} .. {branch.name} after {_describe(gm, entry)} maps "
                    f"{list(shape_in or ())} to {list(shape_out or ())}"
                )
                if sorted(shape_in or ()) == sorted(shape_out or ()):  # the same sizes: an axis order, not channels
                    maps += f" (the same sizes in another order: {_inside_a_layout_change(entry, x)})"
                else:
                    bottleneck = True
                reasons.append(maps)
                continue
            if layout is None:
                reasons.append(
                    f"the per-location run {run[0].name} .. {branch.name} after {_describe(gm, entry)} works on "
                    f"{list(shape_in or ())}, not on the block's feature map {list(chain.shape)} (its locations "
                    "rearranged, e.g. into windows)"
                )
                continue
            states, mixing = _propagate(gm, x, entry, layout, run)
            combined = sum(depends_on(a, {x}) for a in entry.all_input_nodes) > 1
            if mixing is None and states[branch] != layout and states[branch][1] and combined:
                reasons.append(
                    f"the per-location run {run[0].name} .. {branch.name} after {_describe(gm, entry)} gives its map "
                    f"back in another layout, {states[branch]} for {layout} as (channel dim, spatial dims) "
                    f"({_inside_a_layout_change(entry, x)})"
                )
                continue
            if mixing is not None or states[branch] != layout:
                mixer = run[mixing] if mixing is not None else branch
                reasons.append(f"{_describe(gm, mixer)} in the run ending at {branch.name} mixes locations")
                continue
            scalers = _trailing_scalers(gm, run)
            exit_ = run[-len(scalers) - 1]
            nodes = run[: len(run) - len(scalers)]
            found.append(
                SlowPath(
                    entry, exit_, nodes, layout[0], layout[1], shape_in[layout[0]], scalers,
                    _has_layer_scale(gm, exit_, x), _norm_eps(gm, nodes), _location_sums(states, nodes),
                )
            )  # fmt: skip
    cheap = [p for p in found if not _saves_compute(gm, p)]
    reasons += [
        f"the per-location run {p.nodes[0].name} .. {p.exit.name} costs {_path_macs(gm, p):,} multiply-adds per "
        f"location, no more than the fast path that would stand in for it (LayerNorm + Linear({p.dim}, {p.dim})): "
        "pruning it would not save compute"
        for p in cheap
    ]
    found = [p for p in found if p not in cheap]
    if found:
        # Several branches end in per-location layers (attention's output projection, the MLP): the slow paths are
        # the MLPs, the runs within a factor of 2 of the costliest (8 C^2 per location against C^2 for a projection).
        top = max(_path_macs(gm, p) for p in found)
        return [p for p in found if 2 * _path_macs(gm, p) > top]
    why = "; ".join(reasons) or "no residual add has a branch ending in per-location Linear/1x1 conv layers"
    if bottleneck:
        why += (
            ". A C -> C fast path cannot stand in for a run that changes the channels: the run starts inside the "
            "residual branch, after an op that mixes locations (a bottleneck's 3x3 conv, a squeeze-and-excitation's "
            "mean over the locations), so the pointwise layers before that op would run on every location anyway"
        )
    raise UnsupportedModelError(
        f"{where}: no slow path found ({why}). Spatial sparsification (docs/design.md §2.4) needs blocks whose "
        "residual branch "
        "ends, after its spatial mixing, in a per-location MLP mapping C channels to C (ConvNeXt, Swin); sparsify a "
        "model with such blocks, or a ViT."
    )


def _asymmetric_block(
    call: Call, node: fx.Node, chain: Chain, where: str, fast_path: str = "block"
) -> tuple[fx.GraphModule, list[SlowPath]]:
    """Trace one block and route each slow path through an `AsymmetricPath` (gather before, mix/scatter after)."""
    concrete, _ = block_inputs(call, node, where)
    gm = trace(call.module, concrete_args=concrete, name=where, example=recorded_arguments(call))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    propagate_shapes(gm, call.args[0], *recorded_inputs(call, [p.target for p in placeholders[1:]]))
    # reason: the block's other run-time inputs (GCViT's global query) are operands like any other: the rules keep
    # inside a slow path only those that broadcast over the locations, so they meet the kept locations exactly.
    paths = find_slow_paths(gm, chain, where)
    graph, last = gm.graph, placeholders[-1]
    inputs = []
    for name in BLOCK_INPUTS:
        with graph.inserting_after(last):
            last = graph.placeholder(name, default_value=None)
        inputs.append(last)
    mask, keep, drop = inputs
    param = next(call.module.parameters())
    for i, path in enumerate(paths):
        if fast_path == "scaled":  # every fast path scaled, epsilon 1e-6 (config.FAST_PATHS)
            path.layer_scale, path.eps = True, 1e-6
        with graph.inserting_after(last if path.entry.op == "placeholder" else path.entry):
            thin = call_leaf(graph, gather_locations, (path.entry, keep, path.channel, path.spatial))
        for n in path.nodes:
            n.replace_input_with(path.entry, thin)
        for total, spatial in path.sums:
            with graph.inserting_before(total):
                zeroed = call_leaf(graph, mask_locations, (total.args[0], mask, keep, spatial))
            total.update_arg(0, zeroed)
        name = "fast_path" if i == 0 else f"fast_path_{i}"  # reason: a one-path block keeps the name files know
        while hasattr(call.module, name):
            name = "tokenprune_" + name
        scale = FAST_PATH_INIT if path.layer_scale else None
        fast = AsymmetricPath(path.dim, path.channel, path.spatial, scale, path.eps)
        gm.add_submodule(name, fast.to(param.device, param.dtype))
        with graph.inserting_after(path.exit):
            mixed = graph.call_module(name, (path.entry, path.exit, mask, keep, drop))
        path.exit.replace_all_uses_with(mixed, delete_user_cb=lambda user, m=mixed: user is not m)
    graph.lint()
    block = fx.GraphModule(gm, graph, type(call.module).__name__)
    # Put back the original children so `block.mlp` keeps its type and the state_dict its names.
    for child_name, child in call.module.named_children():
        setattr(block, child_name, child)
    return block, paths


def plan_spatial(
    model: nn.Module,
    chain: Chain,
    example: torch.Tensor,
    locations: list[int],
    keep_ratios: list[float],
    name: str,
    nested: bool = False,
    fast_path: str = "block",
) -> Plan:
    """Analyse a spatial chain into a plan (docs/design.md §1.2): a `SpatialSelector` before each location; every
    block from the first location on runs its slow path at the locations the latest stage kept and a fast path
    elsewhere; the map stays whole, so the head is untouched.

    Raises:
        UnsupportedModelError: when a block has no slow path by the structural rule (e.g. ResNet bottlenecks), or
            its fast path would cost as much as the slow path it replaces (the sparse model would not be cheaper).
    """
    gm = trace(model, leaves=[c.module for c in chain.calls], name=name)
    propagate_shapes(gm, example)
    nodes = chain_nodes(gm, chain, name)
    plan = Plan(name=name, kind="spatial", chain=chain, locations=locations, keep_ratios=keep_ratios)
    for i, (call, node) in enumerate(zip(chain.calls, nodes)):
        if i >= locations[0]:
            where = f"{name} block {call.name}"
            block, paths = _asymmetric_block(call, node, chain, where, fast_path)
            plan.replace[call.name] = block
            for path in paths:
                plan.notes.append(
                    f"block {call.name}: slow path {path.nodes[0].name} .. {path.exit.name} "
                    f"({_path_macs(block, path)} MACs per location) beside a fast path"
                    + ("" if path.layer_scale else " without a layer scale (the block has none)")
                    + (f"; both scaled by {', '.join(n.name for n in path.scalers)}" if path.scalers else "")
                )
    channel = chain.channel
    graph, mask, keep, drop = gm.graph, None, None, None
    stage_at = {loc: s for s, loc in enumerate(locations)}
    for i, (call, node) in enumerate(zip(chain.calls, nodes)):
        if i in stage_at:
            s = stage_at[i]
            target = f"tokenprune_stage{s}"
            selector = SpatialSelector(chain.shape[channel], keep_ratios[s], s, channel, nested).to(example.device)
            plan.add[target] = selector
            gm.add_module(target, selector)
            with graph.inserting_before(node):
                out = graph.call_module(target, (node.args[0], mask, keep))
                mask, keep, drop = (graph.call_function(operator.getitem, (out, j)) for j in range(3))
        if call.name in plan.replace:
            runtime = runtime_kwargs(plan.replace[call.name], call, node, name)
            node.args, node.kwargs = node.args[:1], {**runtime, **dict(zip(BLOCK_INPUTS, (mask, keep, drop)))}

    recorder = SpatialRecorder(chain.names[-1], 0)
    plan.add[RECORDER] = recorder
    gm.add_module(RECORDER, recorder)
    last = nodes[-1]
    with graph.inserting_after(last):
        recorded = graph.call_module(RECORDER, (last, mask, keep))
    last.replace_all_uses_with(recorded, delete_user_cb=lambda user: user is not recorded)
    recorded.meta = dict(last.meta)
    final = final_map(model, gm, recorded)
    if final is not None:
        recorder.final_map, recorder.final_map_norm = final.module, final.norm
        recorder.final_map_channel = final.channel
        with graph.inserting_after(final.node):
            seen = graph.call_module(RECORDER, (final.node,), {"final": True})
        final.node.replace_all_uses_with(seen, delete_user_cb=lambda user: user is not seen)
        seen.meta = dict(final.node.meta)
        how = f"normalised by {final.norm}" if final.norm else "after its final norm" if final.normed else "no norm"
        plan.notes.append(f"head: feature distillation reads the final map, the output of {final.module} ({how})")
    graph.lint()
    plan.graph_module = gm
    return plan


#: Ops that only move a map's values (no arithmetic), crossed on the way between the head's pooling, the final norm and
#: the module whose output the head reads (reason: a permute or flatten there does not change what is normalised).
_LAYOUT_METHODS = frozenset({"permute", "reshape", "view", "flatten", "contiguous", "squeeze", "unsqueeze"})
_LAYOUT_FUNCTIONS = frozenset({torch.permute, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze})
_LAYOUT_MODULES = (nn.Identity, nn.Flatten)  # reason: a pool's `flatten`, an unused `norm_pre`


def _is_layout(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _LAYOUT_METHODS
    if node.op == "call_function":
        return node.target in _LAYOUT_FUNCTIONS
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), _LAYOUT_MODULES)


def _layer_norm(model: nn.Module, node: fx.Node, channels: int) -> str | None:
    """The name of the affine nn.LayerNorm over `channels` that `node` applies (`_graph.applied_norm`), else None."""
    name = applied_norm(model, node, channels, (nn.LayerNorm,))
    return name if name is not None and model.get_submodule(name).weight is not None else None


def _pool_input(node: fx.Node, reached: set[fx.Node]) -> tuple[fx.Node, int] | None:
    """(the map, its channel count) when `node` pools a map [B, C, H, W] / [B, H, W, C] / [B, H*W, C] with more than
    one location into one vector of C per image ([B, C], [B, C, 1, 1], ...); None otherwise."""
    data = [a for a in node.all_input_nodes if a in reached]
    shape_in, shape_out = (node_shape(data[0]) if len(data) == 1 else None), node_shape(node)
    if not shape_in or not shape_out or len(shape_in) not in (3, 4) or len(shape_out) < 2:
        return None
    c = math.prod(shape_out[1:])
    pools = shape_out[0] == shape_in[0] and max(shape_out[1:]) == c and math.prod(shape_in[1:]) > c
    return (data[0], c) if pools and c in (shape_in[1], shape_in[-1]) else None


def _meets_a_map(pool: fx.Node) -> bool:
    """Whether something computed from `pool`'s vector has more than one location again: a squeeze-and-excitation
    gates the map it pooled (MaxViT's MBConv, GCViT's downsampling), the head's pooling only feeds the classifier."""
    seen, stack = set(), list(pool.users)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        shape = node_shape(node)
        if shape is not None and len(shape) >= 3 and sum(size > 1 for size in shape[1:]) > 1:
            return True
        stack.extend(node.users)
    return False


def _module_output(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The outermost module (called once) whose output is `node`: its last node is `node`, read outside it."""
    last: dict[str, fx.Node] = {}
    names: dict[str, str] = {}
    for n in gm.graph.nodes:
        for key, value in (n.meta.get("nn_module_stack") or {}).items():
            last[key] = n
            names[key] = value[0] if isinstance(value, tuple) else key
    again = {key.partition("@")[0] for key in last if "@" in key}  # called more than once: no single output
    stack = node.meta.get("nn_module_stack") or {}
    for key in stack:
        outside = all(key not in (u.meta.get("nn_module_stack") or {}) for u in node.users)
        if last.get(key) is node and key not in again and "@" not in key and outside and names[key]:
            return names[key]
    return None


class FinalMap(NamedTuple):
    """Where the final-stage map is read (`final_map`)."""

    node: fx.Node  # the map's node in the model's graph
    module: str  # the model's module whose output it is (a teacher is hooked by this name)
    norm: str | None  # the LayerNorm the head applies after pooling it, applied per location by the losses
    channel: int  # the map's channel dim
    normed: bool  # a LayerNorm over C is the last arithmetic before it (already normalised)


def final_map(model: nn.Module, gm: fx.GraphModule, recorded: fx.Node) -> FinalMap | None:
    """The final-stage map the head pools, as the official AdaConvNeXt/AdaSwin distil it (docs/design.md §3.1).

    Structural: the first node after the chain that pools a map into one C-vector per image (global average pooling,
    a mean over the spatial dims) reads the final map; walking back over layout ops from what it reads, the first
    node that is the output of a model's module (called once) is the point, hooked on a teacher by that module's
    name. The map is already normalised when a LayerNorm over C is the last arithmetic before it (Swin's `norm`);
    otherwise a LayerNorm over C reached from the pooling over layout ops (ConvNeXt's `head.norm`, applied after the
    pooling) is the norm the losses apply per location of the map.

    Returns:
        The point, or None when nothing after the chain pools a map (a `features_only` backbone, a segmentation
        head).
    """
    order = list(gm.graph.nodes)
    reached, found = {recorded}, None
    for node in order[order.index(recorded) + 1 :]:
        if any(a in reached for a in node.all_input_nodes):
            found = _pool_input(node, reached)
            reached.add(node)
            if found is not None and not _meets_a_map(node):
                pool = node
                break
            found = None
    if found is None:
        return None
    point, c = found
    module = _module_output(gm, point)
    while module is None and _is_layout(gm, point) and len(point.all_input_nodes) == 1:
        point = point.all_input_nodes[0]
        module = _module_output(gm, point)
    shape = node_shape(point)
    channel = {3: (2,), 4: (1, 3)}.get(len(shape or ()), ())
    channel = next((d for d in channel if shape[d] == c), None)
    if module is None or channel is None:
        return None
    before = point
    while _is_layout(gm, before) and len(before.all_input_nodes) == 1:
        before = before.all_input_nodes[0]
    if _layer_norm(model, before, c) is not None:
        return FinalMap(point, module, None, channel, True)
    after = pool
    while len(after.users) == 1 and _is_layout(gm, next(iter(after.users))):
        after = next(iter(after.users))
    norm = _layer_norm(model, next(iter(after.users)), c) if len(after.users) == 1 else None
    return FinalMap(point, module, norm, channel, False)


def _saves_compute(block: nn.Module, path: SlowPath) -> bool:
    """Whether the slow path costs more per location than its fast path's Linear(C, C) (C^2 multiply-adds): attention's
    output projection alone (PVT-v2, whose MLP holds a conv over the grid) or RegNet's last 1x1 conv does not. The
    measured cost check after the rewrite (`measure.cost.refuse_costlier`) stays the last word."""
    return _path_macs(block, path) > path.dim**2


def _path_macs(block: nn.Module, path: SlowPath) -> int:
    """Multiply-adds per location of the slow path's Linear and 1x1 conv layers."""
    total = 0
    for n in path.nodes:
        m = block.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
        elif isinstance(m, nn.Conv2d):
            total += m.in_channels * m.out_channels // m.groups
    return total
