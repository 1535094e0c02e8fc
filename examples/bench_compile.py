"""`torch.compile` and sparsification together: eval throughput of dense vs sparse, eager and compiled, side by side
(issue #14 item 1: compiled sparse vs compiled dense should keep at least the eager speed-up).

Random weights. Each pair is timed in one process with interleaved runs (`tokenprune.measure.speed.compare`); the
speed-up is the median over pairs of dense time / sparse time. Compilation (inductor, the default backend) happens in
the warm-up runs and is not timed (on this CPU both models, dense and sparse, compile in about a minute).

    python examples/bench_compile.py --batch 16 --threads 2           # CPU, DeiT-S and ConvNeXt-T
    python examples/bench_compile.py --device cuda --batch 128

Results (2026-12-02, `--batch 16 --threads 2 --repeats 10`, CPU AMD EPYC, 2 cores, idle machine, two runs):
speed-up of sparse over dense (median of interleaved pairs)
    DeiT-S      eager 1.54x / 1.58x, compiled 1.53x / 1.52x
    ConvNeXt-T  eager 1.15x / 1.16x, compiled 1.19x / 1.20x
"""

from __future__ import annotations

import argparse
import sys

import timm
import torch

import tokenprune
from tokenprune.measure.speed import compare, describe_device

NAMES = {"deit_small_patch16_224": "DeiT-S", "convnext_tiny": "ConvNeXt-T"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(NAMES), help="timm model names")
    parser.add_argument("--ratio", type=float, default=0.7, help="base keep ratio rho")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs (the first one compiles)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("command: python " + " ".join(sys.argv))
    print(
        f"device: {describe_device(args.device)}, threads: {torch.get_num_threads()}, batch {args.batch}, "
        f"rho {args.ratio}, torch {torch.__version__}"
    )
    header = (
        f"{'model':<12}{'img/s dense':>12}{'img/s sparse':>13}{'eager x':>9}"
        f"{'img/s dense c':>14}{'img/s sparse c':>15}{'compiled x':>11}"
    )
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        dense = timm.create_model(name).eval()
        sparse = tokenprune.sparsify(dense, args.ratio, example_inputs=torch.randn(2, 3, 224, 224)).eval()
        runs = {}
        for compiled in (False, True):
            torch._dynamo.reset()
            runs[compiled] = compare(
                dense, sparse, (3, 224, 224), args.batch,
                warmup=args.warmup, repeats=args.repeats, device=args.device, compile=compiled, latency=False,
            )  # fmt: skip
        eager, comp = runs[False], runs[True]
        rows.append(
            f"{NAMES.get(name, name):<12}{eager['dense']['images_per_s']:>12.1f}"
            f"{eager['sparse']['images_per_s']:>13.1f}{eager['paired_speedup']:>8.2f}x"
            f"{comp['dense']['images_per_s']:>14.1f}"
            f"{comp['sparse']['images_per_s']:>15.1f}{comp['paired_speedup']:>10.2f}x"
        )
        print(rows[-1], flush=True)
    print("\n" + header + "\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
