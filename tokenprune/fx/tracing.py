"""A torch.fx tracer that respects timm's registries, and the model facts that tracing needs."""

from __future__ import annotations

import contextlib
import inspect
import linecache
import os
import sys
import weakref
from collections.abc import Iterable, Iterator

import torch
import torch.fx as fx
import torch.fx._symbolic_trace as _symbolic_trace
from torch import nn

from ..errors import UnsupportedModelError
from ..nn.branch import same_branch

__all__ = [
    "model_name",
    "trace",
    "ModeValue",
    "MODE_VALUE",
    "forward_defaults",
    "call_leaf",
    "training_dependent",
    "kept_training_flags",
    "released_fx_wraps",
]


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
    """Leaves: the modules the caller names, timm's registered no-trace modules, and torch.nn's own.

    Given `example` (the traced forward's arguments by name), a Python branch on a value computed from shapes alone
    is taken as the example takes it, and guarded (`_ShapeBranches`); without it, or on a value read from a tensor's
    data, torch.fx's TraceError stands.
    """

    def __init__(
        self, leaves: Iterable[nn.Module] = (), example: dict[str, object] | None = None, name: str = ""
    ) -> None:
        self._leaf_types, functions = _timm_registry()
        # reason: timm registers functions whose int arguments would be Proxies (resample_abs_pos_embed, ...)
        super().__init__(autowrap_functions=functions)
        self._leaves = {id(m) for m in leaves}
        self._branches = None if example is None else _ShapeBranches(self, example, name)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self._leaves or type(m) in self._leaf_types or super().is_leaf_module(m, qualname)

    def to_bool(self, obj: fx.Proxy) -> bool:
        taken = None if self._branches is None else self._branches.resolve(obj)
        return super().to_bool(obj) if taken is None else taken

    def create_proxy(
        self, kind: str, target: object, args: tuple, kwargs: dict, *rest: object, **options: object
    ) -> fx.Proxy:
        """A placeholder for an argument that the example passed as a tuple of numbers is a `_NumbersProxy`."""
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **options)
        value = None if self._branches is None or kind != "placeholder" else self._branches.example.get(target)
        if isinstance(value, (tuple, list)) and all(isinstance(v, (int, float, bool)) for v in value):
            return _NumbersProxy(proxy.node, self, len(value))
        return proxy


class _NumbersProxy(fx.Proxy):
    """A forward argument that the example passed as a tuple of numbers (Twins' blocks take their map's (H, W)):
    unpacked, indexed and splatted like that tuple, each element read from the run-time argument (a getitem node)."""

    def __init__(self, node: fx.Node, tracer: fx.Tracer, length: int) -> None:
        super().__init__(node, tracer)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[fx.Proxy]:
        return (self[i] for i in range(self.length))


#: What reads a tensor's shape, not its values: ``x.shape``, ``x.ndim``, ``x.size()``, ``x.dim()``.
_SHAPE_ATTRS, _SHAPE_METHODS = {"shape", "ndim"}, {"size", "dim"}


def _reads_shape(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _SHAPE_ATTRS
    return node.op == "call_method" and node.target in _SHAPE_METHODS


class _ShapeBranches:
    """Takes a traced forward's branches on shapes as the example input takes them.

    A forward that branches on its input's shape (TinyViT's block: one window when the map is the window's size, a
    padded partition otherwise) cannot be traced. When the condition is computed from shapes and Python numbers
    only, its value is the example's: the graph so far is run on the example (its nodes are appended in order, so
    each runs once), the branch taken is traced, and a `same_branch` call makes the graph raise `InputError` for an
    input whose shapes take the other one. A condition that reads a tensor's values is left to torch.fx (refused):
    frozen, it would stop legitimate inputs. The run changes nothing: modules in evaluation mode, no autograd,
    buffers restored.
    """

    def __init__(self, tracer: _Tracer, example: dict[str, object], name: str) -> None:
        self.tracer, self.example, self.name = tracer, example, name
        self.values: dict[fx.Node, object] = {}

    def resolve(self, proxy: fx.Proxy) -> bool | None:
        node = proxy.node
        if not self._from_shapes(node):
            return None
        taken = bool(self._value(node))
        shapes = [list(v.shape) for v in self.example.values() if isinstance(v, torch.Tensor)]
        where = f"{self.name} (traced with input {shapes[0]})" if shapes else self.name
        branch = f"{type(self.tracer.root).__name__}.forward's branch on {_caller_source()}"
        self.tracer.create_proxy("call_function", same_branch, (proxy, taken, where, branch), {})
        return taken

    def _from_shapes(self, node: fx.Node) -> bool:
        if not _PLAIN_MODULE_METHODS:
            return False  # reason: no way to run modules in the middle of a trace (a torch without these names)
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if n in seen or _reads_shape(n):
                continue
            seen.add(n)
            if n.op == "placeholder" and isinstance(self._value(n), torch.Tensor):
                return False
            if n.op in ("get_attr", "call_module"):
                return False
            stack.extend(n.all_input_nodes)
        return True

    def _value(self, node: fx.Node) -> object:
        if node not in self.values:
            root = self.tracer.root
            held = [(b, b.clone()) for b in root.buffers()]
            try:
                with _plain_modules(), kept_training_flags(root), torch.no_grad():
                    root.eval()
                    for n in self.tracer.graph.nodes:
                        if n not in self.values:
                            self.values[n] = self._run(n)
                        if n is node:
                            break
            finally:
                for buffer, was in held:
                    buffer.copy_(was)
        return self.values[node]

    def _run(self, n: fx.Node) -> object:
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), self.values.__getitem__)
        if n.op == "placeholder":
            return self.example.get(n.target, args[0] if args else None)
        if n.op == "get_attr":
            value = self.tracer.root
            for part in str(n.target).split("."):
                value = getattr(value, part)
            return value
        if n.op == "call_module":
            return self.tracer.root.get_submodule(str(n.target))(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        return None


#: nn.Module's own __call__ and __getattr__, which torch.fx replaces while it traces (a module call records a node; a
#: parameter read returns a Proxy). Empty where torch names them otherwise: shape branches are then refused.
_PLAIN_MODULE_METHODS = {
    name: method
    for name, method in (
        ("__call__", getattr(_symbolic_trace, "_orig_module_call", None)),
        ("__getattr__", getattr(_symbolic_trace, "_orig_module_getattr", None)),
    )
    if method is not None
}
if len(_PLAIN_MODULE_METHODS) != 2:
    _PLAIN_MODULE_METHODS = {}


@contextlib.contextmanager
def _plain_modules() -> Iterator[None]:
    """Run modules for real inside a trace: nn.Module's own methods back for the duration, the tracer's after."""
    patched = {name: getattr(nn.Module, name) for name in _PLAIN_MODULE_METHODS}
    try:
        for name, method in _PLAIN_MODULE_METHODS.items():
            setattr(nn.Module, name, method)
        yield
    finally:
        for name, method in patched.items():
            setattr(nn.Module, name, method)


def _caller_source() -> str:
    """``file:line `code` `` of the traced forward's line that branches (the first frame outside torch.fx and this
    module)."""
    frame = sys._getframe(1)
    skip = (os.path.dirname(fx.__file__), __file__)
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame = frame.f_back
    if frame is None:
        return "a shape"
    code = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    return f"`{code}` ({os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno})"


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


def _trace_once(
    module: nn.Module,
    *,
    leaves: Iterable[nn.Module] = (),
    concrete_args: dict[str, object] | None = None,
    name: str,
    example: dict[str, object] | None = None,
) -> fx.GraphModule:
    tracer = _Tracer(leaves, example, name)
    before = set(vars(module))
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
    gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
    for attr in set(vars(module)) - before:  # tensor constants the tracer parked on the module: now in `gm`
        delattr(module, attr)
    return gm


def trace(
    module: nn.Module,
    *,
    leaves: Iterable[nn.Module] = (),
    concrete_args: dict[str, object] | None = None,
    name: str | None = None,
    example: dict[str, object] | None = None,
) -> fx.GraphModule:
    """Symbolically trace `module` in evaluation *and* training mode, specialising forward arguments after the first
    (to their defaults by default).

    Python reads of ``self.training`` are frozen by tracing (``dropout_p=p if self.training else 0.``). Both traces
    must take the same path; constants that differ between them become a `ModeValue` call that picks by the training
    flag at run time, so fine-tuning keeps attention dropout and inference drops it. Where the paths differ, the
    modules whose forward branched are kept as calls (`_branching_modules`) and the module is traced again.

    With `example` (the forward's arguments by name, as a recorded call passed them), a branch on shapes is taken as
    the example takes it and guarded by a `same_branch` call (`_ShapeBranches`).

    Raises:
        UnsupportedModelError: when torch.fx cannot trace it, or its own forward takes different paths in training
            and evaluation.
    """
    name = name or model_name(module)
    leaves = [*leaves, *training_dependent(module, name)]
    kept: set[int] = set()  # the modules kept as calls because their forward branches on the training flag
    while True:
        with kept_training_flags(module):
            eval_gm, train_gm = (
                _trace_once(module.train(mode), leaves=leaves, concrete_args=concrete_args, name=name, example=example)
                for mode in (False, True)
            )
        parted = _merge_modes(eval_gm, train_gm)
        if parted is None:
            named = {id(m): n for n, m in module.named_modules()}
            eval_gm.meta[MODE_CALLS] = [f"{named[id(m)]} ({type(m).__name__})" for m in leaves if id(m) in kept]
            return eval_gm
        branching = _branching_modules(module, parted, leaves)
        if not branching:
            raise UnsupportedModelError(
                f"{name}: its forward takes a different path in training than in evaluation (first at "
                f"{parted.name}, in {type(module).__name__}'s own forward). tokenprune rewrites one traced graph for "
                "both, so it refuses rather than freeze either mode; move the branch on self.training into a "
                "submodule (tokenprune keeps such a module as one call)."
            )
        leaves += branching
        kept.update(id(m) for m in branching)


def _branching_modules(root: nn.Module, parted: fx.Node, leaves: list[nn.Module]) -> list[nn.Module]:
    """The modules to keep as calls so that both modes trace alike: every module of the type whose forward made the
    node where the traces part (LeViT's and EfficientFormer's attention reads a cache of its bias table in
    evaluation only); its code is its type's, so each of them branches the same way. That is the innermost module
    on the node's stack that is not a call already (a call the traces part at was chosen by its caller). Empty when
    only the root's own forward is left."""
    tracer = _Tracer(leaves)
    stack = parted.meta.get("nn_module_stack") or {}
    for key, entry in reversed(stack.items()):
        qualname = entry[0] if isinstance(entry, tuple) else key
        try:
            module = root.get_submodule(qualname)
        except AttributeError:
            return []
        if module is not root and not tracer.is_leaf_module(module, qualname):
            kind = type(module)
            same = [(name, m) for name, m in root.named_modules() if type(m) is kind and m is not root]
            return [m for name, m in same if not tracer.is_leaf_module(m, name)]
    return []


@contextlib.contextmanager
def released_fx_wraps() -> Iterator[list[nn.Module]]:
    """Leave torch.fx's table of wrapped functions as it was, but for the graphs of the model built inside.

    A model's own `torch.fx.wrap`-ed functions (Swin's `window_reverse`, torchvision's relative position bias) become
    calls marked ``is_wrapped``, and every compiled graph holding one registers its code's globals in a
    process-wide table that torch.fx never empties and every later trace walks (docs/design.md §2.2): each
    `sparsify` of a Swin added ~20 entries, for graphs analysed and thrown away. On exit, entries added inside are
    dropped unless they belong to a graph of the model the caller appended to the yielded list, and those go when
    that model is freed. Nothing happens where torch.fx has no such table. Like torch.fx's tracing, which patches
    module globals, not for threads tracing at the same time.
    """
    table = getattr(_symbolic_trace, "_wrapped_fns_to_patch", None)
    before = set(table) if isinstance(table, dict) else set()
    kept: list[nn.Module] = []
    try:
        yield kept
    finally:
        if isinstance(table, dict):
            graphs = [gm for m in kept for gm in m.modules() if isinstance(gm, fx.GraphModule)]
            live = {id(getattr(type(gm).forward, "__globals__", None)) for gm in graphs}
            added = [key for key in table if key not in before]
            for key in added:
                if key[0] not in live:
                    del table[key]
            owned = [key for key in added if key in table]
            if owned and kept:
                weakref.finalize(kept[0], _forget, table, owned)


def _forget(table: dict, keys: list) -> None:
    for key in keys:
        table.pop(key, None)


@contextlib.contextmanager
def kept_training_flags(module: nn.Module) -> Iterator[dict[str, bool]]:
    """Restore every submodule's own training flag on exit, whatever happens inside.

    `module.train(was)` would set one flag for all of them: a frozen ``patch_embed.eval()`` would come back in train
    mode. Yields the flags by qualified name, as they were on entry.
    """
    held = [(name, m, m.training) for name, m in module.named_modules()]
    try:
        yield {name: was for name, _, was in held}
    finally:
        for _, m, was in held:
            m.training = was


class ModeValue(nn.Module):
    """Returns the training-mode or the evaluation-mode value of a constant, by its own training flag."""

    def forward(self, train_value, eval_value):
        return train_value if self.training else eval_value


MODE_VALUE = "tokenprune_mode"
#: `GraphModule.meta` key under which `trace` lists the modules it kept as calls because their forward branches on
#: the training flag ("name (Type)"), for `Plan.describe`.
MODE_CALLS = "tokenprune_mode_calls"


def _merge_modes(eval_gm: fx.GraphModule, train_gm: fx.GraphModule) -> fx.Node | None:
    """Make `eval_gm` serve both modes when the two traces differ only in plain constants (each becomes a
    `ModeValue`); else return the evaluation trace's node where they first part, and leave it as it was."""
    eval_nodes, train_nodes = list(eval_gm.graph.nodes), list(train_gm.graph.nodes)
    mapping = dict(zip(train_nodes, eval_nodes))
    differing: list[tuple[fx.Node, str | int, object, object]] = []
    for e, t in zip(eval_nodes, train_nodes):
        if e.op == t.op == "get_attr" and e.target != t.target and _same_constant(eval_gm, train_gm, e, t):
            continue  # the tracer numbers the tensor constants it creates; the same value is the same constant
        if (e.op, e.target) != (t.op, t.target) or len(e.args) != len(t.args) or set(e.kwargs) != set(t.kwargs):
            return e
        pairs = [*enumerate(zip(e.args, t.args)), *((k, (e.kwargs[k], t.kwargs[k])) for k in e.kwargs)]
        for key, (ea, ta) in pairs:
            ta_mapped = fx.node.map_arg(ta, lambda n: mapping.get(n, n))
            if ea == ta_mapped or (isinstance(ea, float) and isinstance(ta, float) and ea != ea and ta != ta):
                continue
            if isinstance(ea, fx.Node) or isinstance(ta, fx.Node) or not _is_plain(ea) or not _is_plain(ta):
                return e
            differing.append((e, key, ta, ea))
    if len(eval_nodes) != len(train_nodes):
        return eval_nodes[min(len(eval_nodes), len(train_nodes)) - 1]
    if differing:
        eval_gm.add_module(MODE_VALUE, ModeValue())
        graph = eval_gm.graph
        for node, key, train_value, eval_value in differing:
            with graph.inserting_before(node):
                value = graph.call_module(MODE_VALUE, (train_value, eval_value))
            if isinstance(key, int):
                node.update_arg(key, value)
            else:
                node.update_kwarg(key, value)
        graph.lint()
        eval_gm.recompile()
    return None


def _same_constant(eval_gm: fx.GraphModule, train_gm: fx.GraphModule, e: fx.Node, t: fx.Node) -> bool:
    a, b = getattr(eval_gm, e.target, None), getattr(train_gm, t.target, None)
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)


def _is_plain(value: object) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def training_dependent(root: nn.Module, name: str) -> list[nn.Module]:
    """Parameter-free modules whose traced graph changes with the training flag (drop path, stochastic depth, patch
    dropout), and those that cannot be traced on their own. They stay calls: tracing through them would freeze them
    in the mode the model was traced in (or fail). A call is opaque: the rule table (`fx/rules/`) accepts one after
    the first stage only where the module's own traced code proves it acts per token (a per-sample scaler, or for
    the spatial walk a per-location run); anything else, an untraceable module included, is refused."""
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
        except Exception:  # reason: untraceable on its own: kept as one call, which the rule table then refuses
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
    """Insert a call of one of tokenprune's functions; decorated with `nn.leaf.one_call`, it stays one call when the
    graph is traced again (unpickling re-traces). No ``is_wrapped`` mark: it leaks (docs/design.md §2.2)."""
    return graph.call_function(fn, args, kwargs)
