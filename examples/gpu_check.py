"""GPU checks in one script (issue #14 item 3): dense vs sparse inference side by side, a profile of where the sparse
model's time goes, and AMP fine-tuning.

Random weights, 224x224, rho 0.7. Every speed figure is a pair of models timed in one process with interleaved runs
(`tokenprune.measure.compare`): the speed-up is the median over >= 20 pairs of dense time / sparse time.

Stages (run the ones named on the command line, in order; default: eager profile):
  eager     fp32 and bf16 (bf16 weights and inputs), batch 256 throughput and batch-1 latency, every model.
  compiled  bf16, `torch.compile` mode "default" at batch 256 and mode "reduce-overhead" (CUDA graphs) at batch 1,
            the first three models (the compiled models take most of the time: ~4 compilations per model).
  profile   `torch.profiler` of one bf16 batch-256 forward (and one batch-1 forward) of each of DeiT-S and
            ConvNeXt-T, dense and sparse: device time per kernel, kernel launches per forward. Tables go to
            ``$OUT/profile_<model>_<dense|sparse>_b<batch>.txt``.
  train     the DeiT-S (bf16) and ConvNeXt-T (fp16 + gradient scaler) recipes, 24 steps on synthetic data: AMP
            fine-tuning runs (finite losses, keep fractions reaching their targets).

    python examples/gpu_check.py eager profile         # not yet run on a GPU: guessed at a few minutes
    python examples/gpu_check.py compiled              # guessed ~8 min, mostly compilation: run it on its own
    python examples/gpu_check.py eager --models deit_small_patch16_224 --repeats 30
    python examples/gpu_check.py eager --device cpu --models deit_tiny_patch16_224 --batch 4 --repeats 2   # smoke

Each result is printed as one JSON line the moment it exists and ``$OUT/gpu_results.json`` (``OUT`` defaults to the
current folder) is rewritten after each, so a run cut short by a time limit keeps what it measured. The fine-tuning
cost of one step (time and peak memory, issue #14 item 2) is `examples/bench_train_step.py --device cuda --amp bf16`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import timm
import torch
from torch import nn

import tokenprune
from tokenprune.measure.speed import compare, describe_device
from tokenprune.train import finetune

MODELS = (
    "deit_small_patch16_224",
    "convnext_tiny",
    "swin_tiny_patch4_window7_224",
    "deit_base_patch16_224",
    "vit_large_patch16_224",
)
PROFILED = ("deit_small_patch16_224", "convnext_tiny")
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Results:
    """Rows per stage, printed as they come and saved after each one."""

    def __init__(self, out: Path, header: dict) -> None:
        self.path = out / "gpu_results.json"
        self.data: dict = dict(header)
        print(json.dumps(header), flush=True)

    def add(self, stage: str, row: dict) -> None:
        self.data.setdefault(stage, []).append(row)
        print(json.dumps({"stage": stage, **row}), flush=True)
        self.path.write_text(json.dumps(self.data, indent=1))


def _pair(name: str, ratio: float, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """The dense model and its sparsified copy (random weights, seed 0), in eval mode, converted to `dtype`."""
    torch.manual_seed(0)
    dense = timm.create_model(name).eval()
    sparse = tokenprune.sparsify(dense, ratio, example_inputs=torch.randn(2, 3, 224, 224)).eval()
    return dense.to(dtype), sparse.to(dtype)


def _row(name: str, precision: str, batch: int, compile: bool | str, result: dict) -> dict:
    dense, sparse = result["dense"], result["sparse"]
    return {
        "model": name, "precision": precision, "batch": batch, "compile": compile,
        "dense_img_s": round(dense["images_per_s"], 1), "sparse_img_s": round(sparse["images_per_s"], 1),
        "dense_ms": round(dense["latency_ms"], 3), "sparse_ms": round(sparse["latency_ms"], 3),
        "paired_speedup": round(result["paired_speedup"], 4),
        "pairs": len(dense["runs_ms"]),
    }  # fmt: skip


def eager(args: argparse.Namespace, results: Results) -> None:
    for name in args.models:
        for precision in args.precisions:
            dense, sparse = _pair(name, args.ratio, DTYPES[precision])
            for batch in (args.batch, 1):
                r = compare(
                    dense, sparse, (3, 224, 224), batch,
                    warmup=args.warmup, repeats=args.repeats, device=args.device, latency=False,
                )  # fmt: skip
                results.add("eager", _row(name, precision, batch, False, r))
            del dense, sparse


def compiled(args: argparse.Namespace, results: Results) -> None:
    for name in args.models[:3]:
        dense, sparse = _pair(name, args.ratio, torch.bfloat16)
        for batch, mode in ((args.batch, "default"), (1, "reduce-overhead")):
            torch._dynamo.reset()
            r = compare(
                dense, sparse, (3, 224, 224), batch,
                warmup=args.warmup, repeats=args.repeats, device=args.device, compile=mode, latency=False,
            )  # fmt: skip
            results.add("compiled", _row(name, "bf16", batch, mode, r))
        del dense, sparse


def _profile_one(model: nn.Module, batch: int, device: str, out: Path, tag: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=next(model.parameters()).dtype)
    model.to(device)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            model(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
    model.to("cpu")
    events = prof.key_averages()
    on_device = device.startswith("cuda")
    sort_by = "self_device_time_total" if on_device else "self_cpu_time_total"
    (out / f"profile_{tag}.txt").write_text(events.table(sort_by=sort_by, row_limit=60))
    if on_device:  # kernels: events that ran on the GPU
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        total_us = sum(e.device_time for e in kernels)
    else:  # on a CPU, the aten ops stand in for kernels
        kernels = [e for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
        total_us = sum(e.cpu_time_total for e in kernels)
    top = sorted(events, key=lambda e: -getattr(e, sort_by))[:8]
    return {
        "launches": len(kernels),
        "device_ms": round(total_us / 1e3, 3),
        "top": [[e.key[:80], round(getattr(e, sort_by) / 1e3, 3)] for e in top],
    }


def profile_stage(args: argparse.Namespace, results: Results) -> None:
    for name in [m for m in args.models if m in PROFILED] or args.models[:1]:
        dense, sparse = _pair(name, args.ratio, torch.bfloat16)
        for batch in (args.batch, 1):
            row = {"model": name, "precision": "bf16", "batch": batch}
            for kind, model in (("dense", dense), ("sparse", sparse)):
                row[kind] = _profile_one(model, batch, args.device, args.out, f"{name}_{kind}_b{batch}")
            results.add("profile", row)


def train(args: argparse.Namespace, results: Results) -> None:
    common = [
        "model.pretrained=false", "model.checkpoint=null", "data.source=synthetic", "data.num_classes=1000",
        "data.synthetic_size=512", "data.workers=4", "optim.batch_size=64", "optim.global_batch_size=null",
        "optim.accum_steps=1", "optim.epochs=3", "optim.warmup_epochs=0.5", f"run.device={args.device}",
        "run.amp=true", "run.log_every=4", "run.checkpoint_every=0",
    ]  # fmt: skip
    for recipe, dtype in (("deit_small_imagenet", "bfloat16"), ("convnext_tiny_imagenet", "float16")):
        out = f"/tmp/gpu_check_{dtype}"
        overrides = [*common, f"run.amp_dtype={dtype}", f"run.output_dir={out}"]
        result = finetune(RECIPES / f"{recipe}.yaml", overrides=overrides)
        lines = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
        steps = [line for line in lines if line.get("kind") == "train"]
        results.add("train", {"recipe": recipe, "amp_dtype": dtype, "metrics": result.metrics,
                              "first_step": steps[0], "last_step": steps[-1]})  # fmt: skip


STAGES = {"eager": eager, "compiled": compiled, "profile": profile_stage, "train": train}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stages", nargs="*", default=["eager", "profile"], choices=list(STAGES))
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="timm model names")
    parser.add_argument("--precisions", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--ratio", type=float, default=0.7, help="base keep ratio rho")
    parser.add_argument("--batch", type=int, default=256, help="throughput batch (latency is always batch 1)")
    parser.add_argument("--repeats", type=int, default=20, help="timed pairs (the issue asks for >= 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs of each model (compilation included)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    args.out = Path(os.environ.get("OUT", "."))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (torch's default; stated in the results)
    results = Results(args.out, {
        "device": describe_device(args.device), "torch": torch.__version__, "timm": timm.__version__,
        "tf32": torch.backends.cuda.matmul.allow_tf32, "command": "python examples/gpu_check.py " +
        " ".join(sys.argv[1:]),
    })  # fmt: skip
    for stage in args.stages:
        start = time.time()
        STAGES[stage](args, results)
        print(f"[{stage}] {time.time() - start:.0f}s", flush=True)
    for row in results.data.get("eager", []) + results.data.get("compiled", []):
        print(f"{row['model']:<32}{row['precision']:>5} b{row['batch']:<4} compile={row['compile']!s:<16}"
              f"{row['dense_ms']:>9.2f} -> {row['sparse_ms']:>8.2f} ms  {row['paired_speedup']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
