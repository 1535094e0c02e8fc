"""Attention forms found in block graphs, and their masked versions (DESIGN 1.1, masked softmax).

Recognised, by where they sit in the graph rather than by class:
- a call of `F.scaled_dot_product_attention` (timm's fused path),
- a softmax over the last dim of an [..., N, N] score tensor, N the block's token count (timm's explicit path),
- a call of an `nn.MultiheadAttention` module used as self-attention (torchvision).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from ..nn.masked import masked_mha, masked_sdpa, masked_softmax, supports_masked_mha
from ._graph import node_shape
from .tracing import call_leaf

__all__ = ["mask_block_attention"]

_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_SOFTMAX_FUNCTIONS = {F.softmax, torch.softmax}
_SDPA_ARGS = ("attn_mask", "dropout_p", "is_causal", "scale")


def _is_attention_softmax(node: fx.Node, tokens: int) -> bool:
    if not (
        (node.op == "call_method" and node.target == "softmax")
        or (node.op == "call_function" and node.target in _SOFTMAX_FUNCTIONS)
    ):
        return False
    shape = node_shape(node.args[0])
    return shape is not None and len(shape) >= 3 and shape[-1] == shape[-2] == tokens


def _softmax_dim(node: fx.Node) -> int:
    return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _check_no_position_inputs(gm: fx.GraphModule, node: fx.Node, tokens: int, where: str) -> None:
    """Refuse attention fed by token-indexed parameters or buffers (e.g. relative position bias tables)."""
    for a in _ancestors(node):
        if a.op != "get_attr":
            continue
        value = operator.attrgetter(a.target)(gm)
        if isinstance(value, torch.Tensor) and tokens in tuple(value.shape):
            raise UnsupportedModelError(
                f"{where}: its attention uses {a.target!r} of shape {tuple(value.shape)}, indexed by token position "
                "(e.g. a relative position bias). Pruning tokens would leave it misaligned, so tokenprune refuses "
                "this block; choose a model with absolute position embeddings."
            )


def mask_block_attention(gm: fx.GraphModule, tokens: int, where: str) -> int:
    """Rewrite every attention of a traced block to take the keep policy as a new last input `tokenprune_policy`.

    Args:
        gm: the block traced on its own, with shapes propagated (`tensor_meta` on every node).
        tokens: the token count N of the block's input.
        where: "<model> block <name>", for messages.

    Returns:
        The number of attention operations rewritten (at least one).

    Raises:
        UnsupportedModelError: if the block has no attention the rewrite recognises, or one it cannot mask exactly.
    """
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        policy = graph.placeholder("tokenprune_policy", default_value=None)
    count = 0
    for node in list(graph.nodes):
        replacement = None
        if node.op == "call_function" and node.target in _SDPA:
            q, k, v, *rest = node.args
            kwargs = dict(zip(_SDPA_ARGS, rest, strict=False), **node.kwargs)
            _check_no_position_inputs(gm, node, tokens, where)
            if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
                raise UnsupportedModelError(
                    f"{where}: its attention adds a mask or bias to the scores (e.g. a relative position bias) or is "
                    "causal; such terms are indexed by token position and would be misaligned once tokens are pruned, "
                    "so tokenprune refuses this block. Choose a model with absolute position embeddings."
                )
            with graph.inserting_before(node):
                replacement = call_leaf(graph, masked_sdpa, (q, k, v, policy), kwargs)
        elif _is_attention_softmax(node, tokens):
            if _softmax_dim(node) not in (-1, len(node_shape(node.args[0])) - 1):
                raise UnsupportedModelError(f"{where}: an attention softmax that is not over the last dim.")
            _check_no_position_inputs(gm, node, tokens, where)
            with graph.inserting_before(node):
                replacement = call_leaf(graph, masked_softmax, (node.args[0], policy))
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.MultiheadAttention):
            replacement = _mask_mha(gm, node, policy, where)
        if replacement is not None:
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
            count += 1
    if not count:
        raise UnsupportedModelError(
            f"{where}: no attention found (scaled_dot_product_attention, a softmax over [N, N] scores, or "
            "nn.MultiheadAttention). Later blocks must mask attention to dropped tokens; tokenprune cannot tell how "
            "this block mixes tokens."
        )
    graph.lint()
    gm.recompile()
    return count


def _mask_mha(gm: fx.GraphModule, node: fx.Node, policy: fx.Node, where: str) -> fx.Node:
    mha = gm.get_submodule(node.target)
    why = supports_masked_mha(mha)
    query, key, value, *rest = node.args
    if not (query is key is value) or rest:
        why = why or "it is not called as self-attention mha(x, x, x)"
    if any(node.kwargs.get(k) is not None for k in ("attn_mask", "key_padding_mask")):
        why = why or "it is called with an attention or padding mask"
    if why is not None:
        raise UnsupportedModelError(f"{where}: nn.MultiheadAttention {node.target!r} cannot be masked: {why}.")
    graph = gm.graph
    with graph.inserting_before(node):
        module = graph.get_attr(node.target)
        return call_leaf(graph, masked_mha, (module, query, key, value, policy), dict(node.kwargs))
