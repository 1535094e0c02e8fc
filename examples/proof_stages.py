"""The dense stages every proof script trains: the teacher from scratch and the dense control; the figures every
dense-prediction proof reports for its student; top-1 for the classification proofs.

One place for what makes them comparable across proofs: the teacher trains from random weights with no
sparsification; the control fine-tunes the teacher as long as the students, at the backbone's learning rate (a
dense run trains every parameter at ``optim.lr``, while a student's backbone trains at ``optim.lr *
optim.backbone_lr_scale``).
"""

from __future__ import annotations

from pathlib import Path

import torch

import tokenprune
from tokenprune.train import load_recipe


def teacher_overrides(out_dir: Path, *, epochs: float, lr: float, warmup_epochs: float) -> list[str]:
    """Recipe overrides that train the dense teacher from scratch into `out_dir`."""
    return [
        "sparsify.enabled=false",
        "model.checkpoint=null",
        f"optim.epochs={epochs}",
        f"optim.lr={lr}",
        f"optim.warmup_epochs={warmup_epochs}",
        f"run.output_dir={out_dir}",
    ]


def dense_overrides(recipe: Path, common: list[str], checkpoint: Path, *, epochs: float, out_dir: Path) -> list[str]:
    """Recipe overrides that fine-tune `checkpoint` densely at the students' backbone learning rate."""
    optim = load_recipe(recipe, common).optim
    return [
        "sparsify.enabled=false",
        f"model.checkpoint={checkpoint}",
        f"optim.lr={optim.lr * optim.backbone_lr_scale:g}",
        f"optim.epochs={epochs}",
        f"run.output_dir={out_dir}",
    ]


def student_figures(student, run: Path, dense: dict[str, float], sparse: dict[str, float], speed: dict) -> dict:
    """The student's entries a dense-prediction proof reports besides its task scores: GMACs against the teacher's
    (`dense`, `sparse`: {"backbone", "total", ...} per image), keep ratios, epochs (from the run's recipe.yaml) and the
    backbones' throughput (`tokenprune.measure.compare`'s result)."""
    return {
        "gmacs": sparse,
        "backbone_flops_vs_dense": sparse["backbone"] / dense["backbone"],
        "flops_vs_dense": sparse["total"] / dense["total"],
        "keep_ratios": [s.keep_ratio for s in tokenprune.selectors(student)],
        "epochs": load_recipe(run / "recipe.yaml").optim.epochs,
        "backbone_images_per_s": speed["sparse"]["images_per_s"],
        "dense_backbone_images_per_s": speed["dense"]["images_per_s"],
        "backbone_speedup": speed["paired_speedup"],
    }


@torch.no_grad()
def top1(model: torch.nn.Module, dataset, batch_size: int = 250) -> float:
    """Top-1 (%) in eval mode over the whole dataset."""
    model.eval()
    correct = total = 0
    for x, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        correct += int((model(x).argmax(-1) == y).sum())
        total += y.numel()
    return 100.0 * correct / total
