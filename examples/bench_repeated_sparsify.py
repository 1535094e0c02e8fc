"""Does `tokenprune.sparsify` get slower the more often a process calls it? (docs/design.md §2.2)

    python examples/bench_repeated_sparsify.py --rounds 100
    python examples/bench_repeated_sparsify.py --models swin_tiny_patch4_window7_224 --rounds 40

One process sparsifies the same models (random weights, small inputs) round after round, as a sweep, a test suite
or a zoo run does, and prints the time of a round at the start and at the end and the size of torch.fx's
process-wide table of wrapped functions, which every trace walks. `--models` takes timm names; Swin's own code has a
`torch.fx.wrap`-ed function (`window_reverse`), which registers every graph that calls it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.fx._symbolic_trace as symbolic_trace

import tokenprune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["convnext_atto", "deit_tiny_patch16_224"])
    parser.add_argument("--side", type=int, default=64, help="input side (ViTs are built for it)")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = []
    for name in args.models:
        try:
            model = timm.create_model(name, img_size=args.side)
        except TypeError:  # CNNs take any size and no img_size
            model = timm.create_model(name)
        models.append(model.eval())
    x = torch.randn(1, 3, args.side, args.side)
    table = getattr(symbolic_trace, "_wrapped_fns_to_patch", {})
    seconds = []
    for r in range(args.rounds):
        start = time.perf_counter()
        for model in models:
            tokenprune.sparsify(model, 0.7, example_inputs=x)
        seconds.append(time.perf_counter() - start)
        if r in (0, 4) or (r + 1) % 25 == 0:
            print(f"round {r + 1:4d}: {seconds[-1]:.3f} s, torch.fx wrap table {len(table)} entries", flush=True)
    head, tail = statistics.median(seconds[1:6]), statistics.median(seconds[-5:])
    names = ", ".join(args.models)
    print(f"{names}: median round {head:.3f} s (rounds 2-6) -> {tail:.3f} s (last 5), {tail / head:.2f}x")


if __name__ == "__main__":
    main()
