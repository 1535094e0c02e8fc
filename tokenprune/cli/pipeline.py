"""The convert/report pipeline, shared by the CLI and the examples: build a dense model, sparsify it (or load both
from a file), measure the pair, apply the gates."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..inputs import geometry_kwargs
from ..loaders import MODEL_FILE, load_model, load_pair, model_file  # the file side of the pipeline
from .gates import Gates, accuracy_entry, check_gates

__all__ = [
    "MODEL_FILE",
    "create_dense",
    "build",
    "model_file",
    "load_model",
    "load_pair",
    "measure",
    "gate",
    "markdown",
]


def create_dense(
    name: str,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    pretrained: bool = False,
    input_size: tuple[int, int, int] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """A timm/torchvision model by name, built for `input_size` where its constructor takes a size.

    Raises:
        ConfigError: unknown name or keywords. CheckpointError: unreadable or unfitting checkpoint.
    """
    from ..models import create_model, resolve_library

    kwargs = dict(kwargs or {})
    library = resolve_library(name)
    geometry = {k: v for k, v in geometry_kwargs(library, name, input_size).items() if k not in kwargs}
    try:
        return create_model(name, pretrained=pretrained, checkpoint=checkpoint, library=library, **geometry, **kwargs)
    except ConfigError as e:
        # reason: CNNs and hierarchical models take no img_size; their input size only shapes the example input.
        if not geometry or "unexpected keyword argument" not in str(e):
            raise
    return create_model(name, pretrained=pretrained, checkpoint=checkpoint, library=library, **kwargs)


def build(
    name: str,
    *,
    ratio: float | None = None,
    locations: list[int] | None = None,
    keep_ratios: list[float] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    pretrained: bool = False,
    input_size: tuple[int, int, int] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    scorer: str = "predictor",
    features_only: bool = False,
    task_head: str | None = None,
    decisions: str = "auto",
) -> tuple[nn.Module, nn.Module]:
    """The dense model `name` and its sparsified copy, both in eval mode.

    Args:
        name: a timm or torchvision model name.
        ratio: base keep ratio (default 0.7).
        locations: block indices of the stages (default D/4, D/2, 3D/4).
        keep_ratios: per-stage keep ratios (override `ratio`'s schedule).
        checkpoint: dense weights to load.
        pretrained: download the library's weights.
        input_size: (C, H, W) to build and trace at (default the model's own).
        model_kwargs: constructor keywords.
        seed: seed of random weights and predictors.
        scorer: "predictor" (learned) or "attention" (training-free).
        features_only: build the timm model with ``features_only=True`` (it returns its feature maps, a list); the
            keyword is recorded in the saved file's source like any other.
        task_head: a head on the timm backbone `name` (`tokenprune.create_model`'s ``task_head``): "fpn" or a
            detector, "fcos", "retinanet" or "fasterrcnn" (sparsified at its backbone, docs/design.md §3.7). A
            detector's transform is fixed to `input_size` (``min_size``/``max_size``) unless `model_kwargs` set them,
            so the sizes reported are the sizes its backbone runs at.
        decisions: "auto", "nested" or "independent" (`tokenprune.sparsify`'s ``decisions``).

    Raises:
        ConfigError: `features_only` for a torchvision name (torchvision builds feature extractors with
            ``create_feature_extractor`` in Python; there is no name for them); `task_head` with `features_only` or
            without ``num_classes``.
    """
    from ..models import resolve_library
    from ..sparsify import sparsify

    if features_only:
        if resolve_library(name) != "timm":
            raise ConfigError(
                f"--features-only builds timm feature extractors; {name} is a torchvision model. Build it with "
                "torchvision.models.feature_extraction.create_feature_extractor in Python and call "
                "tokenprune.sparsify on it."
            )
        model_kwargs = {**(model_kwargs or {}), "features_only": True}
    if task_head is not None:
        model_kwargs = _with_head(task_head, input_size, dict(model_kwargs or {}), features_only)
    torch.manual_seed(seed)
    dense = create_dense(
        name, checkpoint=checkpoint, pretrained=pretrained, input_size=input_size, kwargs=model_kwargs
    ).eval()
    example = torch.randn(1, *input_size) if input_size else None
    sparse = sparsify(
        dense,
        0.7 if ratio is None else ratio,
        locations=locations,
        keep_ratios=keep_ratios,
        example_inputs=example,
        scorer=scorer,
        decisions=decisions,
    )
    return dense, sparse.eval()


def _with_head(
    head: str, input_size: tuple[int, int, int] | None, kwargs: dict[str, Any], features_only: bool
) -> dict[str, Any]:
    """The constructor keywords of a model with a task head (checked by `tokenprune.models`)."""
    from ..detect.models import HEADS

    if features_only:
        raise ConfigError(f"--task-head {head} builds its own feature extractor on the backbone; drop --features-only.")
    if "num_classes" not in kwargs:
        count = "K + 1 for K object classes (label 0 is the background)" if head in HEADS else "K classes"
        raise ConfigError(f"--task-head {head} needs the number of classes: -k num_classes=N, N = {count}.")
    if head in HEADS and input_size is not None:
        # reason: the transform resizes every image to min_size/max_size; fixed to the input, the backbone runs
        # (and is measured) at the size asked for.
        height, width = input_size[1:]
        kwargs = {"min_size": min(height, width), "max_size": max(height, width), **kwargs}
    return {**kwargs, "task_head": head}


def measure(
    name: str,
    dense: nn.Module,
    sparse: nn.Module,
    *,
    gates: Gates | None = None,
    flops_only: bool = False,
    batch_size: int = 32,
    warmup: int = 3,
    repeats: int = 10,
    device: str = "cpu",
    threads: int | None = None,
    eval_data: str | None = None,
    eval_limit: int | None = None,
    eval_batch_size: int = 64,
    dense_weights: str | os.PathLike[str] | None = None,
    saved_keep_ratios: list[float] | None = None,
) -> dict[str, Any]:
    """The dense-vs-sparse report: FLOPs, parameters, timings unless `flops_only` (with `threads` CPU threads, when
    given), top-1 with `eval_data`; `dense_weights` names the file the dense model's weights came from when they are
    not the sparse model's own; `saved_keep_ratios` the keep ratios a file was saved with when the report's differ.

    Raises:
        ConfigError: gates that need what was not asked for (timings, evaluation data); `threads` below 1.
    """
    from ..measure import build_report
    from ..nn.recorder import config_of

    gates = gates or Gates(None, None, None)
    config = config_of(sparse)
    if gates.needs_timing and flops_only:
        raise ConfigError("--min-speedup needs timings; drop --flops-only.")
    if gates.needs_accuracy and eval_data is None:
        raise ConfigError("--max-accuracy-drop needs --eval-data (an ImageFolder root or 'fashion-mnist').")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads}: give 1 or more CPU threads.")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        report = build_report(
            name, dense, sparse, config.input_size, batch_size=batch_size, flops_only=flops_only, ratio=config.ratio,
            warmup=warmup, repeats=repeats, device=device,
        )  # fmt: skip
    finally:
        torch.set_num_threads(previous)
    report["dense_weights"] = None if dense_weights is None else str(dense_weights)
    report["saved_keep_ratios"] = None if saved_keep_ratios is None else [float(r) for r in saved_keep_ratios]
    if eval_data is not None:
        report["accuracy"] = accuracy_entry(
            dense, sparse, eval_data, config.input_size, batch_size=eval_batch_size, limit=eval_limit, device=device
        )
    return report


def gate(report: dict[str, Any], gates: Gates) -> list[str]:
    """One line per failed gate (empty when all pass)."""
    return check_gates(report, gates)


def rekept_note(report: dict[str, Any]) -> str | None:
    """The sentence saying the report's keep ratios are not the ones the file was saved with, or None."""
    saved = report.get("saved_keep_ratios")
    if saved is None:
        return None
    now = "/".join(f"{s['keep_ratio']:g}" for s in report["stages"])
    return f"Keep ratios set to {now} for this report; the model was saved with {'/'.join(f'{r:g}' for r in saved)}."


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown, with the top-1 line when measured."""
    from ..measure import to_markdown

    text = to_markdown(report)
    note = rekept_note(report)
    if note:
        text += f"\n{note}\n"
    acc = report.get("accuracy")
    if acc:
        text += (
            f"\nTop-1 on `{acc['data']}` ({acc['images']} images): dense {acc['dense_top1']:.2f}%, sparse "
            f"{acc['sparse_top1']:.2f}% (drop {acc['drop']:.2f} points).\n"
        )
    return text
