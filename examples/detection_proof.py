"""Proof on real data for detection: FCOS on a spatially sparsified small ConvNeXt, Fashion-MNIST scenes, CPU.

The task (``recipes/detection_fmnist_cpu.yaml``): 96x96 canvases holding 2-5 Fashion-MNIST items at random positions
(later items on top; an item that keeps less than a quarter of its ink is left out), one box and class per visible
item; 6,000 training scenes from the training split, 1,000 test scenes from the test split, fixed by seed and index.
The model is `tokenprune.create_model("convnext_atto", task_head="fcos", ...)`: a ConvNeXt (dims 32/64/192/256,
depths 1/1/9/1, features_only) + FPN (64 channels, strides 8-128) + torchvision's FCOS head. Stages (each resumable:
rerunning a stage continues from its ``last.pt``):

1. ``teacher``: train the dense detector from scratch with the harness (``sparsify.enabled=false``).
2. ``student``: sparsify it at rho = 0.7 (0.7/0.5/0.3 of the third stage's 6x6 locations; `tokenprune.sparsify`
   rewrites the detector's backbone, the rest of FCOS runs unchanged around it) and fine-tune with the detector's own
   losses (classification, box regression, centerness) + the ratio loss + feature-map distillation from the teacher.
3. ``control``: the dense teacher trained as many more epochs at the student's backbone learning rate, the
   detector's losses only, so the student's extra epochs are not mistaken for the method's gain.
4. ``report``: COCO mAP@[.5:.95] and mAP@.5 (torchmetrics + pycocotools) of all of them on the full test scene set;
   the student with *random* locations at the same keep counts (the predictors' ablation) and with every location
   and one location per stage on the slow path (what the choice can be worth); GMACs of backbone (+ FPN) / head /
   total (tokenprune.measure, fvcore-based; FCOS's head is dense, so its cost does not depend on a proposal count,
   and post-processing — box decoding, NMS — is not counted) and of the timm body alone; the backbone's CPU speed-up
   (dense vs sparse backbone + FPN, timed interleaved in one process); written to ``<out>/results.json`` and
   ``<out>/results.md``.

Run it in the background (the README and docs/results.md show the figures and the machine they came from)::

    nohup python examples/detection_proof.py --out runs/det > runs/det.log 2>&1 &

The plain-ViT route (dropped tokens re-filled for the FPN, docs/design.md §2.7) runs the same stages with ``--set``
overrides (docs/results.md has the command).

Needs ``apt-get install dataset-fashion-mnist`` (or ``--data-root``) and ``pip install 'tokenprune[detection]'``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from proof_stages import student_figures
from segmentation_proof import _common, run_stages  # the same four stages; only the recipe and the report differ

from tokenprune.detect import collate
from tokenprune.detect.metrics import DetectionScores
from tokenprune.measure import compare, profile_flops
from tokenprune.measure.ablation import fixed_keep, random_decisions
from tokenprune.train import build_datasets, build_teacher, load_recipe, load_trained

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "detection_fmnist_cpu.yaml"


@torch.no_grad()
def scores(model: torch.nn.Module, dataset, batch_size: int = 50) -> dict[str, float]:
    """COCO mAP@[.5:.95] and mAP@.5 (%) of `model` in eval mode over the whole dataset."""
    model.eval()
    metric = DetectionScores()
    for images, targets in torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        metric.update(model(list(images)), targets)
    return metric.compute()


def flops(model: torch.nn.Module, example: torch.Tensor) -> dict[str, float]:
    """GMACs per image: the whole detector, its backbone module (timm body + FPN, the predictors with it), the head."""
    report = profile_flops(model, example, backbone="backbone")
    return {"total": report.gmacs, "backbone": report.trunk_gmacs, "head": report.head_gmacs}


def report(args: argparse.Namespace) -> dict:
    """Re-evaluate the saved models from scratch; measure FLOPs (backbone, head, total) and backbone CPU speed."""
    out = Path(args.out)
    recipe = load_recipe(RECIPE, [*_common(args), f"model.checkpoint={out / 'teacher' / 'final.pt'}"])
    size = recipe.data.img_size
    teacher = build_teacher(recipe).eval()
    data = build_datasets(recipe.data, img_size=size, in_chans=1, seed=recipe.run.seed)
    example = torch.randn(1, 1, size, size)
    dense = flops(teacher, example)
    # The FPN is the same in dense and sparse detectors: the timm body alone is the backbone minus the FPN.
    dense["body"] = profile_flops(teacher.backbone.body, example).gmacs
    fpn = dense["backbone"] - dense["body"]
    results: dict = {
        "test_scenes": len(data.val),
        "canvas": size,
        "threads": torch.get_num_threads(),
        "teacher": {**scores(teacher, data.val), "gmacs": dense},
    }
    if (out / "control" / "final.pt").is_file():
        control = load_trained(out / "control" / "final.pt")
        epochs = load_recipe(out / "control" / "recipe.yaml").optim.epochs
        results["control"] = {**scores(control, data.val), "gmacs": dense, "epochs": epochs}
    path = out / "student" / "final.pt"
    if path.is_file():
        student = load_trained(path)
        sparse = flops(student, example)
        sparse["body"] = sparse["backbone"] - fpn
        speed = compare(
            teacher.backbone, student.backbone, (1, size, size), batch_size=args.speed_batch, repeats=args.speed_repeats
        )
        with random_decisions(student, seed=0):
            random = scores(student, data.val)
        with fixed_keep(student, 1.0):
            keep_all = scores(student, data.val)
        with fixed_keep(student, 0.0):
            keep_none = scores(student, data.val)
        results["student"] = {
            **scores(student, data.val),
            "random_locations": random,
            "keep_all": keep_all,
            "keep_none": keep_none,
            **student_figures(student, out / "student", dense, sparse, speed),
            "body_flops_vs_dense": sparse["body"] / dense["body"],
        }
        if "control" in results:
            results["student"]["map_gap_to_control"] = results["control"]["map"] - results["student"]["map"]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(_markdown(results, args))
    return results


def _gmacs(g: dict[str, float]) -> str:
    return f"{g['body']:.4f} / {g['backbone']:.4f} / {g['head']:.4f} / {g['total']:.4f}"


def _markdown(results: dict, args: argparse.Namespace) -> str:
    t = results["teacher"]
    lines = [
        f"Detection proof (`python examples/detection_proof.py --out {args.out}`): FCOS on Fashion-MNIST scenes, "
        f"{results['canvas']}x{results['canvas']}, {results['test_scenes']} test scenes, {results['threads']} CPU "
        "thread(s). GMACs per image: timm body / backbone (body + FPN + predictors) / FCOS head / total.",
        "",
        "| model | mAP@[.5:.95] | mAP@.5 | mAP, random locations | GMACs | x dense backbone FLOPs | backbone img/s "
        f"(CPU, batch {args.speed_batch}) | backbone speed-up |",
        "|---|---|---|---|---|---|---|---|",
        f"| teacher (dense) | {t['map']:.2f} | {t['map_50']:.2f} | - | {_gmacs(t['gmacs'])} | 1.00 | - | - |",
    ]
    if "control" in results:
        c = results["control"]
        lines.append(
            f"| control: teacher + {c['epochs']:g} dense epochs | {c['map']:.2f} | {c['map_50']:.2f} | - | "
            f"{_gmacs(c['gmacs'])} | 1.00 | - | - |"
        )
    if "student" in results:
        s = results["student"]
        lines.append(
            f"| student (rho 0.7, {s['epochs']:g} epochs) | {s['map']:.2f} | {s['map_50']:.2f} | "
            f"{s['random_locations']['map']:.2f} | {_gmacs(s['gmacs'])} | {s['backbone_flops_vs_dense']:.3f} "
            f"(body {s['body_flops_vs_dense']:.3f}) | {s['backbone_images_per_s']:.0f} "
            f"(dense {s['dense_backbone_images_per_s']:.0f}) | {s['backbone_speedup']:.2f}x |"
        )
        lines += ["", "Targets:"]
        if "map_gap_to_control" in s:
            lines.append(f"- mAP within 1.0 point of the control: gap {s['map_gap_to_control']:+.2f}")
        lines += [
            f"- backbone FLOPs <= 0.85x dense: {s['backbone_flops_vs_dense']:.3f}x with the FPN, "
            f"{s['body_flops_vs_dense']:.3f}x the timm body alone",
            f"- predictors beat random locations: {s['map']:.2f} vs {s['random_locations']['map']:.2f} mAP "
            f"(every location kept: {s['keep_all']['map']:.2f}; one location kept per stage: "
            f"{s['keep_none']['map']:.2f})",
            f"- backbone CPU speed-up >= 1.15x: {s['backbone_speedup']:.2f}x",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_stages(__doc__, RECIPE, {"report": report}, "runs/det", teacher_epochs=10.0, student_epochs=3.0)
