"""Sweep the keep ratio rho of a sparsified DeiT: GFLOPs, reduction, throughput and speed-up, as a Markdown table.

Each sparse model is timed side by side with the dense one in this process, runs interleaved, so machine noise hits
both alike (`tokenprune.measure.compare`). Random weights: FLOPs and speed do not depend on them.

    python examples/sweep_ratio.py                       # DeiT-S, rho 0.5..0.9, batch 32, CPU
    python examples/sweep_ratio.py --device cuda --repeats 20
"""

from __future__ import annotations

import argparse

import timm
import torch

import tokenprune
from tokenprune.measure import compare, describe_device, profile_flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dense = timm.create_model(args.model, pretrained=False).eval()
    input_size = (3, 224, 224)
    x = torch.randn(1, *input_size)
    dense_gmacs = profile_flops(dense, x).gmacs

    rows = [f"| dense | {dense_gmacs:.2f} | — | {{dense_ips}} | 1.00x |"]
    dense_ips = []
    for ratio in args.ratios:
        sparse = tokenprune.sparsify(dense, ratio=ratio)
        flops = profile_flops(sparse, x)
        timing = compare(
            dense,
            sparse,
            input_size,
            args.batch_size,
            warmup=args.warmup,
            repeats=args.repeats,
            device=args.device,
            latency=False,
        )
        dense_ips.append(timing["dense"]["images_per_s"])
        rows.append(
            f"| {ratio:.1f} | {flops.gmacs:.2f} (predictors {flops.predictor_gmacs:.2f}) | "
            f"{1 - flops.gmacs / dense_gmacs:.1%} | {timing['sparse']['images_per_s']:.1f} | "
            f"{timing['paired_speedup']:.2f}x |"
        )
        print(f"rho={ratio:.1f} done", flush=True)

    # the dense row shows the range of its images/s over the interleaved runs: the noise floor of the speed-ups
    rows[0] = rows[0].format(dense_ips=f"{min(dense_ips):.1f}–{max(dense_ips):.1f}")
    print()
    print(f"`{args.model}`, 224x224, random weights; images/s at batch {args.batch_size} (median of {args.repeats}), ")
    print(f"{describe_device(args.device)}, {torch.get_num_threads()} threads, torch {torch.__version__}.")
    print(
        "GFLOPs = multiply-adds per image, predictors included. Speed-up: median over interleaved dense/sparse pairs."
    )
    print()
    print("| rho | GFLOPs | reduction | images/s | speed-up |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
