"""The ``tokenprune`` command: convert, report, export and fine-tune, with compression gates for CI."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import ConfigError, TokenPruneError

__all__ = ["app", "main", "EXIT_OK", "EXIT_ERROR", "EXIT_GATE"]

EXIT_OK, EXIT_ERROR, EXIT_GATE = 0, 2, 3

EPILOG = (
    "Exit codes: 0 success; 2 usage or input error (bad option, unknown model, missing, truncated, foreign or refused "
    "file, unsupported model, bad dataset), with a one-paragraph message; 3 a compression gate failed, with one line "
    "saying which and by how much; 1 an unexpected internal error (a bug: please report it with the traceback)."
)

app = typer.Typer(
    name="tokenprune",
    help="Dynamic token sparsification (DynamicViT) for timm and torchvision vision transformers.",
    epilog=EPILOG,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _handles_errors(command):
    """TokenPruneError and file-system errors become a one-paragraph message and exit code 2, no traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except TokenPruneError as e:
            raise _fail(str(e)) from None
        except OSError as e:  # writing outputs: permissions, full disks, a file where a folder should be
            raise _fail(f"{e.strerror or e} ({e.filename})" if e.filename else str(e)) from None

    return wrapper


# ---- parsing option values --------------------------------------------------------------------------------------


def _numbers(text: str | None, kind: type, option: str) -> list | None:
    if text is None:
        return None
    try:
        return [kind(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(
            f"{option} {text!r}: give comma-separated numbers, e.g. {'3,6,9' if kind is int else '0.7,0.49'}."
        ) from None


def _model_kwargs(items: list[str] | None) -> dict[str, Any]:
    import yaml

    kwargs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError(f"--model-kwarg {item!r}: write KEY=VALUE, e.g. num_classes=10 or img_size=[64,64].")
        kwargs[key] = yaml.safe_load(value)
    return kwargs


# ---- shared options ---------------------------------------------------------------------------------------------

Ratio = Annotated[float | None, typer.Option("--ratio", "-r", help="Base keep ratio rho in (0, 1] (default 0.7).")]
Locations = Annotated[
    str | None,
    typer.Option(help="Comma-separated block indices the stages precede, e.g. 3,6,9 (default D/4, D/2, 3D/4)."),
]
KeepRatios = Annotated[
    str | None,
    typer.Option(help="Comma-separated per-stage keep ratios, e.g. 0.7,0.49,0.343 (overrides --ratio's schedule)."),
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
FeaturesOnly = Annotated[
    bool,
    typer.Option(
        "--features-only",
        help="Build the timm model with features_only=True: it returns its feature maps (dense prediction "
        "backbones); every map is kept whole and the file records the keyword.",
    ),
]
BatchSize = Annotated[int, typer.Option(help="Batch of the throughput measurement.")]
FlopsOnly = Annotated[bool, typer.Option(help="Count FLOPs and parameters only; skip timing.")]
Repeats = Annotated[int, typer.Option(help="Timed passes per model (medians are reported).")]
Warmup = Annotated[int, typer.Option(help="Untimed passes per model before timing.")]
Device = Annotated[str, typer.Option(help="Where timings and evaluation run, e.g. cpu or cuda.")]
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
JsonOut = Annotated[Path | None, typer.Option("--json", help="Write the figures as JSON to this file.")]
MarkdownOut = Annotated[Path | None, typer.Option("--markdown", help="Write the report as Markdown to this file.")]


# ---- checking, showing and gating --------------------------------------------------------------------------------


def _build(
    name: str, *, checkpoint, pretrained, input_size, model_kwargs, ratio, locations, keep_ratios, seed,
    scorer="predictor", features_only=False,
):  # fmt: skip
    """Parse the model options and run the pipeline's build step: (dense, sparse)."""
    from .inputs import parse_input_size
    from .pipeline import build

    return build(
        name, ratio=ratio, locations=_numbers(locations, int, "--locations"),
        keep_ratios=_numbers(keep_ratios, float, "--keep-ratios"), checkpoint=checkpoint, pretrained=pretrained,
        input_size=parse_input_size(input_size), model_kwargs=_model_kwargs(model_kwargs), seed=seed, scorer=scorer,
        features_only=features_only,
    )  # fmt: skip


def _check_numbers(batch_size: int, warmup: int, repeats: int, eval_batch_size: int, eval_limit: int | None) -> None:
    if (
        batch_size < 1
        or repeats < 1
        or warmup < 0
        or eval_batch_size < 1
        or (eval_limit is not None and eval_limit < 1)
    ):
        raise ConfigError("--batch-size, --repeats, --eval-batch-size and --eval-limit must be >= 1, --warmup >= 0.")


def _write(path: Path | None, text: str) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _show_and_gate(report: dict[str, Any], gates, json_path: Path | None, markdown_path: Path | None) -> None:
    """Write the files, print the table, then apply the gates (files are written first so CI can upload them)."""
    from rich.console import Console

    from .measure import render_table
    from .pipeline import gate, markdown

    _write(json_path, json.dumps(report, indent=2) + "\n")
    _write(markdown_path, markdown(report))
    console = Console()
    console.print(render_table(report))
    acc = report.get("accuracy")
    if acc:
        console.print(
            f"top-1 on {acc['data']} ({acc['images']} images): dense {acc['dense_top1']:.2f}%, "
            f"sparse {acc['sparse_top1']:.2f}%, drop {acc['drop']:.2f} points"
        )
    failures = gate(report, gates)
    if failures:
        typer.echo(f"gate failed: {'; '.join(failures)}", err=True)
        raise typer.Exit(EXIT_GATE)
    if gates.any():
        console.print("all gates passed")


# ---- commands ---------------------------------------------------------------------------------------------------


@app.command()
@_handles_errors
def convert(
    model: Annotated[
        str, typer.Argument(help="timm or torchvision model name, e.g. deit_small_patch16_224, vit_b_16.")
    ],
    out: Annotated[Path, typer.Option(help="Output folder: model.safetensors, report.json, report.md.")],
    checkpoint: Checkpoint = None,
    pretrained: Pretrained = False,
    ratio: Ratio = None,
    locations: Locations = None,
    keep_ratios: KeepRatios = None,
    input_size: InputSize = None,
    model_kwarg: ModelKwargs = None,
    features_only: FeaturesOnly = False,
    batch_size: BatchSize = 32,
    flops_only: FlopsOnly = False,
    warmup: Warmup = 3,
    repeats: Repeats = 10,
    device: Device = "cpu",
    seed: Seed = 0,
    scorer: Scorer = "predictor",
    min_flops_reduction: MinFlops = None,
    min_speedup: MinSpeedup = None,
    max_accuracy_drop: MaxDrop = None,
    eval_data: EvalData = None,
    eval_limit: EvalLimit = None,
    eval_batch_size: EvalBatch = 64,
) -> None:
    """Sparsify a timm/torchvision model; save it with its dense-vs-sparse report.

    Writes OUT/model.safetensors (tokenprune.load, `tokenprune export`), OUT/report.json and OUT/report.md, prints
    the report table, then applies the gates (exit 3 when one fails; the files are written first).
    """
    from .gates import Gates
    from .io import save
    from .pipeline import MODEL_FILE
    from .pipeline import measure as measure_pair

    gates = Gates(min_flops_reduction, min_speedup, max_accuracy_drop)
    _check_numbers(batch_size, warmup, repeats, eval_batch_size, eval_limit)
    dense, sparse = _build(
        model, checkpoint=checkpoint, pretrained=pretrained, input_size=input_size, model_kwargs=model_kwarg,
        ratio=ratio, locations=locations, keep_ratios=keep_ratios, seed=seed, scorer=scorer,
        features_only=features_only,
    )  # fmt: skip
    saved = save(sparse, out / MODEL_FILE)
    report = measure_pair(
        model, dense, sparse, gates=gates, flops_only=flops_only, batch_size=batch_size, warmup=warmup,
        repeats=repeats, device=device, eval_data=eval_data, eval_limit=eval_limit, eval_batch_size=eval_batch_size,
    )  # fmt: skip
    typer.echo(f"saved {saved}")
    _show_and_gate(report, gates, out / "report.json", out / "report.md")


@app.command()
@_handles_errors
def report(
    model: Annotated[
        str, typer.Argument(help="A model name (sparsified on the fly) or a file written by convert/save.")
    ],
    ratio: Ratio = None,
    locations: Locations = None,
    keep_ratios: KeepRatios = None,
    input_size: InputSize = None,
    checkpoint: Checkpoint = None,
    pretrained: Pretrained = False,
    model_kwarg: ModelKwargs = None,
    features_only: FeaturesOnly = False,
    batch_size: BatchSize = 32,
    flops_only: FlopsOnly = False,
    warmup: Warmup = 3,
    repeats: Repeats = 10,
    device: Device = "cpu",
    seed: Seed = 0,
    scorer: Scorer = "predictor",
    json_path: JsonOut = None,
    markdown_path: MarkdownOut = None,
    min_flops_reduction: MinFlops = None,
    min_speedup: MinSpeedup = None,
    max_accuracy_drop: MaxDrop = None,
    eval_data: EvalData = None,
    eval_limit: EvalLimit = None,
    eval_batch_size: EvalBatch = 64,
) -> None:
    """Compare a dense model with its sparse version: GFLOPs, throughput, latency, top-1.

    MODEL is a name (sparsified on the fly with --ratio/--locations/--keep-ratios) or a file written by convert or
    tokenprune.save (its dense model is the architecture with the file's backbone weights). GFLOPs are
    multiply-adds per image, per stage; throughput at --batch-size, latency at batch 1; top-1 with --eval-data.
    Prints a table, writes --json/--markdown, then applies the gates (exit 3 when one fails).
    """
    from .gates import Gates
    from .pipeline import load_pair
    from .pipeline import measure as measure_pair

    gates = Gates(min_flops_reduction, min_speedup, max_accuracy_drop)
    _check_numbers(batch_size, warmup, repeats, eval_batch_size, eval_limit)
    path = Path(model)
    if path.suffix in (".safetensors", ".pth", ".pt", ".bin") or path.exists():
        given = {
            "--ratio": ratio,
            "--locations": locations,
            "--keep-ratios": keep_ratios,
            "--input-size": input_size,
            "--checkpoint": checkpoint,
            "--model-kwarg": model_kwarg,
            "--pretrained": pretrained or None,
            "--scorer": scorer if scorer != "predictor" else None,
            "--features-only": features_only or None,
        }
        extra = [k for k, v in given.items() if v is not None]
        if extra:
            raise ConfigError(
                f"{', '.join(extra)} apply to model names; {path} keeps the configuration it was saved with."
            )
        name, dense, sparse = load_pair(path)
    else:
        name = model
        dense, sparse = _build(
            model, checkpoint=checkpoint, pretrained=pretrained, input_size=input_size, model_kwargs=model_kwarg,
            ratio=ratio, locations=locations, keep_ratios=keep_ratios, seed=seed, scorer=scorer,
            features_only=features_only,
        )  # fmt: skip
    result = measure_pair(
        name, dense, sparse, gates=gates, flops_only=flops_only, batch_size=batch_size, warmup=warmup,
        repeats=repeats, device=device, eval_data=eval_data, eval_limit=eval_limit, eval_batch_size=eval_batch_size,
    )  # fmt: skip
    _show_and_gate(result, gates, json_path, markdown_path)


@app.command()
@_handles_errors
def export(
    path: Annotated[
        Path, typer.Argument(help="A model file written by tokenprune.save, or the output folder of convert.")
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="The file to write (.onnx, or .pt2 for torch-export); default: beside the input."),
    ] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="onnx or torch-export.")] = "onnx",
    dynamic_batch: Annotated[
        bool, typer.Option("--dynamic-batch/--static-batch", help="Accept any batch size; --static-batch fixes it.")
    ] = True,
    batch_size: Annotated[int, typer.Option(help="Example batch (the fixed batch with --static-batch).")] = 2,
    verify: Annotated[bool, typer.Option(help="Run the exported file and compare with PyTorch.")] = True,
    json_path: JsonOut = None,
) -> None:
    """Export a saved sparse model (top-k + gather) to ONNX or torch.export, verified against PyTorch.

    The exported graph accepts any batch size (unless --static-batch) but only the image size the model was
    sparsified at: the keep counts k = floor(rho * tokens) and the positional embeddings are fixed at export.
    ONNX: input "images" [B, C, H, W] float32, output "logits"; torch-export: a .pt2 for torch.export.load.
    """
    from .export import FORMATS
    from .export import export as export_model
    from .io import load
    from .pipeline import model_file

    if format not in FORMATS:
        raise ConfigError(f"--format {format!r}: choose one of {', '.join(FORMATS)}.")
    if batch_size < 1:
        raise ConfigError("--batch-size must be >= 1.")
    path = model_file(path)
    if out is None:
        out = path.with_suffix(".onnx" if format == "onnx" else ".pt2")
    model = load(path)
    info = export_model(model, out, format=format, dynamic_batch=dynamic_batch, batch_size=batch_size, verify=verify)
    _write(json_path, json.dumps(info, indent=2) + "\n")
    diff = info["max_abs_diff"]
    checked = f", max |difference| from PyTorch {diff:.2e}" if diff is not None else ""
    size = "x".join(map(str, info["input_size"]))
    typer.echo(f"wrote {info['file']} ({format}, batch {info['batch']}, input {size}{checked})")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_handles_errors
def finetune(
    ctx: typer.Context,
    recipe: Annotated[Path | None, typer.Option("--recipe", "-r", help="YAML recipe (defaults when omitted).")] = None,
    save_path: Annotated[
        Path | None, typer.Option("--save", help="Also write the result as a tokenprune file.")
    ] = None,
    json_path: JsonOut = None,
) -> None:
    """Fine-tune a sparsified model with the DynamicViT objective, per a YAML recipe.

    Extra KEY=VALUE arguments override recipe entries (e.g. optim.epochs=1). Prints the final metrics as JSON;
    the run folder holds recipe.yaml, metrics.jsonl, last.pt and final.pt, and --save also writes a tokenprune
    file. For several GPUs: torchrun --nproc_per_node N -m tokenprune.train --recipe FILE [KEY=VALUE ...].
    """
    import os

    from .train import finetune as run_finetune

    bad = [a for a in ctx.args if "=" not in a]
    if bad:
        raise ConfigError(f"unexpected arguments {bad}; overrides are KEY=VALUE, e.g. optim.epochs=1.")
    result = run_finetune(str(recipe) if recipe else None, overrides=list(ctx.args))
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if save_path is not None:
        from .io import save
        from .models import resolve_library
        from .sparsify import config_of

        spec, source = result.recipe.model, None
        if config_of(result.model).source is None:  # the recipe says how its model was built, in either library
            source = {"library": resolve_library(spec.name), "name": spec.name, "kwargs": dict(spec.kwargs)}
        save(result.model, save_path, source=source)
    _write(json_path, json.dumps(result.metrics, indent=2, default=str) + "\n")
    typer.echo(json.dumps(result.metrics, default=str))


@app.command()
@_handles_errors
def visualize(
    model: Annotated[str, typer.Argument(help="A file written by convert/save, or a model name (sparsified here).")],
    images: Annotated[list[Path], typer.Argument(help="Image files (any format Pillow reads).")],
    out: Annotated[Path, typer.Option(help="Folder for the pictures, <image stem>_kept.png.")],
    ratio: Annotated[float, typer.Option("--ratio", "-r", help="Keep ratio when MODEL is a name.")] = 0.7,
    pretrained: Pretrained = False,
    mean: Annotated[
        str | None, typer.Option(help="Normalisation mean per channel (default ImageNet's; 0.5 if 1 channel).")
    ] = None,
    std: Annotated[
        str | None, typer.Option(help="Normalisation std per channel (default ImageNet's; 0.5 if 1 channel).")
    ] = None,
) -> None:
    """Draw what a sparsified model keeps: per image, one panel per stage with the dropped patches shaded.

    Spatial models (ConvNeXt, Swin) show where the slow path runs after each stage. Images are resized to the
    model's input size; a name is sparsified with random weights unless --pretrained.
    """
    from .visualize import visualize_files

    written = visualize_files(
        model, images, out, ratio=ratio, pretrained=pretrained,
        mean=_numbers(mean, float, "--mean"), std=_numbers(std, float, "--std"),
    )  # fmt: skip
    for path in written:
        typer.echo(f"wrote {path}")


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"tokenprune {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Dynamic token sparsification (DynamicViT) for timm and torchvision vision transformers."""


def main() -> None:
    """Console-script entry point (``tokenprune``)."""
    sys.exit(app())
