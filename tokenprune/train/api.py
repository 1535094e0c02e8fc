"""`finetune(...)`: from a recipe (or your own models) to a fine-tuned sparse model, its metrics and its files.

Outputs in ``run.output_dir``: ``recipe.yaml`` (the resolved recipe), ``metrics.jsonl``, ``last.pt`` (resumable
checkpoint) and ``final.pt`` (the weights, the sparsify configuration with any learned keep ratios, the metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, TokenPruneError
from ..io import load_weights  # one reader of weight files: weights only, checked fit
from ..models import copy_model
from .data import DataBundle, build_datasets
from .distributed import barrier, cleanup_distributed, init_distributed
from .recipe import Recipe, load_recipe, save_recipe
from .trainer import Trainer, config_of

__all__ = [
    "FinetuneResult",
    "finetune",
    "run_recipe",
    "cli_main",
    "build_teacher",
    "load_trained",
    "load_trained_pair",
    "load_trained_original",
    "load_weights",
]


@dataclass
class FinetuneResult:
    """What `finetune` returns.

    Attributes:
        model: the fine-tuned model (unwrapped from DDP; learned keep ratios written into it and its config).
        teacher: the frozen teacher, or ``None`` for dense training.
        metrics: final top-1, teacher top-1, steps, keep ratios, whether they were learned.
        output_dir: where recipe.yaml, metrics.jsonl, last.pt and final.pt are.
        recipe: the resolved recipe.
    """

    model: nn.Module
    teacher: nn.Module | None
    metrics: dict[str, Any]
    output_dir: Path
    recipe: Recipe


def build_teacher(recipe: Recipe) -> nn.Module:
    """Create the original model a recipe names (timm or torchvision), with its pretrained weights or checkpoint.

    Built by `tokenprune.create_model`, the project's one model builder, so the model records how to rebuild it
    (``tokenprune_source``) and the sparsified student's config and saved files carry that record.

    With ``model.task_head: fpn`` the model is a `tokenprune.models.Segmenter` on the timm backbone ``model.name``.

    Raises:
        ConfigError: unknown name or keywords the constructor rejects; ``task: segmentation`` without a task head.
        CheckpointError: weights that cannot be read or do not fit.
    """
    from ..models import create_model

    spec = recipe.model
    kwargs = dict(spec.kwargs)
    if spec.task_head is not None:
        kwargs["task_head"] = spec.task_head
    elif recipe.task == "segmentation":
        raise ConfigError(
            f"task: segmentation needs a model that outputs per-pixel logits; set model.task_head: fpn to build one "
            f"on the backbone {spec.name!r}, or pass your own model to finetune(model=...)."
        )
    return create_model(
        spec.name, pretrained=spec.pretrained, checkpoint=spec.checkpoint, library=spec.library, **kwargs
    )


def _read_run(path: Path, model: nn.Module | None) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, nn.Module]:
    """A run checkpoint's weights, its sparsify configuration (None for a dense run) and a fresh dense architecture
    (the recipe's, or a copy of `model`), after the checks both loaders share."""
    import dataclasses

    from ..errors import CheckpointError
    from .checkpoint import load_checkpoint

    data = load_checkpoint(path)
    config = data.get("sparsify_config")
    if not isinstance(data.get("model"), dict) or not isinstance(data.get("recipe"), dict):
        raise CheckpointError(f"{path} holds no model weights or no recipe; pass the final.pt of a finetune run.")
    if config is not None and not isinstance(config, dict):
        raise CheckpointError(f"{path}: its sparsify_config is a {type(config).__name__}, not a mapping (damaged?).")
    recipe = Recipe.from_dict(data["recipe"], source=f"the recipe stored in {path}")
    if recipe.learned_ratios.enabled and "optimizer" in data:
        raise CheckpointError(
            f"{path} is a checkpoint taken while the keep ratios were being learned; they are fixed only when the run "
            "finishes. Load its final.pt, or resume the run to finish it (run.resume=<this file>)."
        )
    if model is not None:
        dense = copy_model(model)
    else:  # the architecture only: the trained weights replace any the recipe names
        spec = dataclasses.replace(recipe.model, pretrained=False, checkpoint=None)
        dense = build_teacher(dataclasses.replace(recipe, model=spec))
    return data["model"], config, dense


def load_trained(path: str | os.PathLike[str], *, model: nn.Module | None = None) -> nn.Module:
    """The model a training run wrote to ``final.pt`` (or ``last.pt``), ready to evaluate, measure or save.

    The architecture is rebuilt from the recipe stored in the checkpoint (no pretrained weights or teacher checkpoint
    are read), or is a copy of `model`; a sparse run's is sparsified again with its recorded configuration, every
    field of it (keep ratios, learned ones included, scorer, decisions, fast path, input size); then the trained
    weights are loaded strictly. Nothing in the file is executed.

    Args:
        path: a checkpoint written by `finetune` (``<run.output_dir>/final.pt``).
        model: the dense architecture to use instead of the recipe's (e.g. your own module); not changed.

    Returns:
        The model in eval mode, on CPU: sparsified for a sparse run, dense for a dense one.

    Raises:
        CheckpointError: a missing, damaged or foreign file, a ``last.pt`` of a run whose keep ratios are still
            being learned (they are fixed in ``final.pt``), or weights that do not fit the architecture.
        ConfigError: a stored recipe this tokenprune cannot build.
    """
    path = Path(path)
    return _trained(path, *_read_run(path, model))


def _trained(path: Path, state: dict, config: dict | None, dense: nn.Module) -> nn.Module:
    """The run's model: `dense` sparsified again with `config` (in place), the trained weights `state` loaded."""
    from ..config import SparsifyConfig
    from ..io.model_file import resparsify
    from ..io.weights import check_fit

    recorded = ("kind", "chain", "prefix_tokens")  # a model= of another architecture is refused, not mis-loaded
    trained = (
        dense if config is None else resparsify(dense, SparsifyConfig.from_dict(config), str(path), recorded=recorded)
    )
    check_fit(trained.state_dict(), state, path, f"the model of the run in {path.parent}")
    trained.load_state_dict(state, strict=True)
    return trained.eval()


def load_trained_original(path: str | os.PathLike[str], *, model: nn.Module | None = None) -> nn.Module:
    """The dense model inside a run's checkpoint: its architecture with the trained backbone weights, no stages.

    What `tokenprune.load_original` is to a model file: the dense side of a dense-vs-sparse report. For a dense run
    it is the run's model (as `load_trained`).

    Raises:
        CheckpointError, ConfigError: as `load_trained`.
    """
    path = Path(path)
    state, _, dense = _read_run(path, model)
    return _original(path, state, dense)


def load_trained_pair(path: str | os.PathLike[str], *, model: nn.Module | None = None) -> tuple[nn.Module, nn.Module]:
    """(`load_trained_original`, `load_trained`) of one run, the checkpoint read and the architecture built once.

    Raises:
        CheckpointError, ConfigError: as `load_trained`.
    """
    path = Path(path)
    state, config, dense = _read_run(path, model)
    return _original(path, state, copy_model(dense)), _trained(path, state, config, dense)


def _original(path: Path, state: dict, dense: nn.Module) -> nn.Module:
    """`dense` with the backbone weights of the run's `state` (its stages' weights left out)."""
    from ..io.weights import check_fit

    expected = dense.state_dict()
    state = {k: v for k, v in state.items() if k in expected}
    check_fit(expected, state, path, f"the dense model of the run in {path.parent}")
    dense.load_state_dict(state, strict=True)
    return dense.eval()


def _input_geometry(recipe: Recipe, model: nn.Module) -> tuple[int, int]:
    """(image size, channels) of the model's input: its sparsify config, the recipe, or the model itself."""
    from ..inputs import input_size

    config = config_of(model)
    if config is not None and config.input_size:
        return int(config.input_size[-1]), int(config.input_size[0])
    built = input_size(model)
    size = recipe.model.kwargs.get("img_size") or recipe.data.img_size or (built[-1] if built else None)
    if size is None:
        raise ConfigError("cannot tell the model's input size; set data.img_size in the recipe.")
    size = size[0] if isinstance(size, (tuple, list)) else size
    chans = recipe.model.kwargs.get("in_chans") or (built[0] if built else 3)
    return int(size), int(chans)


def run_summary(recipe: Recipe, trainer: Trainer, given: bool = False) -> str:
    """One line saying what a run trains, on what and how long: printed when it starts.

    The input is the shape of the first training image as the data makes it. When the recipe sets no size, that is
    the model's default size, which may differ from the images' own (a 112 px canvas upsampled for a 224 px model):
    the line says so. `given`: the datasets were passed to `finetune`, not made from ``recipe.data``."""
    from ..fx.tracing import model_name

    config = trainer.config
    name = (config.model_name if config else None) or model_name(trainer.student)
    if config is None:
        what = "dense"
    else:
        kept = "/".join(f"{r:g}" for r in config.keep_ratios)
        what = f"{len(config.keep_ratios)} {config.kind} stages keeping {kept} ({config.scorer})"
    train, val = trainer.train_loader.dataset, trainer.val_loader.dataset
    item = train[0]
    image = item[0] if isinstance(item, (tuple, list)) else None
    shape = "x".join(str(n) for n in image.shape) if isinstance(image, torch.Tensor) else "?"
    sized = recipe.data.img_size or recipe.model.kwargs.get("img_size")
    note = " (the model's default size; data.img_size sets it)" if not (given or sized) else ""
    source = "datasets passed to finetune" if given else recipe.data.source
    o = recipe.optim
    batch = o.batch_size * trainer.info.world * trainer.accum
    epochs = f"{o.epochs:g} epoch{'' if o.epochs == 1 else 's'}"
    return (
        f"{trainer.out}: {name}, {what}; {len(train):,} training and {len(val):,} evaluation images ({source}), "
        f"input {shape}{note}; {trainer.total_steps:,} steps of {batch} images ({epochs}) on {trainer.device}"
    )


def _coerce_recipe(recipe: Recipe | str | os.PathLike[str] | dict | None, overrides: Sequence[str]) -> Recipe:
    if isinstance(recipe, Recipe):
        from .recipe import apply_overrides

        return apply_overrides(recipe, list(overrides))
    if isinstance(recipe, dict):
        from .recipe import apply_overrides

        return apply_overrides(Recipe.from_dict(recipe), list(overrides))
    return load_recipe(recipe, list(overrides))


def finetune(
    recipe: Recipe | str | os.PathLike[str] | dict | None = None,
    *,
    model: nn.Module | None = None,
    teacher: nn.Module | None = None,
    overrides: Sequence[str] = (),
    data: DataBundle | None = None,
) -> FinetuneResult:
    """Fine-tune a sparsified model with the DynamicViT objective (or train a dense one), per a recipe.

    Under torchrun each process calls this; the process group is set up from the environment.

    Args:
        recipe: a `Recipe`, a YAML path, a dict, or ``None`` for the defaults.
        model: the student to train, e.g. ``tokenprune.sparsify(teacher)``; built from ``recipe.model`` and
            ``recipe.sparsify`` when ``None``.
        teacher: the frozen original model (the one given to sparsify). Required with a sparsified `model` unless
            the KL and distillation weights are zero.
        overrides: ``key=value`` strings applied on top of the recipe (dotted keys).
        data: datasets to use instead of ``recipe.data``.

    Returns:
        The fine-tuned model and its metrics.

    Raises:
        ConfigError: bad recipe values or unknown keys. DataError: a missing or malformed dataset (raised before
        training). TrainingError: a non-finite loss (the last checkpoint stays intact). CheckpointError: bad weights.
    """
    recipe = _coerce_recipe(recipe, overrides)
    run = recipe.run
    if run.threads:
        torch.set_num_threads(int(run.threads))
    info = init_distributed(run.device)
    try:
        # The same seed on every rank, so predictors start equal (DDP also broadcasts rank 0's weights).
        torch.manual_seed(run.seed)
        built = model is None
        if built:
            teacher = build_teacher(recipe)
            size, chans = _input_geometry(recipe, teacher)
            if recipe.sparsify.enabled:
                from ..sparsify import sparsify

                sp = recipe.sparsify
                example = torch.randn(1, chans, size, size)
                model = sparsify(
                    teacher.eval(),
                    sp.ratio,
                    locations=sp.locations,
                    keep_ratios=sp.keep_ratios,
                    example_inputs=example,
                    scorer=sp.scorer,
                    decisions=sp.decisions,
                    fast_path=sp.fast_path,
                )
            else:
                model, teacher = teacher, None
        else:
            size, chans = _input_geometry(recipe, model)
        if teacher is not None and {id(p) for p in teacher.parameters()} & {id(p) for p in model.parameters()}:
            raise ConfigError("the student shares parameters with the teacher; sparsify without inplace=True.")
        if config_of(model) is not None and teacher is None and (recipe.loss.kl > 0 or recipe.loss.distill > 0):
            raise ConfigError("pass teacher=<the model given to sparsify>, or set loss.kl=0 and loss.distill=0.")
        given = data is not None
        if not given:
            data = build_datasets(recipe.data, img_size=size, in_chans=chans, seed=run.seed, model=teacher or model)
        classes = getattr(teacher if teacher is not None else model, "num_classes", None)
        if isinstance(classes, int) and classes != data.num_classes:
            fix = (
                f"set model.kwargs.num_classes={data.num_classes} (and a matching checkpoint)"
                if built
                else f"build it with num_classes={data.num_classes} (timm, torchvision) before sparsifying"
            )
            raise ConfigError(f"the model predicts {classes} classes but the dataset has {data.num_classes}; {fix}.")
        out = Path(run.output_dir)
        trainer = Trainer(recipe, model, teacher, data, info)  # refuses a foreign or finished run in `out` first
        if info.main:
            save_recipe(recipe, out / "recipe.yaml")
            print(run_summary(recipe, trainer, given), flush=True)
        barrier(info)
        metrics = trainer.fit()  # ends with the final phase: evaluation and final.pt
        return FinetuneResult(model.eval(), teacher, metrics, out, recipe)
    finally:
        cleanup_distributed(info)


def run_recipe(recipe: str | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Typer-friendly entry: ``tokenprune finetune --recipe FILE key=value ...``; returns the final metrics."""
    return finetune(recipe, overrides=overrides).metrics


def cli_main(argv: Sequence[str] | None = None) -> int:
    """``python -m tokenprune.train --recipe FILE [key=value ...]`` (also under torchrun). Returns an exit code."""
    parser = argparse.ArgumentParser(prog="tokenprune finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", "-r", default=None, help="YAML recipe (defaults when omitted)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=5e-4")
    args = parser.parse_args(argv)
    try:
        metrics = run_recipe(args.recipe, args.overrides)
    except TokenPruneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics))
    return 0
