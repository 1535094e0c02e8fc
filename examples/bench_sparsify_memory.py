"""What `tokenprune.sparsify` costs in time and peak memory, next to one plain forward of the same model and batch.

    python examples/bench_sparsify_memory.py --models mobilenetv5_300m convnext_tiny deit_small_patch16_224

Each measurement runs in a fresh process (peak resident memory is per process): "forward" is one no-grad forward of
the example batch (2 images at the model's default input size, random weights), "sparsify" is `tokenprune.sparsify(
model, 0.7)` with its self-check. Printed: seconds and peak resident GB of each, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import timm
import torch


def _measure(name: str, what: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    model = timm.create_model(name, num_classes=10).eval()
    import tokenprune
    from tokenprune.inputs import example_input

    x = example_input(model)
    start = time.perf_counter()
    if what == "forward":
        with torch.no_grad():
            model(x)
    else:
        tokenprune.sparsify(model, 0.7, example_inputs=x)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenetv5_300m", "convnext_tiny", "deit_small_patch16_224"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "WHAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_measure(*args.one, args.threads)))
        return
    print(f"{'model':28} {'forward s':>9} {'GB':>6} {'sparsify s':>10} {'GB':>6} {'GB x forward':>12}")
    for name in args.models:
        rows = {}
        for what in ("forward", "sparsify"):
            cmd = [sys.executable, __file__, "--threads", str(args.threads), "--one", name, what]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows[what] = json.loads(out.strip().splitlines()[-1])
        f, s = rows["forward"], rows["sparsify"]
        print(
            f"{name:28} {f['seconds']:9.1f} {f['peak_gb']:6.2f} {s['seconds']:10.1f} {s['peak_gb']:6.2f} "
            f"{s['peak_gb'] / f['peak_gb']:12.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
