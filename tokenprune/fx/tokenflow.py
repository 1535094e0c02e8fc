"""Following the token axis through a traced graph (docs/design.md §2.3): analysis first, edits applied after.

After the first stage, every value that carries tokens is tracked with the dims that index them and the *token set*
they belong to. Each node that reads such a value is looked up in the rule table (`fx/rules/`), whose rule reads the
node's arguments and says what it is:

- **token-wise** (element-wise ops, Linear/LayerNorm over channels, reshapes and permutes that keep the token axis
  whole, slices of other dims): the token axes are carried to its output;
- a **recognised token mixer**, rewritten: self-attention (SDPA, a softmax over [.., N, N] scores,
  `nn.MultiheadAttention`) masks dropped tokens; attention whose keys are tokens but whose queries are not (class
  attention, attention pooling) masks dropped keys; a mean or sum over tokens counts kept tokens only; a slice or
  concatenation of the token axis derives a new token set;
- a **position-indexed constant** meeting tokens (a relative position bias, rotary embeddings, anything full-length
  that does not come from the tokens): gathered to the tokens left in pruned execution, used whole when masked;
- anything else: a refusal that names the node. Nothing is assumed token-wise without a rule.

`follow` returns the edits and the refusal, if any, as data; `analyse` raises on a refusal; `apply` makes the edits.
The analysis never changes the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from ..errors import UnsupportedModelError
from ..nn import tokenops
from .rules import Effect, Index, Policy, Refusal, Refused, Tokens, TokenSet, Values, lookup
from .rules.table import key
from .tracing import call_leaf

__all__ = ["TokenSet", "Tokens", "FlowPlan", "Refusal", "follow", "analyse", "apply"]


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

    def add(self, node: fx.Node, effect: Effect) -> None:
        for g in effect.gathers:
            self.gathers.append((node, g.value, g.tset, g.dims, g.rank))
        for m in effect.masks:
            self.masks.append((node, m.value, m.tset, m.dim))
            self.notes.append(f"{node.name}: contraction over tokens restricted to kept tokens")
        r = effect.rewrite
        if r is not None:
            self.replace.append((node, r.fn, r.args, r.kwargs))
            self.notes.append(r.note)
            if r.attention is not None:
                self.attention.append((r.attention, node))


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """How the node is called: "call_module 'mlp.fc1' (Linear)", "attribute 'mT'", "call_method 'softmax'"."""
    op, target = key(node, gm)
    if op == "call_module":
        return f"call_module {node.target!r} ({target.__name__})"
    name = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
    return f"{'attribute' if op == 'getattr' else op} {name!r}"


def follow(gm: fx.GraphModule, seeds: dict[fx.Node, Tokens]) -> tuple[FlowPlan, list[Tokens | None], Refusal | None]:
    """Follow the tokens from `seeds` through `gm`'s graph (shapes propagated), applying the rule table
    (`fx/rules/`) to every node that reads them.

    Returns:
        The plan, for each value the graph returns the tokens it carries (None for none), and the refusal that
        stopped the walk (None when every node has a rule that keeps it exact).
    """
    info: dict[fx.Node, object] = dict(seeds)
    values, plan = Values(gm, info), FlowPlan()
    for node in gm.graph.nodes:
        if node in info or node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            return plan, [values.tokens(a) for a in node.all_input_nodes], None
        if not values.has_tokens((node.args, node.kwargs)):
            continue
        rule = lookup(gm, node)
        if rule is None or rule.token is None:
            reason = "reads tokens and has no rule that keeps it exact when tokens are pruned"
            return plan, [], Refusal(node.name, _describe(gm, node), reason, no_rule=True)
        try:
            effect = rule.token(values, node)
        except Refused as e:
            return plan, [], Refusal(node.name, _describe(gm, node), e.reason)
        plan.add(node, effect)
        info[node] = effect.out
    return plan, [], None


def analyse(gm: fx.GraphModule, seeds: dict[fx.Node, Tokens], where: str) -> tuple[FlowPlan, list[Tokens | None]]:
    """`follow`, raising on a refusal.

    Raises:
        UnsupportedModelError: a node reads tokens and no rule keeps it exact under pruning; the message names it.
    """
    plan, outputs, refusal = follow(gm, seeds)
    if refusal is not None:
        raise UnsupportedModelError(
            f"{where}: {refusal}. tokenprune follows the token axis through every op after the first stage and "
            "refuses what it cannot keep exact, rather than return a model whose training and inference "
            "computations differ."
        )
    return plan, outputs


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
        if isinstance(a, Policy):
            return make.get(a.tset)[0]
        if isinstance(a, Index):
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
        # reason: an inherited is_wrapped mark would register the new call with torch.fx (see `call_leaf`)
        new.meta = {k: v for k, v in node.meta.items() if k != "is_wrapped"}
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        replaced[node] = new
    graph.lint()
    gm.recompile()
    return replaced
