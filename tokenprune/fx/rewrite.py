"""The graph pass for token chains: insert stages before chosen blocks, mask attention after them, mask pooling."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import UnsupportedModelError
from ..nn.masked import index_policy, masked_token_mean
from ..nn.recorder import SparsityRecorder
from ..nn.select import TokenSelector
from ._graph import block_concrete_args, chain_nodes, node_shape, set_submodule
from .attention import mask_block_attention
from .discovery import SHAPE_ONLY, Call, Chain, prefix_token_count
from .tracing import call_leaf, trace

__all__ = ["rewrite_token_chain", "RECORDER"]

RECORDER = "tokenprune_recorder"


def _masked_block(call: Call, node: fx.Node, tokens: int, where: str) -> fx.GraphModule:
    concrete = block_concrete_args(call.module, node, where)
    gm = trace(call.module, concrete_args=concrete, name=where)
    ShapeProp(gm).propagate(call.args[0])
    mask_block_attention(gm, tokens, where)
    return gm


def _token_index(node: fx.Node) -> object | None:
    """The index of `x[...]` when it slices the token dim (dim 1) and keeps it; None otherwise."""
    index = node.args[1]
    if isinstance(index, tuple) and len(index) >= 2 and index[0] == slice(None) and isinstance(index[1], slice):
        return index[:2]
    return None


def _is_token_mean(node: fx.Node) -> bool:
    if not (node.op == "call_method" and node.target == "mean") and node.target is not torch.mean:
        return False
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return dim in (1, (1,), [1])


def _mask_head(graph: fx.Graph, start: fx.Node, policy: fx.Node | None, name: str) -> None:
    """Follow the chain's output through the head; token means become means over kept tokens (DESIGN 1.1)."""
    if policy is None:
        return
    masks = {start: policy}
    for node in list(graph.nodes):
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if src not in masks or node.op == "output" or (node.op, node.target) in SHAPE_ONLY:
            continue
        shape_in, shape_out = node_shape(src), node_shape(node)
        if node.op == "call_function" and node.target is operator.getitem and _token_index(node) is not None:
            with graph.inserting_after(node):
                masks[node] = call_leaf(graph, index_policy, (masks[src], _token_index(node)))
        elif _is_token_mean(node):
            keepdim = node.kwargs.get("keepdim", False)
            with graph.inserting_after(node):
                mean = call_leaf(graph, masked_token_mean, (src, masks[src], 1, keepdim))
            node.replace_all_uses_with(mean)
            graph.erase_node(node)
        elif shape_out is not None and len(shape_out) == 3 and shape_out[:2] == shape_in[:2]:
            masks[node] = masks[src]  # per-token op (norm, linear, dropout): same tokens, same mask
        elif shape_out is not None and len(shape_out) < 3 and node.target is operator.getitem:
            continue  # picks one token (the class token, which is never pruned)
        else:
            raise UnsupportedModelError(
                f"{name}: its head reduces the tokens with {node.op} {node.target!r} ({node.name}), which tokenprune "
                "cannot restrict to kept tokens in training. Supported heads take the class token or average tokens."
            )


def rewrite_token_chain(
    model: nn.Module,
    chain: Chain,
    example: torch.Tensor,
    locations: list[int],
    keep_ratios: list[float],
    name: str,
) -> tuple[fx.GraphModule, int]:
    """Rewrite `model` into a dynamically token-pruned GraphModule that shares `model`'s parameters.

    Returns:
        The sparsified GraphModule and the number of prefix tokens found.
    """
    gm = trace(model, leaves=[c.module for c in chain.calls], name=name)
    ShapeProp(gm).propagate(example)
    nodes = chain_nodes(gm, chain, name)
    image = next(n for n in gm.graph.nodes if n.op == "placeholder")
    prefix = prefix_token_count(nodes[0].args[0], image)
    tokens = chain.shape[1]
    if prefix is None:
        raise UnsupportedModelError(f"{name}: learned tokens follow the image tokens; only leading ones are supported.")

    # Trace and check every later block before changing anything, so a refusal leaves the model as it was.
    masked = {
        i: _masked_block(call, node, tokens, f"{name} block {call.name}")
        for i, (call, node) in enumerate(zip(chain.calls, nodes))
        if i >= locations[0]
    }
    graph, policy = gm.graph, None
    with graph.inserting_before(nodes[0]):
        initial_tokens = graph.call_method("size", (nodes[0].args[0], 1))
    stage_at = {loc: s for s, loc in enumerate(locations)}
    for i, (call, node) in enumerate(zip(chain.calls, nodes)):
        if i in stage_at:
            s = stage_at[i]
            target = f"tokenprune_stage{s}"
            selector = TokenSelector(chain.shape[-1], keep_ratios[s], prefix, s).to(example.device)
            model.add_module(target, selector)
            gm.add_module(target, selector)
            with graph.inserting_before(node):
                out = graph.call_module(target, (node.args[0], policy, initial_tokens))
                x, policy = (
                    graph.call_function(operator.getitem, (out, 0)),
                    graph.call_function(operator.getitem, (out, 1)),
                )
            node.update_arg(0, x)
        if i in masked:
            set_submodule(model, call.name, masked[i])
            # The block's other arguments were constants, now baked into its traced graph.
            node.args, node.kwargs = node.args[:1], {"tokenprune_policy": policy}

    recorder = SparsityRecorder(chain.names[-1], prefix)
    model.add_module(RECORDER, recorder)
    gm.add_module(RECORDER, recorder)
    last = nodes[-1]
    with graph.inserting_after(last):
        recorded = graph.call_module(RECORDER, (last, policy))
    last.replace_all_uses_with(recorded, delete_user_cb=lambda user: user is not recorded)
    recorded.meta = dict(last.meta)
    _mask_head(graph, recorded, policy, name)
    graph.lint()
    sparse = fx.GraphModule(gm, graph, type(model).__name__)
    # GraphModule keeps only the modules its graph calls, in plain containers; put back the originals so that
    # `sparse.blocks[3]` indexes and the state_dict holds every original weight under its original name.
    for child_name, child in model.named_children():
        setattr(sparse, child_name, child)
    return sparse, prefix
