"""The convert/report pipeline, shared by the CLI and the examples: build a dense model, sparsify it (or load both
from a file), measure the pair, apply the gates; or measure the sparse model at several keep ratios (`sweep`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ..config import DEFAULT_RATIO
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
    "sweep",
    "choose",
    "check_sweep_points",
    "sweep_failures",
    "sweep_markdown",
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
        DEFAULT_RATIO if ratio is None else ratio,
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
            name, dense, sparse, config.input_size, batch_size=batch_size, flops_only=flops_only,
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


def sweep(
    name: str,
    dense: nn.Module,
    sparse: nn.Module,
    points: Sequence[float],
    *,
    by: str = "ratio",
    gates: Gates | None = None,
    eval_data: str | None = None,
    eval_limit: int | None = None,
    eval_batch_size: int = 64,
    device: str = "cpu",
    dense_weights: str | os.PathLike[str] | None = None,
    saved_keep_ratios: list[float] | None = None,
) -> dict[str, Any]:
    """`sparse` at each of `points`, without retraining (`tokenprune.set_keep_ratios`): base keep ratios rho
    (`by` "ratio") or compute budgets (`by` "flops": the chain's multiply-adds as a fraction of the dense chain's, the
    model's keep ratios moved all together onto each). Per point GFLOPs per image, top-1 with `eval_data` (the dense
    model evaluated once, on the same images), the FLOPs and accuracy gates; the lowest-cost point that passes them
    all is ``chosen``. `sparse` is left at the last point measured. The result (``schema_version: 1``, ``kind:
    "sweep"``)::

        {"schema_version": 1, "kind": "sweep", "by": "ratio" | "flops", "model": str, "input_size": [C, H, W],
         "scorer": str,
         "dense_weights": str | null,            # as in the report
         "saved_keep_ratios": [float] | null,    # what a file or run was saved with; null for a model name
         "dense": {"gmacs": float | null, "top1": float | null},
         "eval": {"data": str, "images": int} | null,
         "gates": {"min_flops_reduction": float | null, "max_accuracy_drop": float | null},
         "rows": [{"ratio": float | null,        # the base keep ratio (by "ratio"); null by "flops"
                   "flops": float | null,        # the chain's compute budget (by "flops"); null by "ratio"
                   "keep_ratios": [float] | null, "gmacs": float | null,
                   "flops_reduction": float | null, "top1": float | null, "drop": float | null,
                   "failures": [str],            # one line per failed gate
                   "refused": str | null,        # why the point was refused (the full message), and as a word:
                   "refused_as": "costlier" | "out of reach" | null}],  # it would cost at least the dense
                                                 #   model; a budget out of the chain's reach
         "chosen": float | null,                 # the chosen row's "ratio" or "flops" (as `by`); null: no gate
                                                 #   given, or no point passed them all
         "uncounted_ops": [str], "versions": {...}}

    Raises:
        ConfigError: no point or one out of range; a speed gate (a sweep does not time); the accuracy gate without
            `eval_data`.
    """
    from ..errors import UnsupportedModelError
    from ..measure import build_report
    from ..nn.recorder import config_of
    from ..sparsify import set_keep_ratios
    from .gates import classifier_dataset, evaluate_accuracy

    gates = gates or Gates(None, None, None)
    _no_speed_gate(gates)
    if gates.needs_accuracy and eval_data is None:
        raise ConfigError("--max-accuracy-drop needs --eval-data (an ImageFolder root or 'fashion-mnist').")
    points = check_sweep_points(points, by)
    config = config_of(sparse)
    input_size = tuple(config.input_size)
    dataset, kwargs = None, {"batch_size": eval_batch_size, "limit": eval_limit, "device": device}
    result: dict[str, Any] = {
        "schema_version": 1,
        "kind": "sweep",
        "by": by,
        "model": name,
        "input_size": list(input_size),
        "scorer": config.scorer,
        "dense_weights": None if dense_weights is None else str(dense_weights),
        "saved_keep_ratios": None if saved_keep_ratios is None else [float(r) for r in saved_keep_ratios],
        "dense": {"gmacs": None, "top1": None},
        "eval": None,
        "gates": None,
        "rows": [],
        "chosen": None,
        "uncounted_ops": [],
        "versions": None,
    }
    if eval_data is not None:
        dataset = classifier_dataset(eval_data, input_size, dense)
        images = len(dataset) if eval_limit is None else min(eval_limit, len(dataset))
        result["eval"] = {"data": str(eval_data), "images": images}
        result["dense"]["top1"] = evaluate_accuracy(dense, dataset, **kwargs)
    uncounted: set[str] = set()
    start = list(config.keep_ratios)  # each budget moves these, as `report --flops` moves them
    for point in points:
        row: dict[str, Any] = {"ratio": None, "flops": None, by: float(point), "keep_ratios": None, "gmacs": None}
        row.update(flops_reduction=None, top1=None, drop=None, failures=[], refused=None, refused_as=None)
        result["rows"].append(row)
        try:
            if by == "flops":
                set_keep_ratios(sparse, start)
            set_keep_ratios(sparse, **{by: point})
        except UnsupportedModelError as e:  # `refuse_costlier`
            row.update(refused=str(e), refused_as="costlier")
            continue
        except ConfigError as e:  # `budget_shift` (the points were checked before)
            row.update(refused=str(e), refused_as="out of reach")
            continue
        report = build_report(name, dense, sparse, input_size, flops_only=True, ratio=row["ratio"])
        result["dense"]["gmacs"], result["versions"] = report["dense"]["gmacs"], report["versions"]
        uncounted.update(report["uncounted_ops"])
        row.update(
            keep_ratios=[s["keep_ratio"] for s in report["stages"]],
            gmacs=report["sparse"]["gmacs"],
            flops_reduction=report["flops_reduction"],
        )
        if dataset is not None:
            row["top1"] = evaluate_accuracy(sparse, dataset, **kwargs)
            row["drop"] = result["dense"]["top1"] - row["top1"]
    result["uncounted_ops"] = sorted(uncounted)
    return choose(result, gates)


def choose(result: dict[str, Any], gates: Gates) -> dict[str, Any]:
    """Apply `gates` to a sweep's measured rows (in place): each row's ``failures``, the ``gates`` entry and
    ``chosen``, the lowest-cost ratio passing every gate (None without gates, or when none passes).

    Raises:
        ConfigError: a speed gate; the accuracy gate on rows measured without top-1.
    """
    _no_speed_gate(gates)
    result["gates"] = {"min_flops_reduction": gates.min_flops_reduction, "max_accuracy_drop": gates.max_accuracy_drop}
    for row in result["rows"]:
        if row["refused"] is not None:
            continue
        figures: dict[str, Any] = {"flops_reduction": row["flops_reduction"]}
        if row["top1"] is not None:
            dense = result["dense"]["top1"]
            figures["accuracy"] = {"dense_top1": dense, "sparse_top1": row["top1"], "drop": row["drop"]}
        row["failures"] = gate(figures, gates)
    passing = [r for r in result["rows"] if r["refused"] is None and not r["failures"]]
    result["chosen"] = min(passing, key=lambda r: r["gmacs"])[result["by"]] if gates.any() and passing else None
    return result


def _no_speed_gate(gates: Gates) -> None:
    if gates.needs_timing:
        raise ConfigError(
            "a sweep measures FLOPs and top-1, not speed: time the ratio it chooses with `tokenprune report MODEL "
            "--ratio R --min-speedup S`."
        )


class SweepKind(NamedTuple):
    """What a sweep varies, as its option, tables and messages name it."""

    option: str  # the command-line option listing the points
    column: str  # the table's first column
    noun: str  # one point, in sentences ("Lowest-cost budget ...")
    title: str  # the table's title ("Compute-budget sweep ...")
    valid: Callable[[float], bool]  # the range each point must lie in
    hint: str  # that range, for the error


#: What a sweep may vary, by its result's "by".
SWEEPS = {
    "ratio": SweepKind("--ratios", "rho", "ratio", "Keep-ratio", lambda v: 0 < v <= 1,
                       "base keep ratios in (0, 1], e.g. 0.5,0.6,0.7,0.8,0.9"),
    "flops": SweepKind("--flops", "budget", "budget", "Compute-budget", lambda v: 0 < v < 1,
                       "compute budgets in (0, 1), e.g. 0.4,0.5,0.6,0.7"),
}  # fmt: skip


def check_sweep_points(points: Sequence[float], by: str = "ratio") -> list[float]:
    """The points of a sweep (keep ratios, or budgets when `by` is "flops"), in increasing order, once each.

    Raises:
        ConfigError: none, or one out of range ((0, 1] for ratios, (0, 1) for budgets).
    """
    kind = SWEEPS[by]
    if not points or not all(kind.valid(p) for p in points):
        raise ConfigError(f"{kind.option} {list(points)}: give {kind.hint}.")
    return sorted(set(points))


def sweep_failures(result: dict[str, Any]) -> list[str]:
    """When gates were given and no point passed them all: one line per point saying why; else empty."""
    if result["chosen"] is not None or not _gated(result):
        return []
    return [f"{r[result['by']]:g}: {r['refused'] or '; '.join(r['failures'])}" for r in result["rows"]]


#: The table's words for a refused row's `refused_as`.
_REFUSED_AS = {"costlier": "would cost at least the dense model", "out of reach": "out of the chain's reach"}


def sweep_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the sweep's table (rich and Markdown alike)."""
    by = result["by"]
    header = [SWEEPS[by].column, "keep ratios", "GFLOPs", "FLOPs reduction", "top-1 %", "drop (points)", "gates"]
    gated = _gated(result)
    dense = result["dense"]
    rows = [["dense", "-", _number(dense["gmacs"], ".3f"), "-", _number(dense["top1"], ".2f"), "-", "-"]]
    for r in result["rows"]:
        if r["refused"] is not None:
            why = _REFUSED_AS[r["refused_as"]]
            rows.append([f"{r[by]:g}", f"refused: {why}", "", "", "", "", ""])
            continue
        verdict = "-" if not gated else "pass" if not r["failures"] else "fail"
        if r[by] == result["chosen"]:
            verdict = "chosen"
        rows.append(
            [
                f"{r[by]:g}",
                "/".join(f"{k:.3g}" for k in r["keep_ratios"]),
                _number(r["gmacs"], ".3f"),
                f"{r['flops_reduction']:.1%}",
                _number(r["top1"], ".2f"),
                _number(r["drop"], ".2f"),
                verdict,
            ]
        )
    return header, rows


def _gated(result: dict[str, Any]) -> bool:
    return any(v is not None for v in result["gates"].values())


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def sweep_markdown(result: dict[str, Any]) -> str:
    """The sweep as Markdown: the table, then what was evaluated and chosen."""
    header, rows = sweep_rows(result)
    lines = [
        f"{SWEEPS[result['by']].title} sweep of `{result['model']}` (input {'x'.join(map(str, result['input_size']))}, "
        f"{result['scorer']} scorer; no retraining at each point)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    return "\n".join([*lines, "", *sweep_notes(result)]) + "\n"


def sweep_notes(result: dict[str, Any]) -> list[str]:
    """The sentences under the sweep's table."""
    notes = []
    if result["eval"]:
        notes.append(f"Top-1 on {result['eval']['data']} ({result['eval']['images']} images).")
    if result["saved_keep_ratios"] is not None:
        saved = "/".join(f"{r:g}" for r in result["saved_keep_ratios"])
        notes.append(
            f"The model was saved keeping {saved}. Each row is this model moved, not one fine-tuned there, "
            "which can be better (docs/results.md): fine-tune again at the point chosen where it matters."
        )
    if result["by"] == "flops":
        notes.append(
            "Each budget is the chain's compute as a fraction of the dense chain's (the cost model); the keep ratios "
            "the model had moved all together onto it."
        )
    if result["chosen"] is not None:
        notes.append(f"Lowest-cost {SWEEPS[result['by']].noun} passing every gate: {result['chosen']:g}.")
    if result["uncounted_ops"]:
        notes.append(f"GFLOPs are lower bounds: uncounted ops {', '.join(result['uncounted_ops'])}.")
    return notes
