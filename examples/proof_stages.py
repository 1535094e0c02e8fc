"""The dense stages every proof script trains: the teacher from scratch and the dense control; the figures every
dense-prediction proof reports for its student; top-1 and the keep-ratio table (``rekeep``) for the classification
proofs.

One place for what makes them comparable across proofs: the teacher trains from random weights with no
sparsification; the control fine-tunes the teacher as long as the students, at the backbone's learning rate (a
dense run trains every parameter at ``optim.lr``, while a student's backbone trains at ``optim.lr *
optim.backbone_lr_scale``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import tokenprune
from tokenprune.measure import profile_flops
from tokenprune.measure.ablation import random_decisions
from tokenprune.train import load_recipe, load_trained

#: The base keep ratios the rho = 0.7 student is moved to by stage ``rekeep``.
REKEEP = (0.5, 0.6, 0.7, 0.8, 0.9)


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


def rekeep(out: Path, test, example: torch.Tensor, label: str) -> dict:
    """Stage ``rekeep`` of a classification proof: the rho = 0.7 student of `out` at each rho of REKEEP without
    retraining (`tokenprune.set_keep_ratios`), against the same counts chosen at random and the student fine-tuned at
    that rho (stage ``student_r<rho>``) where it was run; top-1 on the dataset `test`.

    `example` is an input for the FLOP counts, `label` the command named in the table's heading. Writes
    ``<out>/rekeep.json`` and ``<out>/rekeep.md``.
    """
    teacher = load_trained(out / "teacher" / "final.pt").eval()
    student = load_trained(out / "student" / "final.pt").eval()
    dense_gmacs = profile_flops(teacher, example).gmacs
    results: dict = {"test_images": len(test), "teacher_top1": top1(teacher, test), "rows": []}
    for rho in REKEEP:
        tokenprune.set_keep_ratios(student, ratio=rho)
        with random_decisions(student):
            random_top1 = top1(student, test)
        trained = out / ("student" if rho == 0.7 else f"student_r{rho:g}") / "final.pt"
        row = {
            "rho": rho,
            "keep_ratios": tokenprune.config_of(student).keep_ratios,
            "flops_vs_teacher": profile_flops(student, example).gmacs / dense_gmacs,
            "top1": top1(student, test),
            "random_selection_top1": random_top1,
            "trained_at_rho_top1": top1(load_trained(trained).eval(), test) if trained.is_file() else None,
        }
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    (out / "rekeep.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"The rho = 0.7 student of `{label}` at other keep ratios, no retraining (teacher "
        f"{results['teacher_top1']:.2f}, {results['test_images']} test images):",
        "",
        "| rho | keep ratios | x teacher FLOPs | 0.7 student, ratio moved | same counts, random | fine-tuned at rho |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        trained = "-" if r["trained_at_rho_top1"] is None else f"{r['trained_at_rho_top1']:.2f}"
        ratios = "/".join(f"{k:.3g}" for k in r["keep_ratios"])
        lines.append(
            f"| {r['rho']:g} | {ratios} | {r['flops_vs_teacher']:.3f} | {r['top1']:.2f} | "
            f"{r['random_selection_top1']:.2f} | {trained} |"
        )
    (out / "rekeep.md").write_text("\n".join(lines) + "\n")
    return results
