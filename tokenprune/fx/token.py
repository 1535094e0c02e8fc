"""The token strategy of the graph pass: stages before chosen blocks of a [B, N, C] chain, tokens followed after them.

Analysis only: everything here works on traced copies and returns a `Plan`; `fx/plan.py` applies it to the model.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from ..errors import UnsupportedModelError
from ..nn import tokenops
from ..nn.recorder import SparsityRecorder
from ..nn.scorer import SCORES_MODULE, AttentionScores
from ..nn.select import TokenSelector
from . import tokenflow
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
from .discovery import Call, Chain, depends_on, prefix_token_count
from .plan import RECORDER, Plan
from .tracing import call_leaf, trace

__all__ = ["plan_tokens", "BLOCK_INPUTS"]

#: Inputs the rewrite adds to every block after the first stage.
BLOCK_INPUTS = ("tokenprune_policy", "tokenprune_index")


def _block(
    call: Call, node: fx.Node, image: fx.Node, tokens: int, prefix: int, where: str, scores: bool = False
) -> tuple[fx.GraphModule, list[str]]:
    """Trace one later block and make it exact under pruning (masked attention, gathered position constants).

    With `scores`, the block also returns its attention scores (the next stage's, scorer "attention"): (tokens,
    scores [B, N]).
    """
    concrete, runtime = block_inputs(call, node, where)
    for key, value in runtime.items():
        if depends_on(value, {image}):
            raise UnsupportedModelError(
                f"{where}: the block takes {key!r}, computed from the image's values, besides its tokens (a second "
                "token stream?). tokenprune prunes one token sequence per chain and refuses rather than guess how "
                "the two align."
            )
    gm = trace(call.module, concrete_args=concrete, name=where, example=recorded_arguments(call))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    propagate_shapes(gm, call.args[0], *recorded_inputs(call, [p.target for p in placeholders[1:]]))
    root = tokenflow.TokenSet(tokens, prefix, ("root",))
    flow, outputs = tokenflow.analyse(gm, {placeholders[0]: tokenflow.Tokens((1,), root)}, where)
    if len(outputs) != 1 or outputs[0] is None or outputs[0].axes != (1,) or outputs[0].tset is not root:
        raise UnsupportedModelError(f"{where}: the block does not return its tokens as [B, N, C]; cannot sparsify it.")
    graph, last = gm.graph, placeholders[-1]
    added = []
    for name in BLOCK_INPUTS:
        with graph.inserting_after(last):
            last = graph.placeholder(name, default_value=None)
        added.append(last)
    replaced = tokenflow.apply(gm, flow, {root: (added[0], added[1], added[1])})
    if scores:
        _return_scores(gm, flow.attention, replaced, added[0], prefix, call.args[0].shape[0], where)
    block = fx.GraphModule(gm, graph, type(call.module).__name__)
    # Put back the original children so `block.attn` keeps its type and the state_dict its names.
    for child_name, child in call.module.named_children():
        setattr(block, child_name, child)
    return block, flow.notes


def _return_scores(
    gm: fx.GraphModule, attention: list, replaced: dict, policy: fx.Node, prefix: int, batch: int, where: str
) -> None:
    """Make the block return (tokens, attention scores): read from its one self-attention (`nn/scorer.py`)."""
    if len(attention) != 1:
        found = "no self-attention" if not attention else f"{len(attention)} self-attention calls"
        raise UnsupportedModelError(
            f"{where}: scorer='attention' reads the attention of the block before each stage, and this block has "
            f"{found}. Use scorer='predictor' (learned), or other locations."
        )
    kind, old = attention[0]
    shape = node_shape(old)
    if kind == "mha" or shape is None or len(shape) != 4 or shape[0] != batch:
        raise UnsupportedModelError(
            f"{where}: scorer='attention' needs the attention as [B, heads, N, ...] from a fused "
            f"(scaled_dot_product_attention) or explicit softmax call; this block's is "
            f"{'nn.MultiheadAttention' if kind == 'mha' else f'{kind} of shape {shape}'}. Use scorer='predictor'."
        )
    new = replaced[old]
    graph = gm.graph
    gm.add_module(SCORES_MODULE, AttentionScores(prefix, "qk" if kind == "sdpa" else "weights"))
    with graph.inserting_after(new):
        if kind == "sdpa":
            q, k = new.args[:2]
            kwargs = {key: new.kwargs[key] for key in ("attn_mask", "scale") if new.kwargs.get(key) is not None}
            score = graph.call_module(SCORES_MODULE, (q, k, policy), kwargs)
        else:
            score = graph.call_module(SCORES_MODULE, (new, None, policy))
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = ((output.args[0], score),)
    graph.lint()
    gm.recompile()


def _head_needs_every_token(refusal: tokenflow.Refusal | None, outputs: list) -> str | None:
    """Why the head must read the whole token set (refill, docs/design.md §2.7), or None when the rules keep it exact
    on the kept tokens.

    The rule: the head reads every token when its analysis refused a node (it reshapes tokens into a map, or uses an
    op no rule keeps exact on kept tokens: run unchanged on the refilled set, it computes what the original does), or
    when the model returns values that carry tokens (their shape must not change).
    """
    if refusal is not None:
        kind = "an op without a rule" if refusal.no_rule else "an op that needs every token"
        return f"{kind} at {refusal.node}: {refusal.op} {refusal.reason}"
    if any(o is not None for o in outputs):
        return "the model returns tokens"
    return None


def plan_tokens(
    model: nn.Module,
    chain: Chain,
    example: torch.Tensor,
    locations: list[int],
    keep_ratios: list[float],
    name: str,
    scorer: str = "predictor",
) -> Plan:
    """Analyse a token chain into a plan: traced later blocks rewritten, stages and head edits in a traced copy.

    With scorer "attention", the block before each stage also returns its attention scores for the stage.
    """
    gm = trace(model, leaves=[c.module for c in chain.calls], name=name)
    propagate_shapes(gm, example)
    nodes = chain_nodes(gm, chain, name)
    image = next(n for n in gm.graph.nodes if n.op == "placeholder")
    prefix = prefix_token_count(nodes[0].args[0], image)
    if prefix is None:
        raise UnsupportedModelError(f"{name}: learned tokens follow the image tokens; only leading ones are supported.")
    tokens = chain.shape[1]
    plan = Plan(name=name, kind="token", chain=chain, locations=locations, keep_ratios=keep_ratios, prefix=prefix)
    scored = {loc - 1 for loc in locations} if scorer == "attention" else set()
    for i, (call, node) in enumerate(zip(chain.calls, nodes)):
        if i >= locations[0] or i in scored:
            block, notes = _block(call, node, image, tokens, prefix, f"{name} block {call.name}", i in scored)
            plan.replace[call.name] = block
            plan.notes += [f"block {call.name}: {n}" for n in notes]
            if i in scored:
                plan.notes.append(f"block {call.name}: returns its attention scores for the next stage")

    # Values read from a later block's output by anything but the next block (features taken from the middle of the
    # chain) get the whole token set back (`tokenops.refill`), as does a head that needs every token.
    taps = {i: [u for u in nodes[i].users if u is not nodes[i + 1]] for i in range(locations[0], len(nodes) - 1)}
    taps = {i: users for i, users in taps.items() if users}
    graph, policy, index, score, canvas = gm.graph, None, None, None, None
    canvases: list[fx.Node] = []
    with graph.inserting_before(nodes[0]):
        initial_tokens = graph.call_method("size", (nodes[0].args[0], 1))
    stage_at = {loc: s for s, loc in enumerate(locations)}
    for i, (call, node) in enumerate(zip(chain.calls, nodes)):
        if i in stage_at:
            s = stage_at[i]
            target = f"tokenprune_stage{s}"
            selector = TokenSelector(chain.shape[-1], keep_ratios[s], prefix, s, scorer).to(example.device)
            plan.add[target] = selector
            gm.add_module(target, selector)
            with graph.inserting_before(node):
                canvas = (
                    node.args[0]
                    if canvas is None
                    else call_leaf(graph, tokenops.refill, (canvas, node.args[0], policy, index))
                )
                if canvas is not node.args[0]:
                    canvases.append(canvas)
                out = graph.call_module(target, (node.args[0], policy, index, initial_tokens, score))
                x, policy, index = (graph.call_function(operator.getitem, (out, j)) for j in range(3))
            node.update_arg(0, x)
        if call.name in plan.replace:
            runtime = runtime_kwargs(plan.replace[call.name], call, node, name)
            node.args, node.kwargs = node.args[:1], {**runtime, **dict(zip(BLOCK_INPUTS, (policy, index)))}
        if i in scored:
            with graph.inserting_after(node):
                score = graph.call_function(operator.getitem, (node, 1))
            with graph.inserting_after(node):
                x = graph.call_function(operator.getitem, (node, 0))
            node.replace_all_uses_with(x, delete_user_cb=lambda user, new=(x, score): user not in new)
            x.meta = dict(node.meta)
        if i in taps:
            out_i = x if i in scored else node
            with graph.inserting_after(out_i):
                full = call_leaf(graph, tokenops.refill, (canvas, out_i, policy, index))
            for user in taps[i]:
                user.replace_input_with(out_i, full)
            plan.notes.append(f"block {call.name}: its output is read outside the chain: the full token set (refilled)")

    recorder = SparsityRecorder(chain.names[-1], prefix)
    plan.add[RECORDER] = recorder
    gm.add_module(RECORDER, recorder)
    last = nodes[-1]
    with graph.inserting_after(last):
        recorded = graph.call_module(RECORDER, (last, policy))
    last.replace_all_uses_with(recorded, delete_user_cb=lambda user: user is not recorded)
    recorded.meta = dict(last.meta)
    final_norm = _final_norm(model, recorded, chain.shape[-1])

    head = tokenflow.TokenSet(tokens, prefix, ("root",))
    flow, outputs, refusal = tokenflow.follow(gm, {recorded: tokenflow.Tokens((1,), head)})
    why = _head_needs_every_token(refusal, outputs)
    if why is None:
        tokenflow.apply(gm, flow, {head: (policy, index, recorded)})
        plan.notes += [f"head: {n}" for n in flow.notes]
        for node in reversed(canvases):  # no refill needed after all
            if not node.users:
                graph.erase_node(node)
    else:
        # A head that needs every token (a dense head reshaping tokens into a map, a feature extractor): it runs
        # unchanged on the whole token set, dropped tokens holding their values from when they were dropped.
        with graph.inserting_after(recorded):
            full = call_leaf(graph, tokenops.refill, (canvas, recorded, policy, index))
        recorded.replace_all_uses_with(full, delete_user_cb=lambda user: user is not full)
        plan.notes.append(f"head: needs every token ({why}): it reads the full token set (refilled)")
    if final_norm is not None:
        node, recorder.final_norm = final_norm
        with graph.inserting_after(node):
            normed = graph.call_module(RECORDER, (node,), {"normed": True})
        node.replace_all_uses_with(normed, delete_user_cb=lambda user: user is not normed)
        normed.meta = dict(node.meta)
        plan.notes.append(f"head: token distillation reads the tokens after the final norm {recorder.final_norm}")
    graph.lint()
    plan.graph_module = gm
    return plan


def _final_norm(model: nn.Module, recorded: fx.Node, dim: int) -> tuple[fx.Node, str] | None:
    """The node and name of the model's final norm, where it alone reads the chain's output and normalises each token
    over its `dim` channels: an nn.LayerNorm or nn.RMSNorm of the model (subclasses included), kept as a call or
    traced into `F.layer_norm` / `F.rms_norm` on its own weight (timm's LayerNorm). None otherwise: token distillation
    then reads the chain's output."""
    users = list(recorded.users)
    if len(users) != 1 or users[0].args[:1] != (recorded,):
        return None
    name = applied_norm(model, users[0], dim, (nn.LayerNorm, nn.RMSNorm))
    return None if name is None else (users[0], name)
