"""Masked and pruned execution choose the same tokens in bf16 (issue #20 item 6), checked on DeiT-S and ConvNeXt-T.

For each model (random weights, no download): sparsify it in bf16 (a bf16 model; if tokenprune refuses that, the
reason is printed and the fp32 sparsified model is cast to bf16 instead), then run synthetic images through it in
pruned execution (inference) and in masked execution (training's) and compare every stage's decisions, both with
bf16 weights and with fp32 weights under ``torch.autocast("cpu", dtype=torch.bfloat16)``. Exit status 1 if any
decision differs.

    OMP_NUM_THREADS=1 python examples/precision_check.py            # 64 images, DeiT-S and ConvNeXt-T, CPU
    python examples/precision_check.py --images 16 --models convnext_tiny
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time

import timm
import torch
import torch.nn.functional as F

import tokenprune
from tokenprune import TokenPruneError


def images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """Synthetic images with structure at several scales (smooth blobs plus fine noise), ImageNet-normalised range."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.randn(count, 3, 7, 7, generator=g), size=size, mode="bicubic", align_corners=False)
    medium = F.interpolate(torch.randn(count, 3, 28, 28, generator=g), size=size, mode="bilinear", align_corners=False)
    return coarse + 0.5 * medium + 0.1 * torch.randn(count, 3, size, size, generator=g)


def decisions(model, x: torch.Tensor, execution: str, batch: int, context) -> list[torch.Tensor]:
    """Every stage's [N, H*W or patches] keep decisions over all images, in `execution`."""
    tokenprune.set_execution(model, execution)
    per_stage: list[list[torch.Tensor]] = []
    for chunk in x.split(batch):
        with torch.no_grad(), context():
            model(chunk)
        state = tokenprune.sparsity_state(model)
        for s, d in enumerate(state.decisions):
            if len(per_stage) <= s:
                per_stage.append([])
            per_stage[s].append(d[..., 0].bool())
    return [torch.cat(d) for d in per_stage]


def compare(model, x: torch.Tensor, batch: int, context) -> tuple[int, int, list[int]]:
    pruned = decisions(model, x, "pruned", batch, context)
    masked = decisions(model, x, "masked", batch, context)
    differ = [int((p != m).sum()) for p, m in zip(pruned, masked)]
    return sum(differ), sum(p.numel() for p in pruned), differ


def sparsify_bf16(dense, ratio: float):
    """A bf16 model sparsified; else (with the reason) the fp32 model sparsified and cast."""
    try:
        return tokenprune.sparsify(copy.deepcopy(dense).to(torch.bfloat16), ratio).eval(), "sparsified as a bf16 model"
    except TokenPruneError as e:
        print(f"  sparsify(bf16 model) refused: {e}")
        return tokenprune.sparsify(dense, ratio).eval().to(torch.bfloat16), "sparsified in fp32, then cast to bf16"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "convnext_tiny"])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ratio", type=float, default=0.7)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    failed = False
    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} thread(s), CPU")
    for name in args.models:
        start = time.perf_counter()
        dense = timm.create_model(name, pretrained=False).eval()
        x = images(args.images, dense.pretrained_cfg["input_size"][-1])
        print(f"{name} (random weights), {args.images} synthetic images, ratio {args.ratio}:")
        low, how = sparsify_bf16(dense, args.ratio)
        runs = [
            (f"bf16 weights ({how})", low, x.to(torch.bfloat16), contextlib.nullcontext),
            (
                "fp32 weights under bf16 autocast",
                tokenprune.sparsify(dense, args.ratio).eval(),
                x,
                lambda: torch.autocast("cpu", dtype=torch.bfloat16),
            ),
        ]
        for label, model, inputs, context in runs:
            differ, total, per_stage = compare(model, inputs, args.batch, context)
            failed |= differ > 0
            verdict = "identical" if differ == 0 else "DIFFERENT"
            print(f"  {label}: {verdict}: {differ} of {total} decisions differ (per stage {per_stage})")
        print(f"  ({time.perf_counter() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
