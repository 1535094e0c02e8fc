"""`tokenprune.sparsify`: the public entry point of the graph pass."""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .config import (
    DEFAULT_RATIO,
    SparsifyConfig,
    check_fast_path,
    check_ratio,
    default_keep_ratios,
    default_locations,
)
from .errors import ConfigError, TokenPruneError, UnsupportedModelError
from .fx._graph import set_submodule
from .fx.analysis import build_plan
from .fx.discovery import Chain, find_chain
from .fx.plan import Plan, apply_plan
from .fx.selfcheck import self_check
from .fx.tracing import kept_training_flags, model_name, released_fx_wraps, trace
from .inputs import example_input
from .io.source import timm_feature_kwargs
from .measure.backbone import image_batch_inputs
from .measure.budget import at_budget
from .measure.cost import ComputeModel, refuse_costlier
from .models import copy_model
from .nn.recorder import config_of, find_config, find_recorder, selectors
from .nn.select import EXECUTIONS, SCORERS

__all__ = ["sparsify", "plan", "set_execution", "set_keep_ratios", "config_of", "find_config", "refuse_wrappers"]


def _check_locations(locations: Sequence[int] | None, depth: int, kind: str, name: str) -> list[int]:
    if locations is None:
        return default_locations(depth, kind)
    try:
        locs = [int(loc) for loc in locations]
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: locations={locations!r} must be block indices (ints).") from None
    if not locs or any(not 1 <= loc < depth for loc in locs) or locs != sorted(set(locs)):
        raise ConfigError(
            f"{name}: locations={list(locations)!r} are invalid for a chain of {depth} blocks; give increasing, "
            f"distinct block indices in [1, {depth - 1}] (a stage runs before the block with that index)."
        )
    return locs


def _check_keep_ratios(keep_ratios, ratio: float, stages: int, kind: str, name: str) -> list[float]:
    if keep_ratios is None:
        values = default_keep_ratios(ratio, stages, kind)
        if any(v <= 0 for v in values):
            raise ConfigError(f"{name}: ratio={ratio} gives keep ratios {values}; use a larger ratio.")
        return values
    values = [check_ratio(v, "keep_ratios entry") for v in keep_ratios]
    if len(values) != stages:
        raise ConfigError(f"{name}: {len(values)} keep_ratios for {stages} locations; give one per location.")
    if any(b > a for a, b in zip(values, values[1:])):
        raise ConfigError(f"{name}: keep_ratios={values} increase; a dropped token never returns, so they can't.")
    return values


def _warn_tiny_keep(patches: int, keep_ratios: list[float], name: str, stacklevel: int = 4) -> None:
    for s, kr in enumerate(keep_ratios):
        if math.floor(kr * patches + 1e-6) < 1:
            warnings.warn(
                f"{name}: stage {s} keeps {kr:.4f} of {patches} patch tokens, less than one; it keeps 1 instead.",
                stacklevel=stacklevel,
            )


def sparsify(
    model: nn.Module,
    ratio: float = DEFAULT_RATIO,
    *,
    locations: Sequence[int] | None = None,
    keep_ratios: Sequence[float] | None = None,
    example_inputs: torch.Tensor | None = None,
    inplace: bool = False,
    scorer: str = "predictor",
    decisions: str = "auto",
    fast_path: str = "block",
) -> nn.Module:
    """Insert learned token-importance predictors and sparsification stages into a vision model.

    The model is traced with torch.fx; its chain of blocks mapping [B, N, C] tokens to [B, N, C] is found from the
    graph; a `TokenSelector` runs before each location. In train mode decisions are hard Gumbel samples and later
    blocks mask attention to dropped tokens (the output has the original's form); in eval mode the top-k tokens are
    gathered and later blocks run on fewer tokens. `tokenprune.sparsity_state(model)` returns what the last forward
    decided. Feature-map chains (ConvNeXt, Swin) are sparsified spatially: the map stays whole and each block's MLP runs
    at the kept locations only; so is a token chain that the token rules refuse when its tokens are exactly the image's
    grid (no class token: XCiT, Twins, MLP-Mixer).

    Args:
        model: a timm or torchvision model (or any traceable model with such a chain).
        ratio: base keep ratio rho in (0, 1]; stage s keeps rho^(s+1) of the initial patch tokens by default.
        locations: chain indices of the blocks the stages precede; default D/4, D/2, 3D/4.
        keep_ratios: per-stage fractions of the initial patch tokens, non-increasing; overrides `ratio`'s schedule.
        example_inputs: an input batch for shape discovery; default: random, sized from the model's config.
        inplace: build the result from `model`'s own modules and parameters instead of a deep copy (saves memory;
            `model` then shares them and should not be used on its own afterwards). If anything fails, `model` is
            put back exactly as it was (the same modules, parameters, buffers and training flags).
        scorer: how stages rank tokens: "predictor" (learned, DynamicViT; needs fine-tuning) or "attention" (the
            attention the block before each stage pays from the class token, or receives on average; works without
            training, token models only).
        decisions: how later stages relate to earlier ones: "auto" (token models "nested": a stage chooses among
            the tokens still there; spatial models "independent": each stage chooses among all locations, as the
            official AdaConvNeXt/AdaSwin do), or "nested" for spatial models too.
        fast_path: spatial models: "block" (a fast path has a layer scale only where the block has one, and the
            epsilon of the block's norm, as the official code) or "scaled" (always a layer scale, epsilon 1e-6).

    Returns:
        A `torch.fx.GraphModule` with the original weights under their original names plus the stages' weights;
        `tokenprune.config_of(result)` gives its `SparsifyConfig`. Its original submodules keep their training
        flags (a frozen ``patch_embed.eval()`` stays in eval mode); the stages and rewritten blocks take the flag of
        the module they stand for or sit in. It runs at any input size the original model takes, but where a
        rewritten block branches on its input's shape (TinyViT): there only sizes taking the branches the example
        took run, and others raise `InputError` (`tokenprune.plan(model).describe()` lists such branches).

    Raises:
        ConfigError: for a bad ratio, locations or keep ratios.
        UnsupportedModelError: when the model can't be traced, has no chain, or can't be rewritten exactly, or is
            wrapped by torch.compile, DataParallel or DDP (pass the module inside), or is TorchScript.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"sparsify expects a torch.nn.Module, got {type(model).__name__}.")
    refuse_wrappers(model)
    # reason: the result's tensors are like the model's. Under a caller's `torch.inference_mode()` the copy and the
    # new predictors of an ordinary model would be inference tensors, which can never be trained; a model made under
    # inference mode has inference tensors, which the analysis (and the self-check's unit weights) may only touch
    # in that mode, and its result can only be evaluated, as the model itself.
    made_in_inference = any(t.is_inference() for t in itertools.chain(model.parameters(), model.buffers()))
    with released_fx_wraps() as result, torch.inference_mode(made_in_inference):
        result.append(
            _sparsify(model, ratio, locations, keep_ratios, example_inputs, inplace, scorer, decisions, fast_path)
        )
    return result[0]


def _sparsify(model, ratio, locations, keep_ratios, example_inputs, inplace, scorer, decisions, fast_path) -> nn.Module:
    name = model_name(model)
    target = model if inplace else copy_model(model)
    originals = {id(m) for m in target.modules()}
    held = contextlib.ExitStack()
    flags = held.enter_context(kept_training_flags(target))  # every submodule's flag, put back whatever happens
    applied = None
    try:
        the_plan, example, part = _analyse(
            target, ratio, locations, keep_ratios, example_inputs, name, scorer, decisions, fast_path
        )
        inner = target.get_submodule(part.path) if part.path else target
        applied = apply_plan(inner, the_plan)
        sparse = applied.model
        chain = the_plan.chain
        find_recorder(sparse).config = SparsifyConfig(
            ratio=ratio,
            locations=the_plan.locations,
            keep_ratios=the_plan.keep_ratios,
            kind=chain.kind,
            chain=chain.names,
            prefix_tokens=the_plan.prefix,
            model_name=name,
            input_size=tuple(example.shape[1:]),
            source=getattr(model, "tokenprune_source", None),
            scorer=scorer,
            decisions=the_plan.decisions,
            fast_path=the_plan.fast_path,
        )
        dense = None if inplace else (model.get_submodule(part.path) if part.path else model)
        self_check(sparse, chain, the_plan.locations, part.example, the_plan.name, dense=dense)
        compute = ComputeModel.calibrate(sparse, part.example)
        refuse_costlier(compute, the_plan.keep_ratios, chain.names, the_plan.name)
        find_recorder(sparse).compute = compute  # reason: `set_keep_ratios` checks new ratios against it
        # reason: the GraphModule drops timm's feature_info; `save` needs it to record features_only (io/source.py).
        find_recorder(sparse).dense_kwargs = timm_feature_kwargs(model)
        if part.path:
            sparse = _nest(target, part.path, sparse)
    except BaseException:
        # Any failure, not only a refusal (a KeyboardInterrupt in the self-check included), leaves an inplace model as
        # it was: its modules back in place; the flags follow on leaving `held`.
        if applied is not None:
            applied.rollback()
        raise
    finally:
        held.close()
    _inherit_flags(sparse, flags, originals)
    return sparse


def refuse_wrappers(model: object) -> None:
    """Refuse a torch.compile, DataParallel or DDP wrapper, at the top or inside the model, or a TorchScript model,
    before anything runs it.

    Tracing and the discovery forward need the modules themselves: run through dynamo, the discovery hooks are
    compiled on every call (memory grows without bound, #21), and the rewrite would be of the wrapper, not the model.

    Raises:
        UnsupportedModelError: naming the wrapper, where it sits, and what to pass instead.
    """
    if not isinstance(model, nn.Module):
        return
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            f"{model.original_name}: the model is a TorchScript module (torch.jit.script or trace); torch.fx cannot "
            "trace compiled TorchScript, and its Python code is gone. Sparsify the Python model it was made from "
            "(then export the sparsified one: tokenprune export)."
        )
    for where, module in model.named_modules():
        if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
            inner, attr, then = module._orig_mod, "_orig_mod", "torch.compile the sparsified model"
        elif isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner, attr, then = module.module, "module", f"wrap the sparsified model in {type(module).__name__}"
        else:
            continue
        what = f"model.{where}" if where else "model"
        raise UnsupportedModelError(
            f"{model_name(inner)}: {what} is wrapped in {type(module).__name__}; tokenprune rewrites the module "
            f"itself and refuses to run a wrapper to analyse it (dynamo would compile every hooked call; a parallel "
            f"wrapper scatters to devices). Pass {what}.{attr} in its place, then {then}."
        )


def _inherit_flags(sparse: nn.Module, flags: dict[str, bool], originals: set[int]) -> None:
    """Modules the pass created (stages, recorder, rewritten blocks, the GraphModule) take the training flag of the
    module they stand for or sit in, by qualified name; the user's own modules kept theirs (`kept_training_flags`)."""
    for qualified, module in sparse.named_modules():
        if id(module) in originals:
            continue
        owner = qualified
        while owner not in flags:
            owner = owner.rpartition(".")[0]
        module.training = flags[owner]


@dataclass
class _Part:
    """The module the pass rewrites: the model itself (``path == ""``) or, when the model's own forward cannot be
    traced, the submodule at `path` that holds the chain and is called on the image batch `example` (a detector's
    backbone)."""

    path: str
    example: torch.Tensor
    note: str = ""


def _analyse(
    model, ratio, locations, keep_ratios, example_inputs, name, scorer="predictor", decisions="auto", fast_path="block"
) -> tuple[Plan, torch.Tensor, _Part]:
    """Check the options and build the plan; `model` is left unchanged (every submodule's training flag restored).

    Returns the plan, the model's example input and the part of the model the plan is for."""
    ratio = check_ratio(ratio)
    if scorer not in SCORERS:
        raise ConfigError(f"{name}: scorer={scorer!r}; choose one of {', '.join(SCORERS)}.")
    check_fast_path(fast_path, name)
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"sparsify expects a torch.nn.Module, got {type(model).__name__}.")
    if any(True for _ in selectors(model)):
        raise UnsupportedModelError(f"{name} is already sparsified; sparsify the original model instead.")
    with kept_training_flags(model):
        model.eval()
        example = None
        try:
            example = example_input(model, example_inputs)
            chain = _chain(model, example, name)
            part = _Part("", example)
            try:
                the_plan = _plan_chain(
                    model, chain, example, ratio, locations, keep_ratios, name, scorer, decisions, fast_path
                )
            except UnsupportedModelError as refusal:
                part, chain = _traceable_part(model, chain, example, name, refusal)
                inner, where = model.get_submodule(part.path), f"{name}.{part.path}"
                the_plan = _plan_chain(
                    inner, chain, part.example, ratio, locations, keep_ratios, where, scorer, decisions, fast_path
                )
                the_plan.notes.insert(0, part.note)
            return the_plan, example, part
        except TokenPruneError:
            raise
        except Exception as e:  # noqa: BLE001 - a model tokenprune cannot analyse gets a reason, never a raw traceback
            if example is not None and not _runs_on(model, example):
                given = "the example input given" if example_inputs is not None else "an input tokenprune guessed"
                raise UnsupportedModelError(
                    f"{name}: the model itself fails on {given}, {list(example.shape)} ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}). Pass an input the model takes (example_inputs= "
                    "in Python, --input-size C,H,W on the command line)."
                ) from e
            guessed = ""
            # reason: a stem that is not the image's first convolution (space-to-depth) misleads the guess
            if example_inputs is None and example is not None:
                guessed = (
                    f" It ran the model on an input it guessed, {list(example.shape)} (`inputs.input_size`): if the "
                    "model takes another, pass one (example_inputs= in Python, --input-size C,H,W on the command "
                    "line)."
                )
            raise UnsupportedModelError(
                f"{name}: tokenprune could not analyse this model ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); it refuses it rather than guess.{guessed} The cause is "
                "chained to this error; please report it with the model's name."
            ) from e


def _runs_on(model: nn.Module, example: torch.Tensor) -> bool:
    """Whether the unmodified model's forward runs on `example` (asked after the analysis failed: was it the input?)."""
    try:
        with torch.no_grad():
            model(example)
    except Exception:  # noqa: BLE001 - any failure of the user's own model on this input answers the question
        return False
    return True


def _chain(model: nn.Module, example: torch.Tensor, name: str) -> Chain:
    chain = find_chain(model, example, name)
    if chain is None:
        raise UnsupportedModelError(
            f"{name}: no chain of blocks mapping tokens [B, N, C] (or feature maps) to the same shape was "
            "found, so there is nothing to sparsify. Supported: ViT-style models and hierarchical models "
            "whose blocks end in a per-location MLP (timm, torchvision)."
        )
    return chain


def _plan_chain(model, chain, example, ratio, locations, keep_ratios, name, scorer, decisions, fast_path) -> Plan:
    """The plan for `chain`; a token chain that the token rules (or the options) refuse is sparsified spatially when
    its tokens are exactly the locations of the image's grid (no class token: Twins, XCiT; docs/design.md §2.1)."""
    try:
        return _plan_kind(model, chain, example, ratio, locations, keep_ratios, name, scorer, decisions, fast_path)
    except (UnsupportedModelError, ConfigError) as refusal:
        grid = chain.as_locations(tuple(example.shape[-2:]))
        if grid is None:
            raise
        try:
            the_plan = _plan_kind(
                model, grid, example, ratio, locations, keep_ratios, name, scorer, decisions, fast_path
            )
        except TokenPruneError as spatial:
            if isinstance(refusal, ConfigError):
                raise refusal from None
            raise UnsupportedModelError(f"{refusal} Sparsified spatially, it is refused too: {spatial}") from None
        why = str(refusal).removeprefix(f"{name} ").split(". ")[0]
        the_plan.notes.insert(
            0, f"sparsified spatially over the {grid.grid[0]}x{grid.grid[1]} grid of its tokens: {why}"
        )
        return the_plan


def _plan_kind(model, chain, example, ratio, locations, keep_ratios, name, scorer, decisions, fast_path) -> Plan:
    locs = _check_locations(locations, len(chain.calls), chain.kind, name)
    ratios = _check_keep_ratios(keep_ratios, ratio, len(locs), chain.kind, name)
    the_plan = build_plan(model, chain, example, locs, ratios, name, scorer, decisions, fast_path)
    if chain.kind == "token":
        _warn_tiny_keep(chain.shape[1] - the_plan.prefix, ratios, name)
    return the_plan


def _traceable_part(
    model: nn.Module, chain: Chain, example: torch.Tensor, name: str, refusal: UnsupportedModelError
) -> tuple[_Part, Chain]:
    """Where to sparsify a model whose own forward cannot be traced (a detector: a list of images in, data-dependent
    post-processing out), and the chain found there.

    The rule is structural: the outermost proper submodule that is called on the image batch (its first argument a
    4-D floating tensor with the example's batch size and channels: a detector's transform resizes and normalises the
    images on the way), holds a chain of its own, and traces with that chain's blocks as leaves (as in the analysis
    itself). The chain is found in the submodule, not in the whole model: a detector's head may hold a longer run
    of same-type layers than its backbone.

    Raises:
        UnsupportedModelError: `refusal` itself when the model traces (its refusal stands); else `refusal` (why
            the model does not trace) with the news that no such submodule exists either.
    """
    try:
        trace(model, leaves=[c.module for c in chain.calls], name=name)
    except UnsupportedModelError as untraceable:
        why = str(untraceable).split(". ")[0].removeprefix(f"{name}: ")
    else:
        raise refusal
    for path, x in image_batch_inputs(model, example).items():
        inner, where = model.get_submodule(path), f"{name}.{path}"
        found = find_chain(inner, x, where)
        if found is None:
            continue
        try:
            trace(inner, leaves=[c.module for c in found.calls], name=where)
        except UnsupportedModelError:
            continue
        note = (
            f"{name}'s own forward is not traceable ({why}); tokenprune sparsifies its submodule {path} "
            f"({type(inner).__name__}), which holds the chain and is called on the image batch {list(x.shape)}; "
            f"the rest of {name} runs unchanged around it"
        )
        return _Part(path, x, note), found
    raise UnsupportedModelError(
        f"{refusal} Nor does any submodule that is called on the image batch [B, C, H, W] and holds a chain "
        "(tokenprune sparsifies such a submodule, e.g. a detector's backbone)."
    ) from None


def _nest(model: nn.Module, path: str, sparse: nn.Module) -> nn.Module:
    """Install the sparsified submodule `sparse` at `path` in `model`; the recorded block names become qualified
    names in `model` (the chain's blocks keep their names inside `sparse`, so they name the same modules in the dense
    model and in the result: a teacher's block is hooked by the same name)."""
    recorder = find_recorder(sparse)
    recorder.config.chain = [f"{path}.{block}" for block in recorder.config.chain]
    recorder.chain_output = f"{path}.{recorder.chain_output}"
    if recorder.final_norm:  # the module token distillation reads after, hooked on the teacher by this name
        recorder.final_norm = f"{path}.{recorder.final_norm}"
    set_submodule(model, path, sparse)
    return model


def plan(
    model: nn.Module,
    ratio: float = DEFAULT_RATIO,
    *,
    locations: Sequence[int] | None = None,
    keep_ratios: Sequence[float] | None = None,
    example_inputs: torch.Tensor | None = None,
    scorer: str = "predictor",
    decisions: str = "auto",
    fast_path: str = "block",
) -> Plan:
    """What `sparsify` would do to `model`, without changing it: `print(tokenprune.plan(model).describe())`.

    Raises:
        ConfigError, UnsupportedModelError: as `sparsify` (the self-check, which needs the applied model, aside).
    """
    refuse_wrappers(model)
    name = model_name(model)
    with released_fx_wraps():  # the graphs analysed here are thrown away: leave torch.fx's table as it was
        return _analyse(model, ratio, locations, keep_ratios, example_inputs, name, scorer, decisions, fast_path)[0]


def set_keep_ratios(
    model: nn.Module,
    keep_ratios: Sequence[float] | None = None,
    *,
    ratio: float | None = None,
    flops: float | None = None,
) -> nn.Module:
    """Change how many tokens (or locations) each stage of a sparsified model keeps, in place; returns `model`.

    The predictors score tokens whatever is kept, so a model fine-tuned at one keep ratio can be evaluated, measured
    or exported at another without retraining: a trade-off curve from one trained model. The new ratios are checked
    as `sparsify` checks them (one per stage, in (0, 1], non-increasing) and refused, leaving the model as it was,
    where the sparse chain would cost at least the dense one by the model's calibrated cost model (§2.5). Accuracy
    away from the trained ratio is whatever the model gives: measure it (docs/results.md, "keep ratios changed after
    training"). `config_of`, `save` and `export` see the new ratios.

    Args:
        model: a `tokenprune.sparsify` result (or a model `tokenprune.load` returned).
        keep_ratios: per-stage fractions of the initial patch tokens (spatial models: of all locations).
        ratio: base keep ratio rho instead, expanded with the model kind's default schedule (token models rho^s,
            spatial models rho, rho - 0.2, rho - 0.4).
        flops: a compute budget instead, in (0, 1): the chain's multiply-adds (its blocks and the predictors) as a
            fraction of the dense chain's, by the calibrated cost model, as `learned_ratios.target_flops` in a
            recipe. The model's current keep ratios move, all stages together (one shift of their logits,
            docs/design.md §1.1), until the estimate meets it: a learned allocation keeps its shape, a rho^s
            schedule stays geometric but for the one-token floor. The whole model's measured fraction differs: the
            patch embedding and head, outside the chain, raise it by their share, and top-k's floor(rho * N) lowers
            it a little (`tokenprune report` measures it).

    Raises:
        ConfigError: not exactly one of the three given, a bad value, a budget out of the chain's reach, or a model
            that is not sparsified.
        UnsupportedModelError: the chain would not be cheaper than the dense one at these ratios.
    """
    sels = selectors(model)
    config = find_config(model)
    if not sels or config is None:
        raise ConfigError(f"{type(model).__name__} is not a sparsified model; pass the result of tokenprune.sparsify.")
    if sum(value is not None for value in (keep_ratios, ratio, flops)) != 1:
        raise ConfigError("set_keep_ratios takes keep_ratios, ratio or flops, one of them.")
    name = config.model_name or type(model).__name__
    if ratio is not None:
        ratio = check_ratio(ratio)
    budget = None if flops is None else _check_budget(flops, name)
    compute = _cost_model(model, config)
    if budget is not None:
        keep_ratios = at_budget(compute, [sel.keep_ratio for sel in sels], budget, what=f"{name}: flops")
    values = _check_keep_ratios(keep_ratios, ratio, len(sels), config.kind, name)
    refuse_costlier(compute, values, config.chain, name)
    if config.kind == "token":
        _warn_tiny_keep(compute.patches, values, name, stacklevel=3)
    for sel, value in zip(sels, values, strict=True):
        sel.keep_ratio = value
    recorder = find_recorder(model)  # reason: its config's keep ratios are read from the stages (`config_of`)
    recorder.config.learned = False  # reason: set by hand now, whatever learned them before (`save` records it)
    if ratio is not None:
        recorder.config.ratio = ratio
    return model


def _check_budget(flops: float, name: str) -> float:
    """`flops` as a float, or a `ConfigError` unless 0 < flops < 1 (a budget of 1 or more saves nothing)."""
    try:
        value = float(flops)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: flops={flops!r} is not a number; pass a fraction, e.g. 0.6.") from None
    if math.isnan(value) or not 0.0 < value < 1.0:
        raise ConfigError(
            f"{name}: flops={flops!r} is out of range; the chain's compute budget is a fraction of the dense "
            "chain's in (0, 1), e.g. 0.6."
        )
    return value


def _cost_model(model: nn.Module, config: SparsifyConfig) -> ComputeModel:
    """The cost model `sparsify` calibrated (kept on the recorder), or one calibrated now at the configured input
    size for a model that does not hold one (a model pickled by an older tokenprune)."""
    compute = getattr(find_recorder(model), "compute", None)
    if compute is None:
        param = next(model.parameters())
        example = torch.zeros(1, *config.input_size, device=param.device, dtype=param.dtype)
        compute = find_recorder(model).compute = ComputeModel.calibrate(model, example)
    return compute


def set_execution(model: nn.Module, execution: str) -> nn.Module:
    """Choose how stages run: "auto" (masked in train mode, pruned in eval), "masked" or "pruned".

    Masked execution in eval mode uses the same top-k decisions as pruned execution, so the two give the same
    outputs: useful to debug, and the property the tests check.
    """
    if execution not in EXECUTIONS:
        raise ConfigError(f"execution={execution!r}; choose one of {', '.join(EXECUTIONS)}.")
    found = selectors(model)
    if not found:
        raise UnsupportedModelError(f"{type(model).__name__} is not a sparsified model; use tokenprune.sparsify.")
    for sel in found:
        sel.execution = execution
    return model
