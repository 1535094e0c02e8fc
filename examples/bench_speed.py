"""Dense vs sparsified models: FLOPs and eval throughput side by side (docs/design.md §5.2, §7).

Random weights (speed and FLOPs do not depend on them). Each pair is timed in one process with interleaved runs
(`tokenprune.measure.speed.compare`), so the speed-up is not skewed by machine drift.

    python examples/bench_speed.py                        # CPU, batch 32, ConvNeXt-T and Swin-T
    python examples/bench_speed.py --models eva02_small_patch14_224 beit_base_patch16_224 deit_small_patch16_224
    python examples/bench_speed.py --models convnext_tiny --batch 64 --device cuda
"""

from __future__ import annotations

import argparse

import timm
import torch

import tokenprune
from tokenprune.measure.flops import profile_flops
from tokenprune.measure.speed import compare, describe_device

NAMES = {
    "convnext_tiny": "ConvNeXt-T",
    "swin_tiny_patch4_window7_224": "Swin-T",
    "deit_small_patch16_224": "DeiT-S",
    "eva02_small_patch14_224": "EVA-02-S",
    "beit_base_patch16_224": "BEiT-B",
    "cait_xxs24_224": "CaiT-XXS24",
    "vit_base_patch16_siglip_224": "SigLIP-B",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(NAMES)[:2], help="timm model names")
    parser.add_argument("--ratio", type=float, default=0.7, help="base keep ratio rho")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(
        f"device: {describe_device(args.device)}, threads: {torch.get_num_threads()}, batch {args.batch}, "
        f"rho {args.ratio}, torch {torch.__version__}"
    )
    header = f"{'model':<12}{'GMACs dense':>12}{'GMACs sparse':>13}{'img/s dense':>12}{'img/s sparse':>13}{'speed':>10}"
    rows = []
    for name in args.models:
        dense = timm.create_model(name).eval()
        sparse = tokenprune.sparsify(dense, args.ratio).eval()
        size = tokenprune.config_of(sparse).input_size
        x = torch.randn(1, *size)
        flops = profile_flops(dense, x).gmacs, profile_flops(sparse, x).gmacs
        result = compare(
            dense, sparse, size, args.batch,
            warmup=args.warmup, repeats=args.repeats, device=args.device, latency=False,
        )  # fmt: skip
        rows.append(
            f"{NAMES.get(name, name):<12}{flops[0]:>12.2f}{flops[1]:>13.2f}"
            f"{result['dense']['images_per_s']:>12.1f}{result['sparse']['images_per_s']:>13.1f}"
            f"{result['paired_speedup']:>9.2f}x"
        )
        print(rows[-1], flush=True)
        for warning in result["warnings"]:  # a machine too busy for the figures to be the models' own
            rows[-1] += " (busy machine)"
            print(f"WARNING, {name}: {warning}", flush=True)
    print("\n" + header + "\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
