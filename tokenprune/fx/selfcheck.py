"""The pass checks its own output (docs/design.md §2.6): masked ≡ pruned, and keep-all ≡ the original.

Run on the example input in eval mode, after the plan is applied and before `sparsify` returns:

1. pruned execution (tokens gathered) and masked execution (tokens kept, attention masked) must take the same
   decisions and give the same outputs, block by block and at the output: training then optimises the model that is
   deployed. Decisions may differ only between tokens whose scores tie to within rounding; the masked run then goes
   on with the pruned run's decisions, so the values stay comparable;
2. with every keep ratio at 1.0 the sparsified model must give the original model's outputs, and each rewritten
   block the original block's: the rewrite of the blocks and the head changed nothing but the pruning.

Small scales must not hide a wrong rewrite. Layer scales (1e-5, 1e-6 at init) and the fast path's scale make every
residual update tiny next to the stream, so a comparison relative to the stream (or the output) cannot see a block
whose update is wrong; a zero-initialised relative position bias cannot show which positions were gathered for it.
Both properties hold for any weights, so the check runs with weights that show errors (`check_weights`): every
*branch scale* — a parameter that only multiplies a value element-wise, found in the rewritten graphs
(`branch_scales`) — at 1, every all-zero parameter filled with small random values, and the predictors' weight
matrices at unit gain (N(0, 1/fan_in)): at their official init (std 0.02, zero biases) their scores vary so little
across tokens that every difference in decisions would pass as a near-tie. All are restored bitwise afterwards.
Each block is compared by its residual update f(x) = block(x) - x, relative to that update's own size.
Keep-all ≡ the original is also checked with the model's own weights on the output.

When the original model accepts a second input size (1.5x; `dense` given), masked ≡ pruned and keep-all ≡ the
original are checked there too, on one image.

Tolerances follow the precision of the model's parameters: relative 3·sqrt(eps), absolute 0.3·sqrt(eps) of the
compared value's scale (fp32: 1e-3 and 1e-4); a non-finite value in any comparison is a failure. A mismatch is an
`UnsupportedModelError` naming what differs (a stage's decisions, the first block, or the head).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import operator
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, TokenPruneError, UnsupportedModelError
from ..nn.asymmetric import FastPath
from ..nn.recorder import selectors
from ..nn.select import TokenSelector
from ..nn.spatial_predictor import SpatialSelector
from .discovery import Chain
from .spatial import BLOCK_INPUTS as SPATIAL_INPUTS
from .token import BLOCK_INPUTS as TOKEN_INPUTS
from .tracing import kept_training_flags

__all__ = ["self_check", "max_difference", "branch_scales", "check_weights", "check_values", "tolerances"]

#: Element-wise products: a parameter all of whose uses are one of these (through view-like ops) is a branch scale.
_MULTIPLY = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
#: Ops that leave a per-channel parameter a per-channel factor (broadcast shapes, dtype, device).
_VIEWS = {torch.reshape, torch.unsqueeze, "reshape", "view", "unsqueeze", "to", "type_as", "expand", "expand_as"}


def tolerances(dtype: torch.dtype) -> tuple[float, float, float]:
    """(rtol, atol, eps) for values computed in `dtype`: the two executions must agree to half the digits."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    return 3.0 * math.sqrt(eps), 0.3 * math.sqrt(eps), eps


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The coarsest floating dtype among the model's parameters (fp32 when there is none)."""
    dtypes = {p.dtype for p in model.parameters() if p.dtype.is_floating_point} or {torch.float32}
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _coarser(*tensors: torch.Tensor) -> torch.dtype:
    floats = [t.dtype for t in tensors if t.dtype.is_floating_point] or [torch.float32]
    return max(floats, key=lambda d: torch.finfo(d).eps)


def max_difference(a: object, b: object) -> float | None:
    """Largest difference between two outputs relative to tolerance (<= 1 means equal); None if shapes differ.

    The tolerance is that of the coarser dtype of each pair (`tolerances`): relative to each element of `b`, plus
    absolute relative to the largest magnitude of either tensor. A non-finite value in either gives infinity.
    """
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb)):
        return None
    worst = 0.0
    for x, y in zip(ta, tb):
        if not x.numel():
            continue
        rtol, atol, _ = tolerances(_coarser(x, y))
        x, y = x.detach().float(), y.detach().float()
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            return math.inf
        scale = torch.maximum(x.abs().max(), y.abs().max()).clamp_min(torch.finfo(torch.float32).tiny)
        worst = max(worst, float(((x - y).abs() / (atol * scale + rtol * y.abs())).max()))
    return worst


def _update_difference(x_a: torch.Tensor, y_a: torch.Tensor, x_b: torch.Tensor, y_b: torch.Tensor) -> float:
    """Largest difference of two residual updates y - x relative to tolerance (<= 1 means equal).

    Relative to update b's own size (not the stream's), plus the rounding of the stream values themselves, so a
    block whose update is tiny next to its input is still compared at the update's scale.
    """
    rtol, atol, eps = tolerances(_coarser(x_a, y_a, x_b, y_b))
    x_a, y_a, x_b, y_b = (t.detach().float() for t in (x_a, y_a, x_b, y_b))
    if not all(torch.isfinite(t).all() for t in (x_a, y_a, x_b, y_b)):
        return math.inf
    if not y_b.numel():
        return 0.0
    u_a, u_b = y_a - x_a, y_b - x_b
    rounding = 4 * eps * (x_b.abs() + y_b.abs())
    tol = (atol * u_b.abs().max() + rtol * u_b.abs() + rounding).clamp_min(torch.finfo(torch.float32).tiny)
    return float(((u_a - u_b).abs() / tol).max())


# ---------------------------------------------------------------- branch scales


def _param(gm: fx.GraphModule, target: str) -> nn.Parameter | None:
    try:
        value = gm.get_parameter(target)
    except AttributeError:
        return None
    return value


def _only_multiplies(node: fx.Node) -> bool:
    """Every use of `node`, followed through view-like ops, multiplies another value element-wise."""
    if not node.users:
        return False
    for user in node.users:
        op = user.target
        if op in _VIEWS and user.args and user.args[0] is node:
            if not _only_multiplies(user):
                return False
        elif op in _MULTIPLY and len(user.args) == 2 and not user.kwargs:
            other = user.args[1] if user.args[0] is node else user.args[0]
            if not isinstance(other, fx.Node) or other is node:
                return False
        else:
            return False
    return True


def branch_scales(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that only scale a value per channel: layer scales (timm `LayerScale.gamma`, ConvNeXt `gamma`, CaiT
    `gamma_1/2`, torchvision `layer_scale`, MetaFormer `Scale`) and the fast path's scale.

    Found structurally in the model's graphs (the sparsified model and its rewritten blocks): a parameter with at
    most one dimension larger than 1 whose every use is an element-wise product with another value. A product is
    exact under any value of the factor, so the self-check may set them to 1. `FastPath.gamma` is tokenprune's own
    layer scale (its module is not traced into any graph).
    """
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, FastPath):
            found[id(module.gamma)] = module.gamma
        if not isinstance(module, fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op != "get_attr":
                continue
            p = _param(module, node.target)
            if p is None or not p.dtype.is_floating_point or sum(s > 1 for s in p.shape) > 1:
                continue
            if _only_multiplies(node):
                found[id(p)] = p
    return list(found.values())


#: Spread of the values that all-zero parameters take during the check (timm's trunc_normal init std).
_ZERO_STD = 0.02


def check_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> the value it takes during the check: branch scales 1, all-zero parameters N(0, 0.02), the
    predictors' weight matrices N(0, 1/fan_in).

    Masked ≡ pruned and keep-all ≡ the original hold for any weights, so the check may choose weights that show
    errors: a layer scale at 1e-6 hides its block's update, and a zero-initialised table (a relative position bias)
    hides which positions were gathered for it. The values are deterministic (a fixed generator seed) and keyed by
    name, so the original model (which has the same names) gets the same ones.
    """
    scales = {id(p) for p in branch_scales(model)}
    generator = torch.Generator().manual_seed(0)
    values: dict[str, torch.Tensor] = {}
    seen: dict[int, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            values[name] = seen[id(p)]
        elif id(p) in scales:
            values[name] = seen[id(p)] = torch.ones_like(p)
        elif p.dtype.is_floating_point and p.numel() and not p.any():
            noise = torch.randn(p.shape, generator=generator) * _ZERO_STD
            values[name] = seen[id(p)] = noise.to(device=p.device, dtype=p.dtype)
    for sel_name, sel in model.named_modules():
        if not isinstance(sel, TokenSelector):
            continue
        for name, p in sel.named_parameters():
            if p.dim() == 2:  # a Linear's weight [out, in]: unit gain, so scores spread across tokens
                gain = torch.randn(p.shape, generator=generator) / math.sqrt(p.shape[1])
                values[f"{sel_name}.{name}"] = gain.to(device=p.device, dtype=p.dtype)
    return values


@contextmanager
def check_values(module: nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """Give `module`'s parameters named in `values` those values for the duration; restored bitwise afterwards, also
    when the body raises."""
    params = {id(p): (p, values[n]) for n, p in module.named_parameters(remove_duplicate=False) if n in values}
    saved = [(p, p.detach().clone()) for p, _ in params.values()]
    try:
        with torch.no_grad():
            for p, value in params.values():
                p.copy_(value)
        _drop_caches(module)
        yield
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)
        _drop_caches(module)


def _drop_caches(module: nn.Module) -> None:
    """Make modules that cache a value computed from their weights in evaluation (timm's attention bias cache in
    TinyViT, LeViT, EfficientFormer) compute it again: by timm's convention, `train(True)` empties the cache. The
    training flags are left as they were."""
    with kept_training_flags(module):
        module.train(True)


def _floats_like(value: object, dtype: torch.dtype) -> object:
    """`value` with its floating-point tensors (in tuples, lists and dicts) in `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _floats_like(v, dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_floats_like(v, dtype) for v in value)
    return value


@contextmanager
def _in_fp32(modules: list[nn.Module]) -> Iterator[None]:
    """Widen the floating-point parameters, buffers and tensor attributes of `modules` to fp32 for the duration;
    the original tensors are put back afterwards (bitwise: they are the same objects), also when the body raises."""
    params: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    slots: list[tuple[dict, str, torch.Tensor]] = []
    for root in modules:
        for m in root.modules():
            for p in m._parameters.values():
                if p is not None and p.is_floating_point() and p.dtype != torch.float32 and id(p) not in params:
                    params[id(p)] = (p, p.data)
            # Buffers, and tensors the trace stored as plain attributes (constants), widened in place of the slot.
            plain = {k: v for k, v in vars(m).items() if type(v) is torch.Tensor}
            for where, held in ((m._buffers, dict(m._buffers)), (m.__dict__, plain)):
                for k, t in held.items():
                    if t is not None and t.is_floating_point() and t.dtype != torch.float32:
                        slots.append((where, k, t))
    try:
        for p, data in params.values():
            p.data = data.float()
        for where, k, t in slots:
            where[k] = t.float()
        yield
    finally:
        for p, data in params.values():
            p.data = data
        for where, k, t in slots:
            where[k] = t


# ---------------------------------------------------------------- running


#: The inputs the rewrite adds to a block (the decisions); the block's own run-time inputs are the rest.
_REWRITE_INPUTS = frozenset((*SPATIAL_INPUTS, *TOKEN_INPUTS))


class _Run:
    """One forward of the sparsified model in an execution mode, with each hooked block's (input, output).

    Records each stage's scores and own decisions; with `forced` (per stage, a [B, N0, 1] mask over the first stage's
    tokens or locations) a masked run then continues with those decisions instead of its own, so that a near-tie
    decided the other way by rounding cannot make the two executions incomparable.
    """

    def __init__(
        self, model: nn.Module, example: torch.Tensor, execution: str, hooks: list[str], forced: list | None = None
    ) -> None:
        stages = selectors(model)
        for sel in stages:
            sel.execution = execution
        self.blocks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.inputs: dict[str, dict[str, object]] = {}  # each block's other run-time inputs in this run, by name
        self.scores: list[torch.Tensor | None] = [None] * len(stages)
        self.decision: list[torch.Tensor | None] = [None] * len(stages)  # masked: own masks over the first stage's

        def record(name):
            # A block that also returns attention scores for the next stage (scorer "attention"): (tokens, scores).
            def hook(module, args, kwargs, out):
                self.blocks[name] = (args[0], out[0] if isinstance(out, tuple) else out)
                self.inputs[name] = {k: v for k, v in kwargs.items() if k not in _REWRITE_INPUTS}

            return hook

        def scored(s):
            def hook(module, args, out):
                self.scores[s] = out[..., 0].float()  # log-probability of "keep" per token or location

            return hook

        def decided(s):
            def hook(sel, args, out):
                self.decision[s] = sel.last_decision
                if forced is None or sel.last_decision is None:
                    return out
                mask = forced[s].to(sel.last_decision.dtype)
                sel.last_decision = mask
                if isinstance(sel, SpatialSelector):
                    return (mask, *out[1:])
                prefix = torch.ones_like(mask[:, :1]).expand(-1, sel.prefix_tokens, -1)
                return (out[0], torch.cat([prefix, mask], dim=1), *out[2:])

            return hook

        handles = [model.get_submodule(n).register_forward_hook(record(n), with_kwargs=True) for n in hooks]
        handles += [sel.predictor.register_forward_hook(scored(s)) for s, sel in enumerate(stages)]
        handles += [sel.register_forward_hook(decided(s)) for s, sel in enumerate(stages)]
        try:
            with torch.no_grad():
                self.output = model(example)
        finally:
            for h in handles:
                h.remove()
        self.index = [sel.last_index for sel in stages]  # pruned: each stage's kept positions among its input

    def masks(self, kind: str) -> list[torch.Tensor]:
        """A pruned run's decisions as [B, N0, 1] masks over the first stage's tokens (locations), nested."""
        if kind == "spatial":
            return list(self.decision)
        masks, position, total = [], None, self.scores[0].shape[1]
        for idx in self.index:
            position = idx if position is None else position.gather(1, idx)
            masks.append(torch.zeros(idx.shape[0], total, 1, device=idx.device).scatter(1, position.unsqueeze(-1), 1.0))
        return masks


def _positions(chain: Chain, locations: list[int], index: list, prefix: int, batch: int) -> dict[int, torch.Tensor]:
    """Chain index -> positions [B, n] (prefix included) of the pruned run's tokens among the masked run's."""
    stage_at = {loc: s for s, loc in enumerate(locations)}
    positions, position = {}, None
    for i in range(len(chain.calls)):
        if i in stage_at:
            idx = index[stage_at[i]]
            position = idx if position is None else position.gather(1, idx)
        if position is not None:
            head = torch.arange(prefix, device=position.device).expand(batch, -1)
            positions[i] = torch.cat([head, position + prefix], dim=1)
    return positions


def _kept(t: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    if positions is None:
        return t
    return t.gather(1, positions.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def _decisions_differ(pruned: list, masked: _Run, dtype: torch.dtype) -> int | None:
    """The first stage whose decisions differ between the runs other than by a near-tie, else None.

    Before a stage the two executions agree only to rounding, so tokens whose scores tie to within tolerance may be
    ranked either way; any other difference means the stage read values that differ between the executions.
    """
    rtol, atol, _ = tolerances(dtype)
    for s, (a, b) in enumerate(zip(pruned, masked.decision)):
        if a is None or b is None or a.shape != b.shape:
            return s
        differ = (a != b)[..., 0]
        if not differ.any():
            continue
        score = masked.scores[s]
        for row in range(score.shape[0]):
            moved = score[row][differ[row]]
            if not moved.numel():
                continue
            scale = score[row].abs().max()
            if moved.max() - moved.min() > atol * scale + rtol * moved.abs().max():
                return s
    return None


def _first_block(
    chain: Chain, locations: list[int], pruned: _Run, masked: _Run, prefix: int, batch: int
) -> tuple[str, float]:
    """The first hooked block whose update differs between masked and pruned execution, and by how much."""
    positions = _positions(chain, locations, pruned.index, prefix, batch) if chain.kind == "token" else {}
    for i, name in enumerate(chain.names):
        if name not in pruned.blocks or name not in masked.blocks:
            continue
        (x_p, y_p), (x_m, y_m) = pruned.blocks[name], masked.blocks[name]
        at = positions.get(i)
        x_m, y_m = _kept(x_m, at), _kept(y_m, at)
        if x_m.shape != x_p.shape or y_m.shape != y_p.shape:
            return name, math.inf
        d = _update_difference(x_m, y_m, x_p, y_p)
        if d > 1:
            return name, d
    return "", 0.0


def _fail(name: str, what: str, size: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{name}: self-check failed: {what}{size}. tokenprune refuses it rather than train "
        "one model and deploy another (or return a model that differs from yours)."
    )


def _how_much(d: float | None) -> str:
    return "shapes differ" if d is None else ("non-finite values" if math.isinf(d) else f"{d:.3g}x tolerance")


def _check_masked_vs_pruned(
    model: nn.Module,
    chain: Chain,
    locations: list[int],
    example: torch.Tensor,
    name: str,
    prefix: int,
    size: str,
    dtype: torch.dtype,
) -> None:
    hooks = [n for n in chain.names if isinstance(model.get_submodule(n), fx.GraphModule)]
    pruned = _Run(model, example, "pruned", hooks)
    decisions = pruned.masks(chain.kind)
    masked = _Run(model, example, "masked", hooks, forced=decisions)
    stage = _decisions_differ(decisions, masked, dtype)
    if stage is not None:
        raise _fail(
            name,
            f"stage {stage} kept other {'tokens' if chain.kind == 'token' else 'locations'} in masked execution "
            "(training) than in pruned execution (inference) for the same input, beyond a near-tie: it read values "
            "that differ between the two",
            size,
        )
    block, d_block = _first_block(chain, locations, pruned, masked, prefix, example.shape[0])
    d = max_difference(_lower(masked.output, dtype), _lower(pruned.output, dtype))
    if block or d is None or d > 1:
        where = f"block {block}" if block else "the head"
        how = _how_much(d_block if block else d)
        raise _fail(
            name,
            f"masked execution (training) and pruned execution (inference) give different outputs for the same "
            f"decisions ({how}), first in {where} (checked with branch scales at 1 and zero parameters filled)",
            size,
        )


def _check_blocks_keep_all(model: nn.Module, chain: Chain, example: torch.Tensor, name: str) -> None:
    """With every keep ratio at 1, each rewritten block gives what the original block gives on the same input."""
    rewritten = {i: n for i, n in enumerate(chain.names) if isinstance(model.get_submodule(n), fx.GraphModule)}
    run = _Run(model, example, "pruned", list(rewritten.values()))
    for i, block in rewritten.items():
        call = chain.calls[i]
        if block not in run.blocks or call.module is model.get_submodule(block):
            continue
        x, y = run.blocks[block]
        # The original block is no longer in the model: `model.eval()` did not reach its own flag (its children are
        # shared, and `self_check` puts their flags back when it ends).
        call.module.eval()
        # The arguments recorded when the chain was found, but for the run-time inputs this run passed (GCViT's global
        # query is computed from this run's map and weights, not the discovery's).
        bound = inspect.signature(call.module.forward).bind(x, *call.args[1:], **call.kwargs)
        bound.arguments.update(run.inputs[block])
        with torch.no_grad():
            args, kwargs = _floats_like((bound.args[1:], bound.kwargs), x.dtype)  # recorded in the model's dtype
            original = call.module(x, *args, **kwargs)
        original = original[0] if isinstance(original, tuple) else original
        d = _update_difference(x, y, x, original) if y.shape == original.shape else None
        if d is None or d > 1:
            raise _fail(
                name,
                f"with every keep ratio at 1.0 the rewritten block {block} does not reproduce the original block "
                f"({_how_much(d)}; checked with branch scales at 1 and zero parameters filled)",
                "",
            )


def _lower(value: object, dtype: torch.dtype) -> list[torch.Tensor]:
    """`value`'s tensors at the model's precision where that is coarser (an output cast up to fp32 compares at it)."""
    coarse = torch.finfo(dtype).eps
    return [
        t.to(dtype) if t.dtype.is_floating_point and coarse > torch.finfo(t.dtype).eps else t for t in _tensors(value)
    ]


def _second_size(example: torch.Tensor) -> tuple[int, int] | None:
    """1.5x the example's height and width, rounded to the largest power of two (up to 32) dividing each."""
    if example.dim() != 4:
        return None

    def grow(n: int) -> int:
        step = math.gcd(n, 32)
        return max(step, round(1.5 * n / step) * step)

    return grow(example.shape[2]), grow(example.shape[3])


def _check_example(example: torch.Tensor, name: str) -> None:
    if not isinstance(example, torch.Tensor) or example.dim() == 0 or example.shape[0] == 0:
        shape = list(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__
        raise UnsupportedModelError(
            f"{name}: the example input {shape} has no images; the self-check needs at least one. Pass "
            "example_inputs with batch >= 1 (or leave it out for a random batch)."
        )
    if example.is_floating_point() and not torch.isfinite(example).all():
        raise UnsupportedModelError(
            f"{name}: the example input holds NaN or infinite values, so no comparison on it can show that the "
            "rewrite is exact. Pass finite example_inputs (or leave it out for a random batch)."
        )


def self_check(
    model: nn.Module,
    chain: Chain,
    locations: list[int],
    example: torch.Tensor,
    name: str,
    dense: nn.Module | None = None,
) -> None:
    """Raise `UnsupportedModelError` unless masked ≡ pruned and keep-all ≡ the original on `example` (eval mode).

    Args:
        model: the sparsified model.
        chain: its chain, with the original blocks and the original's output on `example` (`chain.reference`).
        locations: chain indices of the stages.
        example: the input the chain was found with.
        name: the model's name, for messages.
        dense: the original model, unchanged, or None (`inplace=True`): with it the check also runs at a second input
            size that the original accepts.

    The model's stages and parameters are left as they were (execution mode, keep ratios, training flag, branch
    scales bitwise, nothing recorded).
    """
    _check_example(example, name)
    stages = selectors(model)
    saved = [(s.execution, s.keep_ratio) for s in stages]
    training = model.training
    model.eval()
    prefix = stages[0].prefix_tokens if stages else 0
    dtype = _model_dtype(model)
    low = torch.finfo(dtype).eps > torch.finfo(torch.float32).eps  # bf16, fp16
    # A bf16/fp16 model is checked on fp32 values (weights widened exactly, restored bitwise): the rewrite's
    # structure is what masked ≡ pruned verifies, and in low precision the two executions (different kernels and
    # lengths) would differ by rounding that grows with depth. Keep-all ≡ the original is checked in the model's own
    # precision on the output: with every token kept, pruned execution runs the original's ops.
    exact = torch.float32 if low else dtype

    def widened():
        return _in_fp32([model] if dense is None else [model, dense]) if low else contextlib.nullcontext()

    wide = example.float() if low and example.is_floating_point() else example
    try:
        try:
            with widened():
                weights = check_weights(model)
                with check_values(model, weights):
                    _check_masked_vs_pruned(model, chain, locations, wide, name, prefix, "", exact)
                    for s in stages:
                        s.keep_ratio = 1.0
                    _check_blocks_keep_all(model, chain, wide, name)
            keep_all = _Run(model, example, "pruned", []).output
            d = max_difference(_lower(keep_all, dtype), _lower(chain.reference, dtype))
            if d is None or d > 1:
                raise _fail(
                    name,
                    "with every keep ratio at 1.0 the rewritten model does not reproduce the original "
                    f"({_how_much(d)})",
                    "",
                )
            for s, (_, ratio) in zip(stages, saved):
                s.keep_ratio = ratio
            if dense is not None:
                patches = [s.last_initial_patches for s in stages]  # what the example-size run saw, as before
                with widened():
                    weights = check_weights(model)
                    _check_second_size(model, dense, chain, locations, wide, name, prefix, exact, weights)
                for s, n in zip(stages, patches):
                    s.last_initial_patches = n
        except TokenPruneError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the rewritten graph raises, the user gets a reason
            raise UnsupportedModelError(
                f"{name}: the sparsified model fails on the example input ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); tokenprune refuses it rather than return a broken model."
            ) from e
    finally:
        for s, (execution, ratio) in zip(stages, saved):
            s.execution, s.keep_ratio = execution, ratio
        for m in model.modules():  # what the check's forwards recorded is not the user's first forward
            for attr in getattr(m, "_transient", ()):
                setattr(m, attr, None)
        model.train(training)


def _check_second_size(
    model: nn.Module,
    dense: nn.Module,
    chain: Chain,
    locations: list[int],
    example: torch.Tensor,
    name: str,
    prefix: int,
    dtype: torch.dtype,
    weights: dict[str, torch.Tensor],
) -> None:
    """Masked ≡ pruned and keep-all ≡ the original at 1.5x the example's size, if the original model runs there."""
    size = _second_size(example)
    if size is None or size == tuple(example.shape[2:]):
        return
    image = F.interpolate(example[:1].float(), size=size, mode="bilinear", align_corners=False).to(example.dtype)
    # The original is the user's model: every submodule's own training flag is put back, not one flag for all.
    with kept_training_flags(dense), check_values(model, weights), check_values(dense, weights):
        dense.eval()
        try:
            with torch.no_grad():
                reference = dense(image)
        except Exception:  # noqa: BLE001 - the original does not take this size: nothing to compare
            return
        where = f" at input size {list(image.shape[1:])}"
        try:
            _check_masked_vs_pruned(model, chain, locations, image, name, prefix, where, dtype)
            stages = selectors(model)
            ratios = [s.keep_ratio for s in stages]
            for s in stages:
                s.keep_ratio = 1.0
            keep_all = _Run(model, image, "pruned", []).output
            for s, r in zip(stages, ratios):
                s.keep_ratio = r
        except InputError:
            return  # a block's shape branch stops this size, by design (nn/branch.py): it cannot run wrong there
        except TokenPruneError:
            raise
        except Exception as e:  # noqa: BLE001 - the original runs at this size; the sparsified model must too
            raise UnsupportedModelError(
                f"{name}: self-check failed: the original model runs at input size {list(image.shape[1:])} but "
                f"the sparsified one fails there ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                "; a shape taken from the example input may be frozen into the rewrite. tokenprune refuses it "
                "rather than return a model that breaks on other sizes."
            ) from e
        d = max_difference(_lower(keep_all, dtype), _lower(reference, dtype))
        if d is None or d > 1:
            raise _fail(
                name,
                "with every keep ratio at 1.0 the rewritten model does not reproduce the original "
                f"({_how_much(d)}; checked with branch scales at 1 and zero parameters filled)",
                where,
            )
