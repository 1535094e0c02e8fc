"""What the self-check costs: `tokenprune.sparsify` with and without it, interleaved in one process.

    python examples/bench_selfcheck.py --threads 1 --rounds 5

The check (docs/design.md §2.6) runs the example batch pruned and masked with layer scales at 1, each rewritten block
against the original, keep-all against the original output and, when the original accepts it, all of it again at a
second input size. "Without" replaces it by a no-op for the timing only. Random weights; the median over rounds.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
import warnings

import timm
import torch

import tokenprune

sparsify_module = importlib.import_module("tokenprune.sparsify")  # the package rebinds `sparsify` to the function

MODELS = ["deit_small_patch16_224", "convnext_tiny"]


def _time(model: torch.nn.Module, check: bool) -> float:
    real = sparsify_module.self_check
    if not check:
        sparsify_module.self_check = lambda *args, **kwargs: None
    try:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenprune.sparsify(model, 0.7)
        return time.perf_counter() - start
    finally:
        sparsify_module.self_check = real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, timm {timm.__version__}, {args.threads} thread(s), {args.rounds} rounds")
    for name in args.models:
        torch.manual_seed(0)
        model = timm.create_model(name).eval()
        _time(model, True)  # warm-up: imports, allocator
        times = {True: [], False: []}
        for _ in range(args.rounds):
            for check in (False, True):
                times[check].append(_time(model, check))
        on, off = statistics.median(times[True]), statistics.median(times[False])
        print(f"{name}: sparsify {off:.2f} s without the check, {on:.2f} s with it ({on / off:.2f}x)")


if __name__ == "__main__":
    main()
