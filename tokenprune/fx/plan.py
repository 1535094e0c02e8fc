"""Plan, then apply (docs/design.md §2.6): the `Plan` that analysis produces and the step that installs it.

`fx/analysis.py::build_plan` analyses a model — chain, prefix tokens, every later block, the head — with the token or
the spatial strategy, working only on traced copies; it is where every refusal happens. `apply_plan` installs the
plan's new and rewritten modules into the model, logging each change so that `Applied.rollback` can put the model
back exactly as it was (the self-check in `tokenprune.sparsify` may still refuse after applying).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from ..nn.branch import same_branch
from ._graph import set_submodule
from .discovery import Chain
from .tracing import MODE_CALLS

__all__ = ["Plan", "Applied", "RECORDER", "apply_plan"]

RECORDER = "tokenprune_recorder"


@dataclass
class Plan:
    """What the pass will do to a model; nothing of it is installed yet.

    Attributes:
        name: the model's name, for messages.
        kind: "token" or "spatial".
        chain: the blocks found.
        locations: chain indices of the blocks the stages precede.
        keep_ratios: per-stage keep ratios.
        prefix: never-pruned leading tokens (0 for spatial chains).
        decisions: "nested" or "independent" (spatial stages that each choose among all locations).
        fast_path: "block" or "scaled", the form of spatial fast paths (`tokenprune.config.FAST_PATHS`).
        graph_module: the rewritten trace of the whole model; its graph calls the modules below by name.
        add: new top-level modules (stages, recorder) by attribute name.
        replace: rewritten blocks by qualified name.
        notes: one line per edit, for `describe`.
    """

    name: str
    kind: str
    chain: Chain
    locations: list[int]
    keep_ratios: list[float]
    prefix: int = 0
    decisions: str = "nested"
    fast_path: str = "block"
    graph_module: fx.GraphModule | None = None
    add: dict[str, nn.Module] = field(default_factory=dict)
    replace: dict[str, nn.Module] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """A readable account of the plan: chain, stages, and each edit."""
        lines = [
            f"{self.name}: {self.kind} chain of {len(self.chain.calls)} blocks "
            f"({self.chain.names[0]} .. {self.chain.names[-1]}), shape {list(self.chain.shape)}, "
            f"prefix tokens {self.prefix}",
            "stages before blocks "
            + ", ".join(f"{self.chain.names[loc]} (keep {r:.3f})" for loc, r in zip(self.locations, self.keep_ratios)),
        ]
        calls = self.graph_module.meta.get(MODE_CALLS) if self.graph_module is not None else None
        if calls:
            lines.append(
                "kept as calls, their forward branching on self.training (each mode runs its own path): "
                + ", ".join(calls)
            )
        branches: dict[str, list[str]] = {}  # only rewritten blocks are traced with an example (fx/tracing.py)
        for where, block in self.replace.items():
            nodes = block.graph.nodes if isinstance(block, fx.GraphModule) else ()
            for text in dict.fromkeys(n.args[3] for n in nodes if n.op == "call_function" and n.target is same_branch):
                branches.setdefault(text, []).append(where)
        for branch, wheres in branches.items():
            lines.append(
                f"shape branch taken as the example input took it (an input taking the other raises InputError): "
                f"{branch}, in {', '.join(wheres)}"
            )
        return "\n".join(lines + [f"  {n}" for n in self.notes])


@dataclass
class Applied:
    """A plan installed in a model, with the log to undo it."""

    model: fx.GraphModule
    _undo: list = field(default_factory=list)

    def rollback(self) -> None:
        """Put the original model back exactly as it was before `apply_plan`."""
        for fn in reversed(self._undo):
            fn()
        self._undo.clear()


def apply_plan(model: nn.Module, plan: Plan) -> Applied:
    """Install `plan` in `model` and return the sparsified GraphModule with an undo log.

    The result shares `model`'s modules and parameters; the original children are put back on it so that
    `sparse.blocks[3]` indexes and the state_dict holds every original weight under its original name.
    """
    applied = Applied(model=None)  # type: ignore[arg-type]
    try:
        for qualified, module in plan.replace.items():
            old = model.get_submodule(qualified)
            applied._undo.append(lambda q=qualified, m=old: set_submodule(model, q, m))
            set_submodule(model, qualified, module)
        for attr, module in plan.add.items():
            applied._undo.append(lambda a=attr: delattr(model, a) if a in model._modules else None)
            model.add_module(attr, module)
        gm = plan.graph_module
        # Built from the traced copy, which also holds what the trace itself created (tensor constants); the model's
        # own children (with the rewritten blocks installed) are then put back.
        sparse = fx.GraphModule(gm, gm.graph, type(model).__name__)
        for child_name, child in model.named_children():
            setattr(sparse, child_name, child)
        _carry_attributes(model, sparse)
    except BaseException:
        applied.rollback()  # a half-applied plan is never left behind
        raise
    applied.model = sparse
    return applied


def _is_plain(value: Any) -> bool:
    """Data that describes a model and cannot carry behaviour: numbers, strings, None, and containers of them."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def _carry_attributes(model: nn.Module, sparse: fx.GraphModule) -> None:
    """Give the sparse model the original's public plain-data attributes: timm's ``pretrained_cfg`` (the mean, std
    and crop `timm.data.resolve_model_data_config` reads: without it a CLIP model would be fed ImageNet statistics),
    ``num_classes``, ``num_features``, torchvision's ``image_size``, ... — facts as of the trace. Methods are not
    carried (`forward_features`, `reset_classifier` would run or change the dense code, not the graph), nor is anything
    that is not plain data. Recorded in the GraphModule's meta too, which `deepcopy` restores them from (pickling keeps
    them as they are)."""
    carried = {
        key: value
        for key, value in vars(model).items()
        if not key.startswith("_") and key != "training" and not hasattr(sparse, key) and _is_plain(value)
    }
    for key, value in carried.items():
        setattr(sparse, key, value)
    sparse.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {}).update(carried)
