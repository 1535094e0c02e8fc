"""Small graph helpers shared by the token and spatial passes."""

from __future__ import annotations

import inspect

import torch.fx as fx
from torch import nn

from ..errors import UnsupportedModelError
from .discovery import Chain
from .tracing import forward_defaults

__all__ = ["node_shape", "chain_nodes", "block_concrete_args", "set_submodule"]


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
    linked = all(n is not None for n in nodes) and all(b.args and b.args[0] is a for a, b in zip(nodes, nodes[1:]))
    if not linked:
        raise UnsupportedModelError(
            f"{name}: the blocks {chain.names[0]} .. {chain.names[-1]} run in sequence, but the traced graph does not "
            "call them one after another; tokenprune cannot insert its stages between them."
        )
    return nodes


def block_concrete_args(block: nn.Module, node: fx.Node, where: str) -> dict[str, object]:
    """Constants the top-level graph passes to a block besides its tokens; a runtime tensor there is refused."""
    params = list(inspect.signature(block.forward).parameters)
    bound = dict(zip(params[1:], node.args[1:], strict=False), **node.kwargs)
    for key, value in bound.items():
        if isinstance(value, fx.Node):
            raise UnsupportedModelError(
                f"{where}: the block takes the runtime input {key!r} besides its tokens (for example rotary "
                "embeddings). It is indexed by token and would have to be pruned with the tokens; tokenprune does "
                "not do that yet, so it refuses rather than compute something wrong."
            )
    return {**forward_defaults(block), **bound}
