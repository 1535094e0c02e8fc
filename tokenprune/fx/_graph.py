"""Small graph helpers shared by the token and spatial passes."""

from __future__ import annotations

import inspect

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import UnsupportedModelError
from .discovery import Call, Chain

__all__ = [
    "propagate_shapes",
    "node_shape",
    "chain_nodes",
    "block_inputs",
    "recorded_inputs",
    "set_submodule",
    "applied_norm",
]


def propagate_shapes(gm: fx.GraphModule, *inputs: object) -> None:
    """Run `gm` on `inputs`, recording each node's shape (`node_shape`). Without autograd: a recorded graph keeps every
    intermediate value alive (MobileNetV5 at 768²: 16.8 GB and 23 s, against 2.8 GB and 10 s)."""
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)


def node_shape(node: object) -> tuple[int, ...] | None:
    """The shape ShapeProp recorded for a node (None for non-tensors, constants and unpropagated nodes)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at qualified `name`."""
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def chain_nodes(gm: fx.GraphModule, chain: Chain, name: str) -> list[fx.Node]:
    """The call nodes of the chain's blocks in the traced top-level graph, checked to run one after another."""
    by_target = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    nodes = [by_target.get(block) for block in chain.names]
    missing = next((block for block, n in zip(chain.names, nodes) if n is None), None)
    leaf = next((t for t in by_target if missing and missing.startswith(f"{t}.")), None)
    if leaf is not None:
        raise UnsupportedModelError(
            f"{name}: the blocks {chain.names[0]} .. {chain.names[-1]} run inside {leaf} "
            f"({type(gm.get_submodule(leaf)).__name__}), which the trace keeps as one call (timm registers it as "
            "untraceable, or its forward branches on self.training); tokenprune inserts its stages only between calls "
            "of the traced graph."
        )
    linked = all(n is not None for n in nodes) and all(b.args and b.args[0] is a for a, b in zip(nodes, nodes[1:]))
    if not linked:
        raise UnsupportedModelError(
            f"{name}: the blocks {chain.names[0]} .. {chain.names[-1]} run in sequence, but the traced graph does not "
            "call them one after another; tokenprune cannot insert its stages between them."
        )
    return nodes


def block_inputs(call: Call, node: fx.Node, where: str) -> tuple[dict[str, object], dict[str, fx.Node]]:
    """Split a block's forward arguments after the first into constants of the trace and run-time inputs.

    Constants are what the top-level graph passes as literals (or the defaults). Everything the top-level graph
    computes is a run-time input of the traced block: tensors (a rotary embedding) and *shape values* alike —
    numbers read from the running input's shape (a feature map's (H, W)). A shape value taken as the example gave
    it would be baked into the block, and the model silently wrong at any other input size (issue #20 item 5).

    Returns:
        (concrete, runtime): argument name -> constant, and argument name -> what the top-level graph passes (a node,
        or a structure of nodes such as a tuple (H, W)).

    Raises:
        UnsupportedModelError: a required argument that the call does not pass.
    """
    params = [
        p
        for p in inspect.signature(call.module.forward).parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    bound = dict(zip([p.name for p in params[1:]], node.args[1:], strict=False), **node.kwargs)
    concrete, runtime = {}, {}
    for p in params[1:]:
        if p.name in bound:
            value = bound[p.name]
            nodes: list[fx.Node] = []
            fx.node.map_arg(value, nodes.append)
            (runtime if nodes else concrete)[p.name] = value
        elif p.default is inspect.Parameter.empty:
            raise UnsupportedModelError(f"{where}: the block is called without its argument {p.name!r}.")
        else:
            concrete[p.name] = p.default
    return concrete, runtime


def runtime_kwargs(block: fx.GraphModule, call: Call, node: fx.Node, where: str) -> dict[str, object]:
    """What the top-level graph passes for the run-time inputs (`block_inputs`) the traced `block` still takes, by
    name (tracing drops an input the block does not use: GCViT's blocks without global attention ignore its query)."""
    _, runtime = block_inputs(call, node, where)
    taken = {n.target for n in block.graph.nodes if n.op == "placeholder"}
    return {k: v for k, v in runtime.items() if k in taken}


def recorded_arguments(call: Call) -> dict[str, object]:
    """The values a recorded call passed, by argument name: the example of its block's trace (`fx.tracing.trace`)."""
    return dict(inspect.signature(call.module.forward).bind(*call.args, **call.kwargs).arguments)


def recorded_inputs(call: Call, names: list[str]) -> list[object]:
    """The values a recorded call passed for the named arguments, to propagate shapes through the traced block."""
    arguments = recorded_arguments(call)
    return [arguments[n] for n in names]


def applied_norm(model: nn.Module, node: fx.Node, channels: int, kinds: tuple[type[nn.Module], ...]) -> str | None:
    """The name of the norm of `model` that `node` applies over `channels` channels: a module of one of `kinds`
    (subclasses included: timm's and torchvision's LayerNorm2d), kept as a call or traced into `F.layer_norm` /
    `F.rms_norm` on its own weight (timm's LayerNorm); None for any other node."""
    if node.op == "call_module":
        name = str(node.target)
    elif node.op == "call_function" and node.target in (F.layer_norm, F.rms_norm):
        weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        if not isinstance(weight, fx.Node) or weight.op != "get_attr" or not str(weight.target).endswith(".weight"):
            return None
        name = str(weight.target).removesuffix(".weight")
    else:
        return None
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return name if isinstance(module, kinds) and tuple(module.normalized_shape) == (channels,) else None
