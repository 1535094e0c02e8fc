"""The ``tokenprune`` command: convert, report, sweep, export and fine-tune, with compression gates for CI."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import typer

from ..errors import CheckpointError, ConfigError, TokenPruneError
from ._options import (
    EVAL_OPTIONS,
    MEASURE_OPTIONS,
    MODEL_ARGUMENT,
    MODEL_OPTIONS,
    SWEEP_MODEL_OPTIONS,
    DenseCheckpoint,
    JsonOut,
    MarkdownOut,
    Pretrained,
    given,
    parse_model_kwargs,
    parse_numbers,
    with_options,
)

__all__ = ["app", "main", "EXIT_OK", "EXIT_ERROR", "EXIT_GATE"]

EXIT_OK, EXIT_ERROR, EXIT_GATE = 0, 2, 3

EPILOG = (
    "Exit codes: 0 success; 2 usage or input error (bad option, unknown model, missing, truncated, foreign or refused "
    "file, unsupported model, bad dataset), with a one-paragraph message; 3 a compression gate failed, with one line "
    "saying which and by how much; 1 an unexpected internal error (a bug: please report it with the traceback)."
)

app = typer.Typer(
    name="tokenprune",
    help=(
        "Dynamic spatial sparsification (DynamicViT) for timm and torchvision models: vision transformers, "
        "hierarchical ViTs and CNNs."
    ),
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


# ---- checking, showing and gating --------------------------------------------------------------------------------


def _build(name: str, o: SimpleNamespace):
    """Parse the model options and run the pipeline's build step: (dense, sparse)."""
    from ..inputs import parse_input_size
    from .pipeline import build

    keep_ratios = parse_numbers(o.keep_ratios, float, "--keep-ratios")
    _one_keep_option(o.ratio, keep_ratios, o.flops)
    dense, sparse = build(
        name, ratio=o.ratio, locations=parse_numbers(o.locations, int, "--locations"),
        keep_ratios=keep_ratios, checkpoint=o.checkpoint,
        pretrained=o.pretrained, input_size=parse_input_size(o.input_size),
        model_kwargs=parse_model_kwargs(o.model_kwarg), seed=o.seed, scorer=o.scorer, features_only=o.features_only,
        task_head=o.task_head, decisions=o.decisions,
    )  # fmt: skip
    if o.flops is not None:
        from ..sparsify import set_keep_ratios

        set_keep_ratios(sparse, flops=o.flops)
    return dense, sparse


def _import_official(path: Path, o: SimpleNamespace):
    """(dense, sparse) of an official DynamicViT checkpoint, at --ratio when given (else the file's own)."""
    from ..io.official import load_official

    extra = [flag for flag in given(o, MODEL_OPTIONS) if flag != "--ratio"]
    if extra:
        raise ConfigError(
            f"{', '.join(extra)} apply to model names; {path} is an official DynamicViT checkpoint, built as the "
            "authors built it (only --ratio may set the keep ratio it is imported at). To move it afterwards: "
            "`tokenprune report OUT --flops B` or --keep-ratios."
        )
    return load_official(path, ratio=o.ratio)


def _one_keep_option(ratio: float | None, keep_ratios: list[float] | None, flops: float | None) -> None:
    """What the stages keep is said once: --ratio, --keep-ratios or --flops."""
    if sum(value is not None for value in (ratio, keep_ratios, flops)) > 1:
        raise ConfigError("give one of --ratio, --keep-ratios and --flops: each sets what the stages keep.")


def _model_pair(
    model: str,
    o: SimpleNamespace,
    dense_checkpoint: Path | None,
    keeps: tuple[str, ...],
    build_ratio: float | None = None,
):
    """(name, dense, sparse, path) of MODEL: a file or run loaded (path set), whose configuration the model options
    may not change but for the flags `keeps`; or a model name built and sparsified with them, at `build_ratio` when
    given (path None)."""
    from .pipeline import load_pair

    path = Path(model)
    if path.suffix in (".safetensors", ".pth", ".pt", ".bin") or path.exists():
        extra = [flag for flag in given(o, MODEL_OPTIONS) if flag not in keeps]
        if extra:
            listed = f"{', '.join(keeps[:-1])} or {keeps[-1]}" if len(keeps) > 1 else "".join(keeps)
            may = f" (only {listed} may change what its stages keep)" if keeps else ""
            raise ConfigError(
                f"{', '.join(extra)} apply to model names; {path} keeps the configuration it was saved with{may}."
            )
        return (*load_pair(path, dense_weights=dense_checkpoint), path)
    if "/" in model or os.sep in model:
        raise CheckpointError(
            f"{model}: no such file or folder. MODEL is a timm/torchvision model name, a file written by convert "
            "or tokenprune.save, or a finetune run's final.pt or folder."
        )
    if dense_checkpoint is not None:
        raise ConfigError(
            f"--dense-checkpoint applies to model files and runs; {model} is a model name, whose dense and "
            "sparse versions both take --checkpoint."
        )
    if build_ratio is not None:
        o = SimpleNamespace(**{**vars(o), "ratio": build_ratio, "keep_ratios": None, "flops": None})
    return (model, *_build(model, o), None)


#: The model options a saved file or run still takes: what its stages keep (`tokenprune.set_keep_ratios`).
_REKEEP = ("--ratio", "--keep-ratios", "--flops")


def _rekeep(sparse, o: SimpleNamespace, path: Path) -> list[float] | None:
    """Apply --ratio/--keep-ratios/--flops to a loaded model; the keep ratios it was saved with when they changed
    it."""
    from ..nn.recorder import config_of
    from ..sparsify import set_keep_ratios

    keep = parse_numbers(o.keep_ratios, float, "--keep-ratios")
    if o.ratio is None and keep is None and o.flops is None:
        return None
    _one_keep_option(o.ratio, keep, o.flops)
    saved = list(config_of(sparse).keep_ratios)
    try:
        set_keep_ratios(sparse, keep, ratio=o.ratio, flops=o.flops)
    except TokenPruneError as e:
        raise type(e)(f"{path}: {e}") from None
    return saved


def _gates(o: SimpleNamespace):
    """The gates the measurement options ask for, after checking the numbers (before any model is built); a command
    without the timing options (`sweep`) has no speed gate."""
    from .gates import Gates

    timing = hasattr(o, "batch_size")
    if timing and (o.batch_size < 1 or o.repeats < 1 or o.warmup < 0):
        raise ConfigError("--batch-size and --repeats must be >= 1, --warmup >= 0.")
    if o.eval_batch_size < 1 or (o.eval_limit is not None and o.eval_limit < 1):
        raise ConfigError("--eval-batch-size and --eval-limit must be >= 1.")
    return Gates(o.min_flops_reduction, o.min_speedup if timing else None, o.max_accuracy_drop)


def _write(path: Path | None, text: str) -> None:
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        except OSError as e:
            raise ConfigError(f"cannot write {path}: {e.strerror or e}; choose another path.") from None


def _check_writable(path: Path | None, option: str) -> None:
    """Before a long job: `path` can be created (its folder exists or can be made, nothing is in the way)."""
    if path is None:
        return
    probe = path.parent / f".{path.name}.write-test.tmp"
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "it is a folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot be written ({e.strerror or e}); choose another path.") from None


def _measure_and_gate(
    name: str,
    dense,
    sparse,
    o: SimpleNamespace,
    gates,
    json_path: Path | None,
    markdown_path: Path | None,
    dense_weights: Path | None = None,
    saved_keep: list[float] | None = None,
) -> None:
    """Measure the pair, write the files, print the table, then apply the gates (files first, so CI can upload
    them)."""
    from rich.console import Console

    from ..measure import render_table
    from .pipeline import gate, markdown, measure, rekept_note

    report = measure(
        name, dense, sparse, gates=gates, flops_only=o.flops_only, batch_size=o.batch_size, warmup=o.warmup,
        repeats=o.repeats, device=o.device, threads=o.threads, eval_data=o.eval_data, eval_limit=o.eval_limit,
        eval_batch_size=o.eval_batch_size, dense_weights=dense_weights, saved_keep_ratios=saved_keep,
    )  # fmt: skip
    _write(json_path, json.dumps(report, indent=2) + "\n")
    _write(markdown_path, markdown(report))
    console = Console()
    console.print(render_table(report))
    note = rekept_note(report)
    if note:
        console.print(note)
    acc = report.get("accuracy")
    if acc:
        console.print(
            f"top-1 on {acc['data']} ({acc['images']} images): dense"
            f"{f' (weights {dense_weights})' if dense_weights else ''} {acc['dense_top1']:.2f}%, "
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
@with_options(MODEL_OPTIONS, MEASURE_OPTIONS)
def convert(
    model: Annotated[
        str,
        typer.Argument(
            help="timm or torchvision model name, e.g. deit_small_patch16_224, vit_b_16; or an official DynamicViT "
            "DeiT, ConvNeXt or Swin checkpoint (.pth, or its tensors as .safetensors), imported."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Output folder: model.safetensors, report.json, report.md.")],
    *,
    options: SimpleNamespace,
) -> None:
    """Sparsify a timm/torchvision model, or import an official DynamicViT checkpoint; save it with its
    dense-vs-sparse report.

    Writes OUT/model.safetensors (tokenprune.load, `tokenprune export`), OUT/report.json and OUT/report.md, prints
    the report table, then applies the gates (exit 3 when one fails; the files are written first).
    """
    from ..io import save
    from ..io.official import is_official_file
    from .pipeline import MODEL_FILE

    gates = _gates(options)
    dense, sparse = _import_official(Path(model), options) if is_official_file(model) else _build(model, options)
    typer.echo(f"saved {save(sparse, out / MODEL_FILE)}")
    _measure_and_gate(model, dense, sparse, options, gates, out / "report.json", out / "report.md")


@app.command()
@_handles_errors
@with_options(MODEL_OPTIONS, MEASURE_OPTIONS)
def report(
    model: Annotated[str, typer.Argument(help=MODEL_ARGUMENT)],
    json_path: JsonOut = None,
    markdown_path: MarkdownOut = None,
    dense_checkpoint: DenseCheckpoint = None,
    *,
    options: SimpleNamespace,
) -> None:
    """Compare a dense model with its sparse version: GFLOPs, throughput, latency, top-1.

    MODEL is a name (sparsified on the fly with --ratio/--locations/--keep-ratios/--flops), a file written by convert or
    tokenprune.save, or the final.pt of a finetune run (a folder: its model.safetensors, else its final.pt); a file's
    dense model is its architecture with the file's backbone weights (fine-tuned ones, for a fine-tuned model), or
    with --dense-checkpoint's: to gate the accuracy drop against the model you started from, name its weights there.
    A file's stages keep what they were saved with, or what --ratio/--keep-ratios/--flops say (no retraining:
    tokenprune.set_keep_ratios; --flops moves the saved keep ratios, all stages together, onto the budget).
    GFLOPs are multiply-adds per image, per stage; throughput at --batch-size, latency at batch 1; top-1 with
    --eval-data.
    Prints a table, writes --json/--markdown, then applies the gates (exit 3 when one fails).
    """
    gates = _gates(options)
    name, dense, sparse, path = _model_pair(model, options, dense_checkpoint, keeps=_REKEEP)
    saved_keep = None if path is None else _rekeep(sparse, options, path)
    _measure_and_gate(name, dense, sparse, options, gates, json_path, markdown_path, dense_checkpoint, saved_keep)


@app.command()
@_handles_errors
@with_options(SWEEP_MODEL_OPTIONS, EVAL_OPTIONS)
def sweep(
    model: Annotated[str, typer.Argument(help=MODEL_ARGUMENT)],
    ratios: Annotated[
        str | None,
        typer.Option(help="Comma-separated base keep ratios rho to measure, each in (0, 1] [default: 0.5,...,0.9]."),
    ] = None,
    flops: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated compute budgets instead, each in (0, 1): the chain's multiply-adds as a fraction of "
            "the dense chain's; the model's keep ratios (a file's saved, learned ones) move all together onto each."
        ),
    ] = None,
    json_path: JsonOut = None,
    markdown_path: MarkdownOut = None,
    dense_checkpoint: DenseCheckpoint = None,
    *,
    options: SimpleNamespace,
) -> None:
    """Measure a sparse model at several keep ratios or budgets: GFLOPs and top-1 at each; choose the cheapest that
    passes.

    Each point is set on the same model, without retraining (tokenprune.set_keep_ratios), so a fine-tuned file or
    run shows what its budget could be; a model name is sparsified once, with the model options, and moved the same
    way. --ratios sets each stage by the default schedule of rho; --flops keeps the model's allocation across stages
    (a learned one, for a run that learned its keep ratios) and moves it onto each budget. Top-1 with --eval-data,
    the dense model evaluated once on the same images. With --min-flops-reduction and/or --max-accuracy-drop, the
    lowest-cost point passing both is chosen (JSON "chosen"); none passing is exit 3. No timing: time the chosen
    point with `tokenprune report MODEL --ratio R` (or --flops F). Each row is the model moved, not one fine-tuned
    there, which can be better (docs/results.md): fine-tune again at the point chosen where it matters.
    Prints a table, writes --json/--markdown, then applies the gates.
    """
    from rich.console import Console
    from rich.table import Table

    from ..config import DEFAULT_RATIO
    from ..nn.recorder import config_of
    from .pipeline import SWEEPS, check_sweep_points, sweep_failures, sweep_markdown, sweep_notes, sweep_rows
    from .pipeline import sweep as run_sweep

    if ratios is not None and flops is not None:
        raise ConfigError("give --ratios or --flops, not both: a sweep varies one of them.")
    by = "flops" if flops is not None else "ratio"
    text = flops if flops is not None else ratios or "0.5,0.6,0.7,0.8,0.9"
    points = check_sweep_points(parse_numbers(text, float, "--flops" if flops else "--ratios") or [], by)
    gates = _gates(options)
    # reason: a model name is sparsified at the lowest ratio, the likeliest to cost less than the dense model (which
    # `sparsify` requires), then moved like a file; for budgets at the default ratio, whose allocation they move
    build_ratio = min(points) if by == "ratio" else DEFAULT_RATIO
    name, dense, sparse, path = _model_pair(model, options, dense_checkpoint, keeps=(), build_ratio=build_ratio)
    saved = None if path is None else list(config_of(sparse).keep_ratios)
    result = run_sweep(
        name, dense, sparse, points, by=by, gates=gates, eval_data=options.eval_data, eval_limit=options.eval_limit,
        eval_batch_size=options.eval_batch_size, device=options.device, dense_weights=dense_checkpoint,
        saved_keep_ratios=saved,
    )  # fmt: skip
    _write(json_path, json.dumps(result, indent=2) + "\n")
    _write(markdown_path, sweep_markdown(result))
    header, rows = sweep_rows(result)
    table = Table(*header, title=f"{name}: {SWEEPS[by].title.lower()} sweep (no retraining)")
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    for note in sweep_notes(result):
        console.print(note)
    failures = sweep_failures(result)
    if failures:
        typer.echo(f"gate failed at every {SWEEPS[by].noun}: {' | '.join(failures)}", err=True)
        raise typer.Exit(EXIT_GATE)


@app.command()
@_handles_errors
def export(
    path: Annotated[
        Path,
        typer.Argument(
            help="A model file written by tokenprune.save, a convert output folder, or a finetune run's final.pt (or "
            "its folder)."
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            help="The file to write (.onnx, or .pt2 for torch-export); default: beside the input (with --backbone: "
            "model.backbone.onnx)."
        ),
    ] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="onnx or torch-export.")] = "onnx",
    dynamic_batch: Annotated[
        bool, typer.Option("--dynamic-batch/--static-batch", help="Accept any batch size; --static-batch fixes it.")
    ] = True,
    batch_size: Annotated[int, typer.Option(help="Example batch (the fixed batch with --static-batch).")] = 2,
    verify: Annotated[bool, typer.Option(help="Run the exported file and compare with PyTorch.")] = True,
    backbone: Annotated[
        bool,
        typer.Option(
            "--backbone",
            help="Export the sparsified backbone of a detector (whose own forward does not export): input the batch "
            "its transform makes, outputs its feature maps.",
        ),
    ] = False,
    ratio: Annotated[
        float | None, typer.Option("--ratio", "-r", help="Export at this base keep ratio instead of the saved one.")
    ] = None,
    keep_ratios: Annotated[
        str | None, typer.Option(help="Export at these per-stage keep ratios, e.g. 0.6,0.36,0.216.")
    ] = None,
    flops: Annotated[
        float | None,
        typer.Option(help="Export at this compute budget: the chain's multiply-adds, a fraction of the dense chain's."),
    ] = None,
    json_path: JsonOut = None,
) -> None:
    """Export a saved sparse model (top-k + gather) to ONNX or torch.export, verified against PyTorch.

    The exported graph accepts any batch size (unless --static-batch) but only the image size the model was
    sparsified at: the keep counts k = floor(rho * tokens) and the positional embeddings are fixed at export.
    --ratio/--keep-ratios/--flops export the model keeping other counts than it was saved with (no retraining:
    measure the accuracy there with `tokenprune report FILE --ratio ...`).
    ONNX: input "images" [B, C, H, W] float32, output "logits" (or one per feature map); torch-export: a .pt2 for
    torch.export.load. A detector exports its sparsified backbone only, with --backbone.
    """
    from ..export import FORMATS
    from ..export import export as export_model
    from .pipeline import load_model, model_file

    if format not in FORMATS:
        raise ConfigError(f"--format {format!r}: choose one of {', '.join(FORMATS)}.")
    if batch_size < 1:
        raise ConfigError("--batch-size must be >= 1.")
    path = model_file(path)
    if out is None:  # a backbone alone gets its own name, so that nobody takes it for the whole model
        out = path.with_suffix((".backbone" if backbone else "") + (".onnx" if format == "onnx" else ".pt2"))
    model = load_model(path)
    _rekeep(model, SimpleNamespace(ratio=ratio, keep_ratios=keep_ratios, flops=flops), path)
    info = export_model(
        model, out, format=format, dynamic_batch=dynamic_batch, batch_size=batch_size, verify=verify, backbone=backbone
    )
    _write(json_path, json.dumps(info, indent=2) + "\n")
    diff = info["max_abs_diff"]
    checked = f", max |difference| from PyTorch {diff:.2e}" if diff is not None else ""
    size = "x".join(map(str, info["input_size"]))
    what = f"submodule {info['module']}, " if info["module"] else ""
    kept = "/".join(f"{r:g}" for r in info["keep_ratios"])
    typer.echo(f"wrote {info['file']} ({what}{format}, batch {info['batch']}, input {size}, keep {kept}{checked})")


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
    from ..train import finetune as run_finetune

    bad = [a for a in ctx.args if "=" not in a]
    if bad:
        recipes = [a for a in bad if a.endswith((".yaml", ".yml"))]
        hint = f" A recipe is given with --recipe, e.g. --recipe {recipes[0]}." if recipes else ""
        raise ConfigError(f"unexpected arguments {bad}; overrides are KEY=VALUE, e.g. optim.epochs=1.{hint}")
    _check_writable(save_path, "--save")  # before training: a run must not end unable to write its result
    _check_writable(json_path, "--json")
    result = run_finetune(str(recipe) if recipe else None, overrides=list(ctx.args))
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if save_path is not None:
        from ..io import save
        from ..models import resolve_library
        from ..nn.recorder import config_of

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
    ratio: Annotated[
        float | None, typer.Option("--ratio", "-r", help="Base keep ratio (a name: default 0.7; a file: as saved).")
    ] = None,
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
    from ..visualize import visualize_files

    written = visualize_files(
        model, images, out, ratio=ratio, pretrained=pretrained,
        mean=parse_numbers(mean, float, "--mean"), std=parse_numbers(std, float, "--std"),
    )  # fmt: skip
    for path in written:
        typer.echo(f"wrote {path}")


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"tokenprune {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Dynamic spatial sparsification (DynamicViT) for timm and torchvision models."""


def main() -> None:
    """Console-script entry point (``tokenprune``)."""
    sys.exit(app())
