"""A torch.fx tracer that respects timm's registries, and the model facts that tracing needs."""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import torch
import torch.fx as fx
from torch import nn

from ..errors import UnsupportedModelError
from ..inputs import example_input  # noqa: F401 - re-exported: input geometry lives in tokenprune.inputs

__all__ = ["model_name", "trace", "example_input", "forward_defaults", "call_leaf", "training_dependent"]


def _timm_registry() -> tuple[set[type], tuple]:
    try:
        from timm.layers import _fx as timm_fx
    except ImportError as e:
        # reason: without timm's no-trace registry, timm models trace through modules timm marks untraceable and
        # fail with confusing errors; say which dependency is wrong instead of silently using an empty registry.
        raise UnsupportedModelError(
            f"cannot import timm's registry of untraceable modules, timm.layers._fx ({e}); tokenprune needs "
            "timm>=1.0.26. Upgrade it: pip install -U 'timm>=1.0.26'."
        ) from None
    functions = tuple(f for f in timm_fx.get_notrace_functions() if callable(f))
    return set(timm_fx.get_notrace_modules()), functions


class _Tracer(fx.Tracer):
    """Leaves: the modules the caller names, timm's registered no-trace modules, and torch.nn's own."""

    def __init__(self, leaves: Iterable[nn.Module] = ()) -> None:
        self._leaf_types, functions = _timm_registry()
        # reason: timm registers functions whose int arguments would be Proxies (resample_abs_pos_embed, ...)
        super().__init__(autowrap_functions=functions)
        self._leaves = {id(m) for m in leaves}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self._leaves or type(m) in self._leaf_types or super().is_leaf_module(m, qualname)


def model_name(model: nn.Module) -> str:
    """The timm architecture name when known, else the class name: used in every message about the model."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def forward_defaults(module: nn.Module) -> dict[str, object]:
    """Concrete values for every forward argument after the first: the defaults a plain `model(images)` uses."""
    params = list(inspect.signature(module.forward).parameters.values())[1:]
    concrete = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise UnsupportedModelError(
                f"{model_name(module)}: forward() needs argument {p.name!r} besides the input; tokenprune traces "
                "models called as model(images). Wrap the model in a module whose forward takes only the images."
            )
        concrete[p.name] = p.default
    return concrete


def trace(
    module: nn.Module,
    *,
    leaves: Iterable[nn.Module] = (),
    concrete_args: dict[str, object] | None = None,
    name: str | None = None,
) -> fx.GraphModule:
    """Symbolically trace `module`, specialising forward arguments after the first (to their defaults by default).

    Raises:
        UnsupportedModelError: when torch.fx cannot trace it (data-dependent control flow and the like).
    """
    name = name or model_name(module)
    tracer = _Tracer([*leaves, *training_dependent(module, name)])
    try:
        concrete = forward_defaults(module) if concrete_args is None else concrete_args
        graph = tracer.trace(module, concrete_args=concrete or None)
    except UnsupportedModelError:
        raise
    except Exception as e:  # torch.fx raises many types (TraceError, TypeError, RuntimeError...)
        raise UnsupportedModelError(
            f"{name}: torch.fx cannot trace {type(module).__name__} ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "tokenprune rewrites the traced graph, so the forward must be symbolically traceable: avoid Python "
            "control flow on tensor values, or register the offending module with "
            "timm.layers.register_notrace_module."
        ) from None
    _drop_specialized_inputs(graph)
    return fx.GraphModule(tracer.root, graph, type(module).__name__)


def training_dependent(root: nn.Module, name: str) -> list[nn.Module]:
    """Parameter-free modules whose traced graph changes with the training flag (drop path, stochastic depth, patch
    dropout). They stay calls: tracing through them would freeze them in the mode the model was traced in."""
    leaves = []
    for m in root.modules():
        if m is root or next(m.children(), None) is not None or next(m.parameters(recurse=False), None) is not None:
            continue
        if type(m).__module__.startswith("torch.nn"):
            continue  # reason: torch.nn modules are leaves of every trace already
        was, codes = m.training, []
        try:
            for mode in (True, False):
                graph = _Tracer().trace(m.train(mode), concrete_args=forward_defaults(m) or None)
                codes.append(graph.python_code("self").src)
        except Exception:  # reason: a module we cannot trace on its own is safest kept as one call
            codes = ["untraceable", "so keep it a call"]
        finally:
            m.train(was)
        if codes[0] != codes[1]:
            leaves.append(m)
    return leaves


def _drop_specialized_inputs(graph: fx.Graph) -> None:
    """Remove the placeholders that tracing specialised to constants, and the asserts guarding them.

    The rewritten model is called with its tokens only. Leaving them would also break pickling: the guard
    `torch.fx._symbolic_trace._assert_is_none` is re-wrapped by a dotted name when a GraphModule is unpickled.
    """
    placeholders = [n for n in graph.nodes if n.op == "placeholder"][1:]
    for ph in placeholders:
        dependents, stack = [], list(ph.users)
        while stack:
            n = stack.pop()
            if n not in dependents:
                dependents.append(n)
                stack.extend(n.users)
        if all(n.op == "call_function" and n.target in _GUARDS or _is_guard_input(n) for n in dependents):
            for n in reversed(_topological(graph, dependents)):
                graph.erase_node(n)
            graph.erase_node(ph)


_GUARDS = {torch._assert, fx._symbolic_trace._assert_is_none}


def _is_guard_input(node: fx.Node) -> bool:
    return all(u.op == "call_function" and u.target in _GUARDS for u in node.users)


def _topological(graph: fx.Graph, nodes: list[fx.Node]) -> list[fx.Node]:
    wanted = set(nodes)
    return [n for n in graph.nodes if n in wanted]


def call_leaf(graph: fx.Graph, fn, args: tuple, kwargs: dict | None = None) -> fx.Node:
    """Insert a call of one of tokenprune's functions that re-tracing (e.g. when unpickling) keeps as one call."""
    node = graph.call_function(fn, args, kwargs)
    node.meta["is_wrapped"] = True
    return node
