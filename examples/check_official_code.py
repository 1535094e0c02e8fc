"""Compare tokenprune's import of the authors' checkpoints with the authors' own code (docs/design.md §4.1).

Needs a checkout of github.com/raoyongming/DynamicViT, which tokenprune does not ship. For each official model, this
builds it with the authors' classes (`models/dyvit.py`, `models/dyconvnext.py`, `models/dyswin.py`) and arguments as
their `infer.py` builds it, gives it random weights at unit scale (no small layer scale or init hides a misplaced
tensor), writes its state dict with the run's `args` as their `save_model` does, imports the file with
`tokenprune.load_official`, and compares the two models' evaluation logits on the same random images:

    python examples/check_official_code.py --official-repo ~/src/DynamicViT [--models deit-s,convnext-t] [--ratio 0.7]

Prints one row per model; exits 1 when any pair differs by more than --tolerance (relative to the largest logit).
Their `utils.py` imports `torch._six` (gone from PyTorch) and `tensorboardX` for its training loggers; both are
stubbed before it is imported, which leaves the two functions the models use from it (`batch_index_select`,
`batch_index_fill`) as the authors wrote them.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

import tokenprune

#: The authors' `infer.py` constructors, by their --model name: (module, class, keyword arguments, schedule).
OFFICIAL = {
    "deit-256": ("dyvit", "VisionTransformerDiffPruning", {"embed_dim": 256, "num_heads": 4}, "power"),
    "deit-s": ("dyvit", "VisionTransformerDiffPruning", {"embed_dim": 384, "num_heads": 6}, "power"),
    "deit-b": ("dyvit", "VisionTransformerDiffPruning", {"embed_dim": 768, "num_heads": 12}, "power"),
    "convnext-t": ("dyconvnext", "AdaConvNeXt", {"pruning_loc": [1, 2, 3]}, "minus"),
    "convnext-s": ("dyconvnext", "AdaConvNeXt", {"pruning_loc": [3, 6, 9], "depths": [3, 3, 27, 3]}, "minus"),
    "convnext-b": (
        "dyconvnext",
        "AdaConvNeXt",
        {"pruning_loc": [3, 6, 9], "depths": [3, 3, 27, 3], "dims": [128, 256, 512, 1024]},
        "minus",
    ),
    "swin-t": (
        "dyswin",
        "AdaSwinTransformer",
        {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "pruning_loc": [1, 2, 3]},
        "minus",
    ),
    "swin-s": (
        "dyswin",
        "AdaSwinTransformer",
        {"embed_dim": 96, "depths": [2, 2, 18, 2], "num_heads": [3, 6, 12, 24], "pruning_loc": [2, 4, 6]},
        "minus",
    ),
    "swin-b": (
        "dyswin",
        "AdaSwinTransformer",
        {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32], "pruning_loc": [2, 4, 6]},
        "minus",
    ),
}
_DEIT = {"patch_size": 16, "depth": 12, "mlp_ratio": 4, "qkv_bias": True, "pruning_loc": [3, 6, 9]}


def official_model(repo: Path, name: str, rho: float) -> torch.nn.Module:
    """The authors' model `name` at base ratio `rho`, built as their `infer.py` builds it."""
    if str(repo) not in sys.path:
        sys.modules.setdefault("torch._six", types.SimpleNamespace(inf=math.inf))
        sys.modules.setdefault("tensorboardX", types.SimpleNamespace(SummaryWriter=object))
        sys.path.insert(0, str(repo))
    module, cls, kwargs, schedule = OFFICIAL[name]
    built = getattr(__import__(f"models.{module}", fromlist=[cls]), cls)
    if schedule == "power":
        return built(**_DEIT, **kwargs, token_ratio=[rho, rho**2, rho**3])
    extra = {"window_size": 7, "drop_rate": 0.0} if module == "dyswin" else {}
    return built(**kwargs, **extra, sparse_ratio=[rho, rho - 0.2, rho - 0.4])


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Matrices and kernels at unit gain, norm weights and layer scales near 1, biases and embeddings small."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        norm = "Norm" in type(module).__name__  # torch's LayerNorm and the authors' own channels-first one
        for name, p in module.named_parameters(recurse=False):
            if p.dim() == 3:  # class token, position embedding
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            elif (norm and name == "weight") or name.endswith("gamma"):  # norm weights, (fast-path) layer scales
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def check(repo: Path, name: str, rho: float, images: torch.Tensor, folder: Path, seed: int) -> dict:
    theirs = randomize(official_model(repo, name, rho), seed).eval()
    path = folder / f"{name}_{rho}.pth"
    torch.save({"model": theirs.state_dict(), "epoch": 0, "args": argparse.Namespace(model=name, base_rate=rho)}, path)
    start = time.perf_counter()
    _, mine = tokenprune.load_official(path)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        expected, got = theirs(images), mine(images)
    scale = float(expected.abs().max())
    return {
        "model": name,
        "keep": "/".join(f"{r:.3g}" for r in tokenprune.config_of(mine).keep_ratios),
        "max_diff": float((expected - got).abs().max()),
        "scale": scale,
        "top1_agree": float((expected.argmax(-1) == got.argmax(-1)).float().mean()),
        "import_s": seconds,
        "gmacs": tokenprune.profile(mine).gmacs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-repo", type=Path, required=True, help="a checkout of raoyongming/DynamicViT")
    parser.add_argument("--models", default=",".join(OFFICIAL), help="comma-separated official --model names")
    parser.add_argument("--ratio", type=float, default=0.7)
    # reason: not 2: the authors' AdaSwin layer tells its training pair of maps from an eval batch by `len(x) == 2`,
    # so an eval batch of two images crashes there (models/dyswin.py, BasicLayer.forward)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest |difference| / largest |logit|")
    args = parser.parse_args()
    if not (args.official_repo / "models" / "dyvit.py").is_file():
        parser.error(f"{args.official_repo} is not a checkout of raoyongming/DynamicViT (no models/dyvit.py)")
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in OFFICIAL]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(OFFICIAL)}")
    torch.manual_seed(args.seed)
    images = torch.randn(args.images, 3, 224, 224)
    header = f"{'model':<11} {'keep ratios':<16} {'max |diff|':>10} {'max |logit|':>11} {'top-1 agree':>11}"
    print(f"{header} {'import s':>8} {'GMACs':>6}")
    worst = 0.0
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            row = check(args.official_repo, name, args.ratio, images, Path(folder), args.seed)
            worst = max(worst, row["max_diff"] / row["scale"])
            print(
                f"{row['model']:<11} {row['keep']:<16} {row['max_diff']:>10.2e} {row['scale']:>11.2f} "
                f"{row['top1_agree']:>11.2f} {row['import_s']:>8.1f} {row['gmacs']:>6.3f}",
                flush=True,
            )
    ok = worst <= args.tolerance
    print(f"largest difference relative to the largest logit: {worst:.2e} ({'within' if ok else 'above'} "
          f"{args.tolerance:g})")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
