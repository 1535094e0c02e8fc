"""Honest multiply-add counts of a (dense or sparsified) model, at the token counts its eval forward really uses.

Counts follow the DynamicViT paper's convention: one multiply-add ("MAC") counts as one FLOP, so the figures are
GMACs although papers print them as "GFLOPs". They come from fvcore's jit-trace analysis with extra handles for
fused attention (`_handles.py`). The model is traced in eval mode under `torch.no_grad`, exactly as inference runs
it, so a sparsified model's trace sees the shorter token sequences after each pruning stage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..errors import TokenPruneError
from ..nn.recorder import find_config as sparsify_config
from ._fvcore import FlopCountAnalysis
from ._handles import COUNTED_HANDLES, NEGLIGIBLE_OPS, Handle
from .backbone import find_backbone

__all__ = ["profile", "FlopReport", "profile_flops", "count_params", "sparsify_config", "PREDICTOR_MARK"]

#: substring that marks the modules tokenprune inserts (predictors / selectors), e.g. "tokenprune_stage0".
PREDICTOR_MARK = "tokenprune_"


@dataclass
class FlopReport:
    """Multiply-add counts of one model on one input.

    Attributes:
        total_macs: multiply-adds of one forward pass over the whole input batch.
        batch_size: leading size of the input; per-image figures divide by it.
        params: number of parameters.
        by_operator: MACs per counted operator kind (``linear``, ``conv``, ``scaled_dot_product_attention``, ...).
        by_module: MACs per qualified module name (every module, ancestors included; "" is the whole model).
        blocks: MACs per chain block, in chain order (from the sparsified model's config; empty if unknown).
        predictors: MACs per inserted tokenprune module with parameters (outermost modules whose name contains
            "tokenprune_"; with tokenprune's rewrite these are the per-stage `TokenSelector`s and their predictors).
        uncounted_ops: op -> occurrences for ops that are neither counted nor deliberately ignored as negligible.
            Non-empty means the total is a lower bound.
        negligible_ops: the ops deliberately counted as zero (element-wise, norms, softmax, top-k, gather, ...).
        backbone_module: qualified name of the submodule taken as the backbone (`tokenprune.measure.backbone`), or
            None when the whole model is the backbone (no head split).
        head_macs: MACs outside the backbone module and the predictors (0 without a split).
    """

    total_macs: int
    batch_size: int
    params: int
    by_operator: dict[str, int] = field(default_factory=dict)
    by_module: dict[str, int] = field(default_factory=dict)
    blocks: dict[str, int] = field(default_factory=dict)
    predictors: dict[str, int] = field(default_factory=dict)
    uncounted_ops: dict[str, int] = field(default_factory=dict)
    negligible_ops: tuple[str, ...] = NEGLIGIBLE_OPS
    backbone_module: str | None = None
    head_macs: int = 0

    @property
    def gmacs(self) -> float:
        """Per-image GMACs (the paper's "GFLOPs")."""
        return self.total_macs / self.batch_size / 1e9

    @property
    def predictor_gmacs(self) -> float:
        """Per-image GMACs spent in the inserted predictors."""
        return sum(self.predictors.values()) / self.batch_size / 1e9

    @property
    def backbone_gmacs(self) -> float:
        """Per-image GMACs outside the inserted predictors (what the published sparse figures count). Not the
        backbone/head split: see `head_gmacs` and `trunk_gmacs`."""
        return self.gmacs - self.predictor_gmacs

    @property
    def head_gmacs(self) -> float:
        """Per-image GMACs of the head: everything outside `backbone_module` and the predictors (0.0 without one)."""
        return self.head_macs / self.batch_size / 1e9

    @property
    def trunk_gmacs(self) -> float:
        """Per-image GMACs of the backbone module, predictors included (the whole model without a split)."""
        return self.gmacs - self.head_gmacs

    @property
    def params_m(self) -> float:
        """Parameters in millions."""
        return self.params / 1e6

    def module_gmacs(self, name: str) -> float:
        """Per-image GMACs of the module with qualified name `name` (0.0 if it ran no counted op)."""
        return self.by_module.get(name, 0) / self.batch_size / 1e9


def count_params(model: nn.Module) -> int:
    """Number of parameters of `model`, each shared tensor counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _innermost_module(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return next(reversed(stack.keys()))


@contextlib.contextmanager
def _scoped_graph_module(model: nn.Module) -> Iterator[None]:
    """Attribute a GraphModule's inlined ops to the modules they came from.

    fvcore finds an op's owner through forward hooks, but an FX GraphModule inlines its non-leaf modules: the
    attention matmul of `blocks.3.attn` becomes a call_function node of the root and would count for no block. FX
    records where each node came from (`nn_module_stack`), so while tracing we run the graph with an Interpreter that
    pushes that module's name as the jit scope around each such node.
    """
    if not isinstance(model, fx.GraphModule):
        yield
        return

    class _ScopedInterpreter(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            scope = _innermost_module(n) if n.op in ("call_function", "call_method") else None
            state = torch._C._get_tracing_state() if scope else None
            if state is None:
                return super().run_node(n)
            state.push_scope(scope)
            try:
                return super().run_node(n)
            finally:
                state.pop_scope()

    def forward(*args: Any) -> Any:
        return _ScopedInterpreter(model).run(*args)

    model.forward = forward  # instance attribute shadows the generated forward for this trace only
    try:
        yield
    finally:
        del model.forward


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, mode in training.items():
            module.training = mode


def _outermost(names: list[str]) -> list[str]:
    names = sorted(names)
    return [n for n in names if not any(n.startswith(other + ".") for other in names if other != n)]


def profile_flops(
    model: nn.Module,
    inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    extra_handles: Mapping[str, Handle | None] | None = None,
    backbone: str | None = "auto",
) -> FlopReport:
    """Count the multiply-adds of `model`'s eval forward on `inputs`.

    The model is traced in eval mode under `torch.no_grad` (its training flags are restored afterwards), so the
    count is taken at the token counts inference really uses: a sparsified model's later blocks are counted on the
    kept tokens only.

    Args:
        model: any traceable module; a `tokenprune.sparsify` result gets a per-block and per-predictor breakdown.
        inputs: one input tensor or a tuple of positional inputs, e.g. ``torch.randn(1, 3, 224, 224)``.
        extra_handles: more fvcore op handles (``"aten::op": handle``), or ``None`` values to declare an op
            negligible. They override the built-in ones.
        backbone: the backbone submodule's name for the backbone/head split; "auto" (default) finds it by the rule
            of `tokenprune.measure.backbone` from a sparsified model's chain (no split for a dense model); None
            for no split.

    Returns:
        A `FlopReport`; `.gmacs` is per image, `.uncounted_ops` lists ops whose cost is unknown.

    Raises:
        TokenPruneError: the model cannot be traced by torch.jit on this input.
    """
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    batch_size = int(inputs[0].shape[0]) if inputs and inputs[0].dim() > 0 else 1
    analysis = FlopCountAnalysis(model, inputs).clear_op_handles()
    analysis.set_op_handle(**COUNTED_HANDLES)
    analysis.set_op_handle(**dict.fromkeys(NEGLIGIBLE_OPS))
    if extra_handles:
        analysis.set_op_handle(**dict(extra_handles))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")

    with _eval_mode(model), torch.no_grad(), _scoped_graph_module(model):
        try:
            total = int(analysis.total())
        except Exception as e:  # jit tracing raises assorted RuntimeErrors; give one actionable message
            name = type(model).__name__
            raise TokenPruneError(
                f"could not trace {name} with torch.jit to count its FLOPs: {e}. Check that the model runs in eval "
                "mode on this input, or count it with extra_handles for custom ops."
            ) from e

    by_module = {name: int(sum(c.values())) for name, c in analysis.by_module_and_operator().items()}
    config = sparsify_config(model)
    chain = list(getattr(config, "chain", None) or [])
    # Inserted modules that cost multiply-adds: the predictors, and the attention scorer's scoring calls (which have
    # no parameters); bookkeeping (the state recorder) costs none.
    predictors = _outermost([n for n, macs in by_module.items() if PREDICTOR_MARK in n and macs > 0])
    if backbone == "auto":
        backbone = find_backbone(model, chain, inputs[0]) if chain else None
    head = 0
    if backbone is not None:
        if backbone not in dict(model.named_modules()):
            raise TokenPruneError(f"backbone={backbone!r} is not a submodule of {type(model).__name__}.")
        outside = sum(by_module[p] for p in predictors if not p.startswith(backbone + "."))
        head = total - by_module.get(backbone, 0) - outside
    negligible = tuple(sorted(set(NEGLIGIBLE_OPS) | {k for k, v in (extra_handles or {}).items() if v is None}))
    return FlopReport(
        total_macs=total,
        batch_size=batch_size,
        params=count_params(model),
        by_operator={k: int(v) for k, v in analysis.by_operator().items()},
        by_module=by_module,
        blocks={name: by_module.get(name, 0) for name in chain},
        predictors={name: by_module[name] for name in predictors},
        uncounted_ops=dict(analysis.unsupported_ops()),
        negligible_ops=negligible,
        backbone_module=backbone,
        head_macs=head,
    )


def profile(model: nn.Module, inputs: torch.Tensor | None = None) -> FlopReport:
    """`profile_flops` at one image of the size the model was sparsified (or is configured) for.

    Args:
        model: a sparsified or dense timm/torchvision model.
        inputs: an input batch; default one random image of the model's input size.

    Returns:
        The `FlopReport` (per-image multiply-adds in `gmacs`, predictors' share in `predictor_gmacs`).
    """
    if inputs is None:
        from ..inputs import example_input

        config = sparsify_config(model)
        inputs = torch.randn(1, *config.input_size) if config else example_input(model, batch=1)
    return profile_flops(model, inputs)
