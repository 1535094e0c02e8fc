"""The dense-vs-sparse report behind `tokenprune report`: a JSON-able dict, a rich table and a Markdown table.

Report schema (``schema_version: 1``); every figure is per image, FLOPs are multiply-adds (GMACs, printed as
"GFLOPs" as the DynamicViT paper does)::

    {
      "schema_version": 1,
      "model": str,                      # model name as given
      "input_size": [C, H, W],
      "ratio": float | null,             # base keep ratio rho whose default schedule the stages keep; null when
                                         #   they keep no rho's (learned, per-stage, moved onto a --flops budget:
                                         #   "stages" says what they keep)
      "scorer": str | null,              # how stages rank tokens: "predictor" (learned) or "attention"
      "dense":  {"gmacs": float, "params_m": float, "throughput": float | null, "latency_ms": float | null},
      "sparse": {"gmacs": float, "params_m": float, "throughput": float | null, "latency_ms": float | null},
      "flops_reduction": float,          # 1 - sparse.gmacs / dense.gmacs
      "speedup": float | null,           # sparse.throughput / dense.throughput
      "stages": [                        # one per pruning stage, in order
        {"location": int,                # chain index of the block the stage precedes
         "keep_ratio": float,            # fraction of the initial patch tokens kept
         "tokens": int,                  # tokens entering that block after the stage, prefix tokens included
         "gmacs": float}                 # cost of this stage's predictor (or attention scoring)
      ],
      "predictor_gmacs": float,          # all predictors / scoring together (included in sparse.gmacs)
      "outputs": [str],                  # the model's outputs: ["logits"], a dict's keys, ["output0", ...]
      "split": null | {                  # backbone/head split (docs/design.md §5.5); null: the whole model
        "backbone": str,                 #   is the backbone. The backbone's qualified module name
        "dense":  {"backbone_gmacs": float, "head_gmacs": float},
        "sparse": {"backbone_gmacs": float, "head_gmacs": float},  # predictors count with the backbone
        "backbone_input": [C, H, W] | null,  # the image batch the model makes itself and calls the backbone on
                                         #   (a detector's transform); null: the backbone takes the model's input
        "timed": "model" | "backbone",   # what throughput, latency and speedup are of: the backbone (on
                                         #   backbone_input) for a model that makes its own batch, else the model
        "detector": null | {             # a torchvision detector: what its head was costed at
          "min_size": int, "max_size": int,  # its transform's fixed resize
          "proposal_limit": int | null,  #   the RPN's post-NMS limit per image (null: a one-stage detector)
          "detection_limit": int | null, #   detections returned per image at most
          "dense":  {"proposals": float | null, "detections": float | null},  # per image, in the forward the
          "sparse": {"proposals": float | null, "detections": float | null}   # FLOPs were counted on
        }
      },
      "uncounted_ops": [str],            # ops of either model whose cost is unknown; non-empty = lower bound
      "versions": {"torch": str, "timm": str, "torchvision": str, "tokenprune": str, "python": str},
      "device": str,                     # where timings ran, readable (e.g. "cpu (AMD EPYC ...)")
      "threads": int,                    # torch.get_num_threads() during timing
      "batch_size": int,                 # batch of the throughput figures; latency is always at batch 1
      "other_load": float | null,        # CPU cores other processes kept busy while timing (null: not timed, not
                                         #   Linux, or too short a timing to judge; `speed.compare`)
      "warnings": [str],                 # what makes figures doubtful: a machine too busy for its timings
      "dense_weights": str | null,       # (`tokenprune report`) the file the dense model's weights came from
                                         #   (--dense-checkpoint); null: the sparse model's own, without stages
      "saved_keep_ratios": [float] | null  # (`tokenprune report`) the keep ratios a file or run was saved with,
    }                                    #   when --ratio/--keep-ratios changed them for this report; else null

``scorer``, ``outputs``, ``split``, ``dense_weights``, ``saved_keep_ratios``, ``other_load`` and ``warnings`` were
added without a version change: readers of version 1 that ignore unknown keys are unaffected. Timing fields are null
(``warnings`` empty) when the report is built with ``flops_only=True``. Throughput (images/s at `batch_size`) and
batch-1 latency (median ms) come from `speed.compare`, which interleaves dense and sparse runs in one process. A
detector is timed at its backbone (``split.timed``): the rest runs unchanged, and the time of its post-processing
follows the number of boxes, which random weights make meaningless.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
from collections.abc import Sequence
from typing import Any

import torch
from rich.table import Table
from torch import nn

from .._version import __version__
from ..config import default_keep_ratios
from ..nn.scorer import SCORES_MODULE
from ..outputs import output_names
from .backbone import detector_workload, eval_forward, locate_backbone
from .flops import PREDICTOR_MARK, profile_flops, sparsify_config
from .speed import compare, describe_device

__all__ = ["SCHEMA_VERSION", "build_report", "render_table", "to_markdown", "stage_tokens"]

SCHEMA_VERSION = 1


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        # A source checkout that is not pip-installed: tokenprune's own version is known without the metadata.
        return __version__ if package == "tokenprune" else None


def _versions() -> dict[str, str | None]:
    return {
        "torch": torch.__version__,
        "timm": _version("timm"),
        "torchvision": _version("torchvision"),
        "tokenprune": _version("tokenprune"),
        "python": platform.python_version(),
    }


def _is_stage(module: nn.Module) -> bool:
    try:
        from ..nn.select import TokenSelector
    except ImportError:  # a tree without the rewrite's modules: fall back to what a stage carries
        return hasattr(module, "keep_ratio") and hasattr(module, "predictor")
    return isinstance(module, TokenSelector)


def _selectors(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost inserted stage modules, ordered by their stage number (stage10 after stage9)."""
    named = [(n, m) for n, m in model.named_modules() if PREDICTOR_MARK in n and _is_stage(m)]
    names = {n for n, _ in named}
    outer = [(n, m) for n, m in named if not any(n.startswith(o + ".") for o in names)]

    def order(item: tuple[str, nn.Module]) -> tuple[int, str]:
        stage = getattr(item[1], "stage", None)
        if isinstance(stage, int):
            return stage, item[0]
        digits = re.findall(r"\d+", item[0])
        return (int(digits[-1]) if digits else 0), item[0]

    return sorted(outer, key=order)


def _token_count(output: Any) -> int | None:
    items = output if isinstance(output, (tuple, list)) else (output,)
    for item in items:
        if isinstance(item, torch.Tensor) and item.dim() == 3:
            return int(item.shape[1])
    return None


def stage_tokens(model: nn.Module, inputs: torch.Tensor) -> dict[str, int | None]:
    """Tokens leaving each inserted stage module in one eval forward on `inputs` (prefix tokens included).

    Args:
        model: a sparsified model.
        inputs: one input batch.

    Returns:
        stage module name -> token count of its output (None when the output has no [B, N, C] tensor).
    """
    seen: dict[str, int | None] = {}
    handles = [
        module.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, _token_count(out)))
        for name, module in _selectors(model)
    ]
    eval_forward(model, inputs, handles)
    return seen


def build_report(
    model_name: str,
    dense_model: nn.Module,
    sparse_model: nn.Module,
    input_size: Sequence[int],
    *,
    batch_size: int = 32,
    flops_only: bool = False,
    ratio: float | None = None,
    warmup: int = 3,
    repeats: int = 10,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Measure a dense model and its sparsified version; the result follows the schema in this module's docstring.

    Args:
        model_name: name to print (e.g. "deit_small_patch16_224").
        dense_model: the original model.
        sparse_model: the `tokenprune.sparsify` result (any model works; without inserted stages `stages` is empty).
        input_size: (C, H, W) of one image.
        batch_size: batch of the throughput measurement.
        flops_only: count FLOPs and parameters only; timing fields become null.
        ratio: base keep ratio to report; by default the rho whose schedule the stages keep (None if none does).
        warmup: untimed passes per model before timing.
        repeats: timed passes per model (medians reported).
        device: where timings run; FLOPs are counted on CPU-independent shapes, on the models' current device.

    Returns:
        The report dict (JSON-serialisable).
    """
    input_size = [int(s) for s in input_size]
    first = next(iter(sparse_model.parameters()), None)
    x = torch.randn(1, *input_size, device=first.device if first is not None else "cpu")
    config = sparsify_config(sparse_model)
    chain = list(getattr(config, "chain", None) or [])
    # one rule, found on the original model, names the same submodule in both (the chain keeps its names)
    located = locate_backbone(dense_model, chain, x) if chain else None
    backbone = located.name if located is not None else None
    dense_flops = profile_flops(dense_model, x, backbone=backbone)
    sparse_flops = profile_flops(sparse_model, x, backbone=backbone)
    with torch.inference_mode():
        outputs = output_names(dense_model.eval()(x), model_name)

    if ratio is None and config is not None:
        ratio = _schedule_base(config)
    selectors = _selectors(sparse_model)
    tokens = stage_tokens(sparse_model, x) if selectors else {}
    locations = list(getattr(config, "locations", []) or [])
    keep_ratios = list(getattr(config, "keep_ratios", []) or [])
    stages = []
    for i, (name, module) in enumerate(selectors):
        keep = getattr(module, "keep_ratio", None)
        if keep is None and i < len(keep_ratios):
            keep = keep_ratios[i]
        location = locations[i] if i < len(locations) else None
        gmacs = sparse_flops.module_gmacs(name)
        if getattr(config, "scorer", "predictor") == "attention" and location is not None:
            # the scores are computed in the block before the stage (nn/scorer.py)
            gmacs += sparse_flops.module_gmacs(f"{config.chain[location - 1]}.{SCORES_MODULE}")
        stages.append(
            {
                "location": location,
                "keep_ratio": None if keep is None else float(keep),
                "tokens": tokens.get(name),
                "gmacs": gmacs,
            }
        )

    # a model that makes its own image batch (a detector) is timed at its backbone, on that batch's size
    batch = located.batch if located is not None else None
    backbone_input = None if batch is None else [int(s) for s in batch.shape[1:]]
    timing = None
    if not flops_only:
        timed_dense, timed_sparse, timed_size = dense_model, sparse_model, input_size
        if backbone_input is not None:
            timed_dense, timed_sparse = dense_model.get_submodule(backbone), sparse_model.get_submodule(backbone)
            timed_size = backbone_input
        timing = compare(
            timed_dense, timed_sparse, timed_size, batch_size, warmup=warmup, repeats=repeats, device=device
        )

    def side(key: str, flops: Any) -> dict[str, Any]:
        return {
            "gmacs": flops.gmacs,
            "params_m": flops.params_m,
            "throughput": timing[key]["images_per_s"] if timing else None,
            "latency_ms": timing[key]["batch1_latency_ms"] if timing else None,
        }

    return {
        "schema_version": SCHEMA_VERSION,
        "model": model_name,
        "input_size": input_size,
        "ratio": None if ratio is None else float(ratio),
        "scorer": getattr(config, "scorer", None),
        "dense": side("dense", dense_flops),
        "sparse": side("sparse", sparse_flops),
        "flops_reduction": 1.0 - sparse_flops.gmacs / dense_flops.gmacs if dense_flops.gmacs else 0.0,
        "speedup": timing["speedup"] if timing else None,
        "stages": stages,
        "predictor_gmacs": sparse_flops.predictor_gmacs,
        "outputs": outputs,
        "split": None
        if backbone is None
        else {
            "backbone": backbone,
            "dense": {"backbone_gmacs": dense_flops.trunk_gmacs, "head_gmacs": dense_flops.head_gmacs},
            "sparse": {"backbone_gmacs": sparse_flops.trunk_gmacs, "head_gmacs": sparse_flops.head_gmacs},
            "backbone_input": backbone_input,
            "timed": "model" if backbone_input is None else "backbone",
            "detector": _detector(dense_model, sparse_model, x),
        },
        "uncounted_ops": sorted(set(dense_flops.uncounted_ops) | set(sparse_flops.uncounted_ops)),
        "versions": _versions(),
        "device": describe_device(device),
        "threads": torch.get_num_threads(),
        "batch_size": int(batch_size),
        "other_load": timing["other_load"] if timing else None,
        "warnings": list(timing["warnings"]) if timing else [],
    }


def _detector(dense: nn.Module, sparse: nn.Module, x: torch.Tensor) -> dict[str, Any] | None:
    """The split's ``detector`` entry: the head's workload in the forward the FLOPs were counted on."""
    workloads = {"dense": detector_workload(dense, x), "sparse": detector_workload(sparse, x)}
    if workloads["dense"] is None or workloads["sparse"] is None:
        return None
    entry = {k: v for k, v in workloads["dense"].items() if k not in ("proposals", "detections")}
    for side, workload in workloads.items():
        entry[side] = {"proposals": workload["proposals"], "detections": workload["detections"]}
    return entry


def _schedule_base(config: Any) -> float | None:
    """The base keep ratio rho whose default schedule (§1.1) the stages keep, else None. Both schedules start at rho
    (rho^s and rho - 0.2 s), so the first stage's ratio is the only candidate."""
    keep = list(getattr(config, "keep_ratios", None) or [])
    if not keep:
        return config.ratio
    schedule = default_keep_ratios(keep[0], len(keep), getattr(config, "kind", "token"))
    return keep[0] if all(abs(a - b) < 1e-6 for a, b in zip(keep, schedule, strict=True)) else None


def _title_keep(report: dict[str, Any]) -> str:
    """What the title says the stages keep: "rho=0.70", or their own keep ratios when they follow no rho's
    schedule."""
    if report["ratio"] is not None or not report["stages"]:
        return f"rho={_fmt(report['ratio'], '.2f')}"
    return "keep " + "/".join(_fmt(s["keep_ratio"], ".3g") for s in report["stages"])


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _rows(report: dict[str, Any]) -> list[list[str]]:
    """Shared rows of the rich and Markdown tables: columns as in `_HEADER`."""
    dense, sparse = report["dense"], report["sparse"]
    split = report.get("split")

    def parts(side: str) -> list[list[str]]:
        if not split:
            return []
        figures = split[side]
        return [[f"  backbone ({split['backbone']})", "", "", "", _fmt(figures["backbone_gmacs"], ".3f"), "", ""],
                ["  head", "", "", "", _fmt(figures["head_gmacs"], ".3f"), "", ""]]  # fmt: skip

    rows = [["dense", "—", "1.000", "—", _fmt(dense["gmacs"], ".3f"), _fmt(dense["throughput"], ".1f"),
             _fmt(dense["latency_ms"], ".2f")], *parts("dense")]  # fmt: skip
    for i, stage in enumerate(report["stages"]):
        rows.append(
            [f"stage {i}", _fmt(stage["location"], "d"), _fmt(stage["keep_ratio"], ".3f"),
             _fmt(stage["tokens"], "d"), _fmt(stage["gmacs"], ".3f"), "", ""]
        )  # fmt: skip
    rows.append(["sparse (total)", "", _fmt(report["ratio"], ".3f"), "", _fmt(sparse["gmacs"], ".3f"),
                 _fmt(sparse["throughput"], ".1f"), _fmt(sparse["latency_ms"], ".2f")])  # fmt: skip
    return rows + parts("sparse")


_HEADER = ["", "location", "keep ratio", "tokens", "GFLOPs", "images/s", "latency ms"]


def _summary_line(report: dict[str, Any]) -> str:
    speedup = report["speedup"]
    text = f"FLOPs reduction {report['flops_reduction']:.1%}"
    text += f", speed-up {speedup:.2f}x" if speedup is not None else ", speed-up not measured"
    split = report.get("split")
    if speedup is not None and split and split.get("timed") == "backbone":
        text += f" (of {split['backbone']} alone, at {'x'.join(map(str, split['backbone_input']))})"
    text += f", predictors {report['predictor_gmacs']:.3f} GFLOPs"
    if split:
        d, s = split["dense"], split["sparse"]
        text += (
            f"; backbone {split['backbone']} {d['backbone_gmacs']:.3f} -> {s['backbone_gmacs']:.3f} GFLOPs, head "
            f"{d['head_gmacs']:.3f} -> {s['head_gmacs']:.3f} GFLOPs"
        )
    detector = (split or {}).get("detector")
    if detector:
        text += f"; detector head costed at {detector['min_size']}/{detector['max_size']} px (min/max size)"
        if detector["proposal_limit"] is not None:
            d, s = detector["dense"]["proposals"], detector["sparse"]["proposals"]
            text += f", {_fmt(d, '.0f')} / {_fmt(s, '.0f')} proposals per image dense / sparse"
            text += f" (limit {detector['proposal_limit']})"
        else:
            text += ", one-stage: every location of every level, whatever the number of detections"
    if len(report.get("outputs") or []) > 1:
        text += f"; {len(report['outputs'])} outputs ({', '.join(report['outputs'])})"
    if report["uncounted_ops"]:
        text += f"; UNCOUNTED ops (totals are lower bounds): {', '.join(report['uncounted_ops'])}"
    for warning in report.get("warnings") or []:
        text += f"; WARNING: {warning}"
    return text


def render_table(report: dict[str, Any]) -> Table:
    """A rich table of a `build_report` result: totals, one row per stage, reduction and speed-up in the caption."""
    table = Table(
        title=f"{report['model']} {tuple(report['input_size'])} {_title_keep(report)}"
        + (f", scorer {report['scorer']}" if report.get("scorer") else ""),
        caption=_summary_line(report) + "\nGFLOPs = multiply-adds (GMACs) per image (stage rows: the predictor); "
        f"images/s at batch {report['batch_size']}, latency at batch 1; {report['device']}, "
        f"{report['threads']} threads",
    )
    for i, name in enumerate(_HEADER):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in _rows(report):
        table.add_row(*row)
    return table


def to_markdown(report: dict[str, Any]) -> str:
    """A Markdown rendering of a `build_report` result, for a pull-request comment."""
    v = report["versions"]
    lines = [
        f"**tokenprune report: `{report['model']}`** at {'x'.join(map(str, report['input_size']))}, "
        f"{_title_keep(report).replace('=', ' = ')}" + (f", scorer {report['scorer']}" if report.get("scorer") else ""),
        "",
        "| " + " | ".join(_HEADER) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(_HEADER) - 1)) + "|",
        *("| " + " | ".join(row) + " |" for row in _rows(report)),
        "",
        _summary_line(report) + ".",
        "",
        f"<sub>GFLOPs = multiply-adds (GMACs) per image. images/s at batch {report['batch_size']}, latency at "
        f"batch 1, on {report['device']} with {report['threads']} threads. torch {v['torch']}, timm {v['timm']}, "
        f"torchvision {v['torchvision']}, tokenprune {v['tokenprune']}, python {v['python']}. "
        f"Schema v{report['schema_version']}.</sub>",
    ]
    return "\n".join(lines) + "\n"
