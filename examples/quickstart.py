"""Sparsify a ViT, then see the tokens kept per stage, the FLOPs and the measured speed-up, dense vs sparse.

    python examples/quickstart.py                                   # DeiT-S, rho = 0.7, batch 32, CPU
    python examples/quickstart.py --model vit_base_patch16_224 --ratio 0.5 --device cuda

Random weights (no download needed): FLOPs and speed do not depend on them. Dense and sparse are timed side by side
in this one process, runs interleaved, so machine noise hits both alike.
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console

from tokenprune.cli import pipeline
from tokenprune.measure import render_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm or torchvision model name")
    parser.add_argument("--ratio", type=float, default=0.7, help="keep ratio rho")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each model (medians reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dense, sparse = pipeline.build(args.model, ratio=args.ratio)  # the steps `tokenprune convert` runs
    report = pipeline.measure(
        args.model,
        dense.to(args.device),
        sparse.to(args.device),
        batch_size=args.batch_size,
        warmup=2,
        repeats=args.repeats,
        device=args.device,
    )
    console = Console()
    console.print(render_table(report))
    share = report["predictor_gmacs"] / report["dense"]["gmacs"]
    console.print(
        f"{args.model} at rho={args.ratio}: {report['flops_reduction']:.1%} fewer multiply-adds "
        f"(predictors cost {share:.1%} of the dense model), throughput x{report['speedup']:.2f} at batch "
        f"{args.batch_size}, batch-1 latency {report['dense']['latency_ms']:.1f} -> "
        f"{report['sparse']['latency_ms']:.1f} ms "
        f"({report['device']}, {report['threads']} threads)."
    )


if __name__ == "__main__":
    main()
