"""GPU checks in one script: dense vs sparse throughput (fp32, bf16 autocast, bf16 + torch.compile) and AMP fine-tuning.

Random weights, 224x224, batch 256, runs interleaved in one process (`tokenprune.measure.compare`). The training step
runs the DeiT-S (bf16) and ConvNeXt-T (fp16 with a gradient scaler) recipes for 24 steps on synthetic data::

    python examples/gpu_check.py speed train          # ~1.5 min on an H100
    python examples/gpu_check.py compiled             # ~3.5 min per model, mostly compilation

Results go to stdout and to ``$OUT/gpu_results.json`` (``OUT`` defaults to the current folder).
"""

from __future__ import annotations

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

MODELS = ("deit_small_patch16_224", "convnext_tiny", "swin_tiny_patch4_window7_224")
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


class Autocast(nn.Module):
    """Runs the wrapped model under bf16 autocast."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", torch.bfloat16):
            return self.model(x)


def _pair(name: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    dense = timm.create_model(name).eval()
    return dense, tokenprune.sparsify(dense, 0.7).eval()


def speed(compiled: bool = False) -> list[dict]:
    rows = []
    for name in MODELS:
        dense, sparse = _pair(name)
        for precision in ("bf16+compile",) if compiled else ("fp32", "bf16"):
            d, s = (dense, sparse) if precision == "fp32" else (Autocast(dense), Autocast(sparse))
            r = compare(d, s, (3, 224, 224), 256, warmup=5, repeats=20, device="cuda", latency=not compiled,
                        compile=compiled)  # fmt: skip
            rows.append({
                "model": name, "precision": precision, "batch": 256,
                "dense_img_s": r["dense"]["images_per_s"], "sparse_img_s": r["sparse"]["images_per_s"],
                "paired_speedup": r["paired_speedup"],
                "dense_b1_ms": r["dense"]["batch1_latency_ms"], "sparse_b1_ms": r["sparse"]["batch1_latency_ms"],
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def train() -> list[dict]:
    common = [
        "model.pretrained=false", "model.checkpoint=null", "data.source=synthetic", "data.num_classes=1000",
        "data.synthetic_size=512", "data.workers=4", "optim.batch_size=64", "optim.global_batch_size=null",
        "optim.accum_steps=1", "optim.epochs=3", "optim.warmup_epochs=0.5", "run.device=cuda", "run.amp=true",
        "run.log_every=4", "run.checkpoint_every=0",
    ]  # fmt: skip
    rows = []
    for recipe, dtype in (("deit_small_imagenet", "bfloat16"), ("convnext_tiny_imagenet", "float16")):
        out = f"/tmp/gpu_check_{dtype}"
        overrides = [*common, f"run.amp_dtype={dtype}", f"run.output_dir={out}"]
        result = finetune(RECIPES / f"{recipe}.yaml", overrides=overrides)
        lines = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
        steps = [line for line in lines if line.get("kind") == "train"]
        rows.append({"recipe": recipe, "amp_dtype": dtype, "metrics": result.metrics})
        rows[-1].update(first_step=steps[0], last_step=steps[-1])
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    print(describe_device("cuda"), "torch", torch.__version__, "timm", timm.__version__, flush=True)
    results: dict = {"device": describe_device("cuda"), "torch": torch.__version__}
    steps = {"speed": speed, "compiled": lambda: speed(compiled=True), "train": train}
    for step in sys.argv[1:] or ["speed", "train"]:
        start = time.time()
        results[step] = steps[step]()
        print(f"[{step}] {time.time() - start:.0f}s", flush=True)
    Path(os.environ.get("OUT", "."), "gpu_results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
