"""`torch.compile` and sparsification together: eval throughput of dense vs sparse, eager and compiled, side by side
(issue #14 item 1: compiled sparse vs compiled dense should keep at least the eager speed-up).

Random weights. The four models (dense, sparse, dense compiled, sparse compiled) are timed in one process, runs
interleaved round by round (`tokenprune.measure.speed.time_interleaved`); each speed-up is the median over rounds of
one model's time / the other's, which cancels slow drifts of the machine. Compilation (inductor, the default backend)
happens in the warm-up rounds and is not timed (on this CPU both models compile in about a minute).

    python examples/bench_compile.py --batch 16 --threads 2 --repeats 25       # CPU, DeiT-S and ConvNeXt-T
    python examples/bench_compile.py --device cuda --batch 128

Results (2026-12-02, `--batch 16 --threads 2 --repeats 25`, CPU AMD EPYC, 2 cores, idle machine):
                eager x   compiled x   compile gain dense / sparse
    DeiT-S      1.54x     1.52x        1.043x / 1.034x      (a DeiT-S-only run: 1.55x, 1.53x, 1.066x / 1.073x)
    ConvNeXt-T  1.21x     1.20x        1.205x / 1.194x
With glibc told to keep large blocks (MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184
MALLOC_TOP_PAD_=1073741824 before the command; the README says why): DeiT-S 1.51x / 1.52x (two runs alike),
ConvNeXt-T 1.18x / 1.21x.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys

import timm
import torch

import tokenprune
from tokenprune.measure.speed import describe_device, time_interleaved


def page_faults(model: torch.nn.Module, batch: int, runs: int = 5) -> int:
    """Minor page faults per forward (fresh memory the kernel maps in): what an allocator that returns large blocks
    to the system costs on every call."""
    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        model(x)
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(runs):
            model(x)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) // runs


NAMES = {"deit_small_patch16_224": "DeiT-S", "convnext_tiny": "ConvNeXt-T"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(NAMES), help="timm model names")
    parser.add_argument("--ratio", type=float, default=0.7, help="base keep ratio rho")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=25, help="timed rounds")
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
        f"{'model':<12}{'img/s dense':>12}{'img/s sparse':>13}{'eager x':>9}{'img/s dense c':>14}"
        f"{'img/s sparse c':>15}{'compiled x':>11}{'compile gain dense':>19}{'sparse':>8}"
    )
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        dense = timm.create_model(name).eval()
        sparse = tokenprune.sparsify(dense, args.ratio, example_inputs=torch.randn(2, 3, 224, 224)).eval()
        torch._dynamo.reset()
        t = time_interleaved(
            [dense, sparse, dense, sparse], (3, 224, 224), args.batch,
            warmup=args.warmup, repeats=args.repeats, device=args.device, compile=[False, False, True, True],
        )  # fmt: skip
        rate = [args.batch / statistics.median(runs) for runs in t]
        ratio = [[statistics.median(x / y for x, y in zip(a, b)) for b in t] for a in t]  # [a][b]: time a / time b
        rows.append(
            f"{NAMES.get(name, name):<12}{rate[0]:>12.1f}{rate[1]:>13.1f}{ratio[0][1]:>8.2f}x{rate[2]:>14.1f}"
            f"{rate[3]:>15.1f}{ratio[2][3]:>10.2f}x{ratio[0][2]:>18.3f}x{ratio[1][3]:>7.3f}x"
        )
        print(rows[-1], flush=True)
        if args.device == "cpu":  # the compiled models are in dynamo's cache: no second compilation
            faults = [page_faults(m, args.batch) for m in (dense, sparse, torch.compile(dense), torch.compile(sparse))]
            print("  minor page faults per forward (dense, sparse, dense compiled, sparse compiled):", faults)
    print("\n" + header + "\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
