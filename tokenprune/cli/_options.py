"""The command line's shared options, each declared once, and the parsing of their values.

`convert` and `report` take the same model and measurement options, `sweep` the model and evaluation ones:
`with_options` adds a group to a command's signature (typer reads the signature) and hands the values to the command
as one namespace.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import typer

from ..errors import ConfigError

# ---- option types -----------------------------------------------------------------------------------------------

Ratio = Annotated[
    float | None, typer.Option("--ratio", "-r", help="Base keep ratio rho in (0, 1] (default 0.7; a file: as saved).")
]
Locations = Annotated[
    str | None,
    typer.Option(help="Comma-separated block indices the stages precede, e.g. 3,6,9 (default D/4, D/2, 3D/4)."),
]
KeepRatios = Annotated[
    str | None,
    typer.Option(help="Comma-separated per-stage keep ratios, e.g. 0.7,0.49,0.343 (overrides --ratio's schedule)."),
]
Flops = Annotated[
    float | None,
    typer.Option(
        help="A compute budget instead of --ratio: the chain's multiply-adds as a fraction of the dense chain's, in "
        "(0, 1); the keep ratios move, all stages together, until the cost model meets it (tokenprune.set_keep_ratios)."
    ),
]
InputSize = Annotated[
    str | None,
    typer.Option(help="H, H,W or C,H,W; the model is built for it (timm img_size, in_chans; default: its own)."),
]
Checkpoint = Annotated[
    Path | None, typer.Option(help="Dense weights (.safetensors, .pth/.pt/.bin; pickles read weights-only).")
]
Pretrained = Annotated[bool, typer.Option(help="Download the library's pretrained weights (needs internet).")]
ModelKwargs = Annotated[
    list[str] | None,
    typer.Option("--model-kwarg", "-k", help="Constructor keyword KEY=VALUE (repeatable), e.g. -k num_classes=10."),
]
Scorer = Annotated[
    str,
    typer.Option(
        help="How stages rank tokens: 'predictor' (learned; needs fine-tuning) or 'attention' (from the model's own "
        "attention, no training; token models)."
    ),
]
Decisions = Annotated[
    str,
    typer.Option(
        help="How a spatial model's stages decide (docs/design.md §1.2): 'auto' (token chains nest, spatial stages "
        "decide independently, as the official code), 'nested' or 'independent'."
    ),
]
FeaturesOnly = Annotated[
    bool,
    typer.Option(
        "--features-only",
        help="Build the timm model with features_only=True: it returns its feature maps (dense prediction "
        "backbones); every map is kept whole and the file records the keyword.",
    ),
]
TaskHead = Annotated[
    str | None,
    typer.Option(
        help="Put a head on the timm backbone MODEL: fcos, retinanet or fasterrcnn (a torchvision detector; -k "
        "num_classes=K+1 counts the background) or fpn (a segmenter; -k num_classes=K). The backbone is "
        "sparsified and measured; a detector's transform keeps --input-size unless -k min_size/max_size say "
        "otherwise.",
    ),
]
BatchSize = Annotated[int, typer.Option(help="Batch of the throughput measurement.")]
FlopsOnly = Annotated[bool, typer.Option(help="Count FLOPs and parameters only; skip timing.")]
Repeats = Annotated[int, typer.Option(help="Timed passes per model (medians are reported).")]
Warmup = Annotated[int, typer.Option(help="Untimed passes per model before timing.")]
Device = Annotated[str, typer.Option(help="Where timings and evaluation run, e.g. cpu or cuda.")]
Threads = Annotated[
    int | None,
    typer.Option(
        help="CPU threads while timing (default: torch's, one per core); on a machine other jobs share, at most "
        "the free cores (the report warns when others kept too many busy).",
    ),
]
Seed = Annotated[int, typer.Option(help="Seed of random initialisation (weights without a checkpoint, predictors).")]
MinFlops = Annotated[
    float | None,
    typer.Option(help="Gate: fail (exit 3) unless the FLOPs reduction is at least this fraction, e.g. 0.3."),
]
MinSpeedup = Annotated[
    float | None, typer.Option(help="Gate: fail (exit 3) unless sparse/dense throughput is at least this, e.g. 1.2.")
]
MaxDrop = Annotated[
    float | None,
    typer.Option(
        help="Gate: fail (exit 3) if top-1 drops by more than this many percentage points (needs --eval-data)."
    ),
]
EvalData = Annotated[
    str | None,
    typer.Option(help="ImageFolder root (<class>/<image>, or its val/) or 'fashion-mnist', to measure top-1."),
]
EvalLimit = Annotated[int | None, typer.Option(help="Evaluate only the first N images.")]
EvalBatch = Annotated[int, typer.Option(help="Batch size of the evaluation.")]
MODEL_ARGUMENT = (
    "A model name (sparsified on the fly), a file written by convert/save, or a finetune run's final.pt (or its "
    "folder)."
)
DenseCheckpoint = Annotated[
    Path | None,
    typer.Option(
        help="Weights for the dense side instead of the file's own backbone weights, e.g. the model a run was "
        "fine-tuned from (its teacher's final.pt, the pretrained file); loaded strictly into the same "
        "architecture. Files and runs only: a model name takes --checkpoint."
    ),
]
JsonOut = Annotated[Path | None, typer.Option("--json", help="Write the figures as JSON to this file.")]
MarkdownOut = Annotated[Path | None, typer.Option("--markdown", help="Write the report as Markdown to this file.")]

# ---- option groups: name -> (type, default) ----------------------------------------------------------------------

# How a model named on the command line is built and sparsified; meaningless for a saved file.
MODEL_OPTIONS: dict[str, tuple[Any, Any]] = {
    "checkpoint": (Checkpoint, None),
    "pretrained": (Pretrained, False),
    "ratio": (Ratio, None),
    "locations": (Locations, None),
    "keep_ratios": (KeepRatios, None),
    "flops": (Flops, None),
    "input_size": (InputSize, None),
    "model_kwarg": (ModelKwargs, None),
    "features_only": (FeaturesOnly, False),
    "task_head": (TaskHead, None),
    "seed": (Seed, 0),
    "scorer": (Scorer, "predictor"),
    "decisions": (Decisions, "auto"),
}
# A sweep's model options: --ratios sets what the stages keep.
SWEEP_MODEL_OPTIONS = {
    name: option for name, option in MODEL_OPTIONS.items() if name not in ("ratio", "keep_ratios", "flops")
}
# How the dense/sparse pair is timed.
TIMING_OPTIONS: dict[str, tuple[Any, Any]] = {
    "batch_size": (BatchSize, 32),
    "flops_only": (FlopsOnly, False),
    "warmup": (Warmup, 3),
    "repeats": (Repeats, 10),
    "threads": (Threads, None),
    "min_speedup": (MinSpeedup, None),
}
# How the pair is evaluated, and the gates on FLOPs and accuracy (`sweep` takes these, not the timing ones).
EVAL_OPTIONS: dict[str, tuple[Any, Any]] = {
    "device": (Device, "cpu"),
    "min_flops_reduction": (MinFlops, None),
    "max_accuracy_drop": (MaxDrop, None),
    "eval_data": (EvalData, None),
    "eval_limit": (EvalLimit, None),
    "eval_batch_size": (EvalBatch, 64),
}
# How the dense/sparse pair is measured and gated.
MEASURE_OPTIONS: dict[str, tuple[Any, Any]] = {**TIMING_OPTIONS, **EVAL_OPTIONS}


def with_options(*groups: dict[str, tuple[Any, Any]]):
    """Add the options of `groups` to a command; the command receives their values as ``options`` (a namespace).

    The command declares its own arguments and options as usual, plus a keyword ``options``; typer sees the union
    (through ``__signature__``), so each shared option is declared, documented and defaulted in one place.
    """

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        own = [p for name, p in signature.parameters.items() if name != "options"]
        shared = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
            for group in groups
            for name, (annotation, default) in group.items()
        ]

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            options = SimpleNamespace(**{p.name: kwargs.pop(p.name, p.default) for p in shared})
            return command(*args, options=options, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=own + shared)
        return wrapper

    return decorate


def given(options: SimpleNamespace, group: dict[str, tuple[Any, Any]]) -> list[str]:
    """The command-line flags of `group` that were set to something other than their default."""
    return [
        f"--{name.replace('_', '-')}"
        for name, (_, default) in group.items()
        if getattr(options, name, default) != default  # a command may take only some of the group
    ]


# ---- parsing option values --------------------------------------------------------------------------------------


def parse_numbers(text: str | None, kind: type, option: str) -> list | None:
    """Comma-separated numbers of type `kind`; None stays None."""
    if text is None:
        return None
    try:
        return [kind(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(
            f"{option} {text!r}: give comma-separated numbers, e.g. {'3,6,9' if kind is int else '0.7,0.49'}."
        ) from None


def parse_model_kwargs(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` items as constructor keywords, values read as YAML (numbers, lists, booleans)."""
    import yaml

    kwargs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError(f"--model-kwarg {item!r}: write KEY=VALUE, e.g. num_classes=10 or img_size=[64,64].")
        kwargs[key] = yaml.safe_load(value)
    return kwargs
