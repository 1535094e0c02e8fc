"""Proof on real data for segmentation: spatial sparsification of a small ConvNeXt + FPN on Fashion-MNIST scenes, CPU.

The task (``recipes/segmentation_fmnist_cpu.yaml``): 96x96 canvases holding 2-5 Fashion-MNIST items at random
positions (later items on top), 11 classes (0 = background, item class + 1 where the item has ink); 6,000 training
scenes from the training split, 1,000 test scenes from the test split, generated on the fly from fixed seeds. The
model is `tokenprune.models.segmenter`: a ConvNeXt (dims 32/64/192/256, depths 1/1/9/1, features_only) + FPN (32
channels) + 1x1 classifier. Stages (each resumable: rerunning a stage continues from its ``last.pt``):

1. ``teacher``: train the dense model from scratch with the harness (``sparsify.enabled=false``).
2. ``student``: sparsify it at rho = 0.7 (the spatial schedule 0.7/0.5/0.3 of the third stage's 6x6 locations) and
   fine-tune with the spatial objective: per-pixel CE + ratio loss + MSE distillation of the sparsified stage's
   final feature map from the teacher's.
3. ``control``: the dense teacher trained for as many more epochs with the same schedule and backbone learning rate,
   CE only, so the student's extra epochs are not mistaken for the method's gain.
4. ``report``: mIoU and pixel accuracy of all of them on the full test scene set, the student with *random*
   locations at the same keep counts (the predictors' ablation), GMACs of backbone / head / total
   (tokenprune.measure, fvcore-based), and the backbone's CPU speed-up (dense vs sparse, timed interleaved);
   written to ``<out>/results.json`` and ``<out>/results.md``.

Sizing, measured through the harness at 1 thread, batch 32, on the shared 2-core machine with a load average of
about 4 (other jobs running): dense training ~27 images/s, student training (teacher forward included) ~20 images/s,
so about 19 min teacher (5 epochs x 6,000), 10 min student (2 epochs), 8 min control (2 epochs), 2-3 min report
(evaluations at ~100 images/s): about 40 min in order under that load, less on an idle machine.
Run it in the background::

    nohup python examples/segmentation_proof.py --out runs/seg > runs/seg.log 2>&1 &

The plain-ViT route (dropped tokens re-filled, docs/design.md §2.7) runs the same stages with ``--set`` overrides
(the README has the command); the report's bounds — every location kept, one kept per stage — show how much the
choice of locations can be worth on the task.

Needs ``apt-get install dataset-fashion-mnist`` (or ``--data-root`` pointing at the IDX .gz files).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from proof_stages import dense_overrides, student_figures, teacher_overrides

import tokenprune
from tokenprune.measure.ablation import fixed_keep, random_decisions
from tokenprune.train import build_datasets, build_teacher, finetune, load_recipe, load_trained
from tokenprune.train.metrics import confusion_matrix, segmentation_scores

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "segmentation_fmnist_cpu.yaml"


#: The data-size options of a proof's command line: (option, recipe key, default, help).
SCENE_COUNTS = (
    ("scenes", "data.scenes", 6000, "training scenes"),
    ("val-scenes", "data.val_scenes", 1000, "test scenes"),
)


def _common(args: argparse.Namespace) -> list[str]:
    counts = [f"{key}={getattr(args, option.replace('-', '_'))}" for option, key, _, _ in args.counts]
    common = [f"run.threads={args.threads}", *counts]
    if args.data_root:
        common.append(f"data.root={args.data_root}")
    return common + list(args.set or [])


def run_stage(stage: str, args: argparse.Namespace, recipe: Path = RECIPE) -> dict:
    """Train one stage (teacher, student, student_r<rho> or control) of `recipe` under `args.out`; its final
    metrics."""
    out = Path(args.out)
    teacher_ckpt = out / "teacher" / "final.pt"
    if stage == "teacher":
        overrides = teacher_overrides(
            out / "teacher", epochs=args.teacher_epochs, lr=args.teacher_lr, warmup_epochs=0.3
        )
    elif stage == "control":
        control = out / "control"
        overrides = dense_overrides(recipe, _common(args), teacher_ckpt, epochs=args.student_epochs, out_dir=control)
    elif stage == "student" or stage.startswith("student_r"):  # student_r<rho>: fine-tuned at another base ratio
        overrides = [
            f"model.checkpoint={teacher_ckpt}",
            f"optim.epochs={args.student_epochs}",
            f"run.output_dir={out / stage}",
        ]
        if stage != "student":
            overrides.append(f"sparsify.ratio={float(stage.removeprefix('student_r')):g}")
    else:
        raise SystemExit(f"unknown stage {stage!r}; use teacher, student, student_r<rho>, control")
    return finetune(recipe, overrides=_common(args) + overrides).metrics


@torch.no_grad()
def scores(model: torch.nn.Module, dataset, num_classes: int, batch_size: int = 100) -> dict[str, float]:
    """mIoU and pixel accuracy (%) in eval mode over the whole dataset (tokenprune/train/metrics.py)."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    for x, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        confusion += confusion_matrix(model(x).argmax(1), y, num_classes)
    return segmentation_scores(confusion)


def fixed_keep_scores(student: torch.nn.Module, dataset, num_classes: int, keep: float) -> dict[str, float]:
    """The student with every stage keeping the fraction `keep` (at least one location): keep 1.0 runs the slow path
    everywhere, keep 0.0 drops all but one location per stage (spatial models: to the fast path; ViT route: refilled
    with their features when dropped); together they bound what choosing the locations can be worth on this task."""
    with fixed_keep(student, keep):
        return scores(student, dataset, num_classes)


def random_location_scores(student: torch.nn.Module, dataset, num_classes: int) -> dict[str, float]:
    """The ablation: the student's scores when each stage keeps as many locations, chosen at random."""
    with random_decisions(student):
        return scores(student, dataset, num_classes)


class BackboneOnly(torch.nn.Module):
    """The segmenter's backbone alone, for FLOPs and timing: returns each level's mean (negligible work), so the
    graph pass sees an ordinary model whose output is not the chain's map. Same parameter names as the segmenter's
    (``backbone.…``), so a sparse student's weights load into its sparsified copy."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([f.flatten(1).mean(1, keepdim=True) for f in self.backbone(x)], dim=1)


def _sparsify_like(model: torch.nn.Module, config: tokenprune.SparsifyConfig, example: torch.Tensor) -> torch.nn.Module:
    """`model` sparsified as the student was: every field of its configuration."""
    return tokenprune.sparsify(
        model, config.ratio, locations=config.locations, keep_ratios=config.keep_ratios, example_inputs=example,
        scorer=config.scorer, decisions=config.decisions, fast_path=config.fast_path,
    )  # fmt: skip


def sparse_backbone(teacher: torch.nn.Module, student: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    """The student's backbone as its own sparsified module (the student's predictor and fast-path weights)."""
    probe = _sparsify_like(BackboneOnly(teacher.backbone).eval(), tokenprune.config_of(student), example)
    state = student.state_dict()
    wanted = probe.state_dict()
    missing = [k for k in wanted if k not in state or state[k].shape != wanted[k].shape]
    if missing:
        raise RuntimeError(f"the student has no weights for the backbone's {missing[:5]}")
    probe.load_state_dict({k: state[k] for k in wanted})
    return probe.eval()


def report(args: argparse.Namespace) -> dict:
    """Re-evaluate the saved models from scratch; measure FLOPs (backbone, head, total) and backbone CPU speed."""
    from tokenprune.measure import compare, profile_flops

    out = Path(args.out)
    recipe = load_recipe(RECIPE, [*_common(args), f"model.checkpoint={out / 'teacher' / 'final.pt'}"])
    size = recipe.data.img_size
    teacher = build_teacher(recipe).eval()
    data = build_datasets(recipe.data, img_size=size, in_chans=1, seed=recipe.run.seed)
    k = data.num_classes
    example = torch.randn(1, 1, size, size)
    dense_backbone = BackboneOnly(teacher.backbone).eval()
    dense = {"total": profile_flops(teacher, example).gmacs, "backbone": profile_flops(dense_backbone, example).gmacs}
    dense["head"] = dense["total"] - dense["backbone"]
    results: dict = {
        "test_scenes": len(data.val),
        "canvas": size,
        "threads": torch.get_num_threads(),
        "teacher": {**scores(teacher, data.val, k), "gmacs": dense},
    }
    if (out / "control" / "final.pt").is_file():
        control = load_trained(out / "control" / "final.pt")
        epochs = load_recipe(out / "control" / "recipe.yaml").optim.epochs
        results["control"] = {**scores(control, data.val, k), "gmacs": dense, "epochs": epochs}
    path = out / "student" / "final.pt"
    if path.is_file():
        student = load_trained(path)
        backbone = sparse_backbone(teacher, student, example)
        sparse = {"total": profile_flops(student, example).gmacs, "backbone": profile_flops(backbone, example).gmacs}
        sparse["head"] = sparse["total"] - sparse["backbone"]
        speed = compare(
            dense_backbone, backbone, (1, size, size), batch_size=args.speed_batch, repeats=args.speed_repeats
        )
        results["student"] = {
            **scores(student, data.val, k),
            "random_locations": random_location_scores(student, data.val, k),
            "keep_all": fixed_keep_scores(student, data.val, k, 1.0),
            "keep_none": fixed_keep_scores(student, data.val, k, 0.0),
            **student_figures(student, out / "student", dense, sparse, speed),
        }
        if "control" in results:
            results["student"]["miou_gap_to_control"] = results["control"]["miou"] - results["student"]["miou"]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(_markdown(results, args))
    return results


def _markdown(results: dict, args: argparse.Namespace) -> str:
    t = results["teacher"]
    d = t["gmacs"]
    lines = [
        f"Segmentation proof (`python examples/segmentation_proof.py --out {args.out}`): Fashion-MNIST scenes, "
        f"{results['canvas']}x{results['canvas']}, 11 classes, {results['test_scenes']} test scenes, "
        f"{results['threads']} CPU thread(s). GMACs per image; mIoU over classes present in targets or predictions.",
        "",
        "| model | mIoU | pixel acc. | mIoU, random locations | GMACs backbone / head / total | x dense backbone "
        f"FLOPs | backbone img/s (CPU, batch {args.speed_batch}) | backbone speed-up |",
        "|---|---|---|---|---|---|---|---|",
        f"| teacher (dense) | {t['miou']:.2f} | {t['pixel_acc']:.2f} | - | "
        f"{d['backbone']:.4f} / {d['head']:.4f} / {d['total']:.4f} | 1.00 | - | - |",
    ]
    if "control" in results:
        c = results["control"]
        lines.append(
            f"| control: teacher + {c['epochs']:g} dense epochs | {c['miou']:.2f} | {c['pixel_acc']:.2f} | - | "
            f"{d['backbone']:.4f} / {d['head']:.4f} / {d['total']:.4f} | 1.00 | - | - |"
        )
    if "student" in results:
        s, g = results["student"], results["student"]["gmacs"]
        lines.append(
            f"| student (rho 0.7, {s['epochs']:g} epochs) | {s['miou']:.2f} | {s['pixel_acc']:.2f} | "
            f"{s['random_locations']['miou']:.2f} | {g['backbone']:.4f} / {g['head']:.4f} / {g['total']:.4f} | "
            f"{s['backbone_flops_vs_dense']:.3f} | {s['backbone_images_per_s']:.0f} "
            f"(dense {s['dense_backbone_images_per_s']:.0f}) | {s['backbone_speedup']:.2f}x |"
        )
        lines += ["", "Targets:"]
        if "miou_gap_to_control" in s:
            lines.append(f"- mIoU within 1.0 point of the control: gap {s['miou_gap_to_control']:+.2f}")
        lines += [
            f"- backbone FLOPs <= 0.85x dense: {s['backbone_flops_vs_dense']:.3f}x",
            f"- predictors beat random locations: {s['miou']:.2f} vs {s['random_locations']['miou']:.2f} mIoU "
            f"(every location kept: {s['keep_all']['miou']:.2f}; one location kept per stage: "
            f"{s['keep_none']['miou']:.2f})",
            f"- backbone CPU speed-up >= 1.15x: {s['backbone_speedup']:.2f}x",
        ]
    return "\n".join(lines) + "\n"


def run_stages(
    doc: str, recipe: Path, jobs: dict, out: str, teacher_epochs: float, student_epochs: float,
    counts: tuple = SCENE_COUNTS,
) -> None:  # fmt: skip
    """The command line of a proof with stages teacher, student, control, report: parse the options, run the stages
    asked for in order.

    `jobs` maps the proof's own evaluating stages to a function of the options (``{"report": report}``); the
    training stages are `run_stage` on `recipe`; `counts` are the options that size its data (`SCENE_COUNTS`'
    form)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=out, help="where the runs and the results go")
    parser.add_argument("--stages", default="teacher,student,control,report")
    parser.add_argument("--teacher-epochs", type=float, default=teacher_epochs)
    parser.add_argument("--teacher-lr", type=float, default=2e-3)
    parser.add_argument("--student-epochs", type=float, default=student_epochs)
    for option, _, default, text in counts:
        parser.add_argument(f"--{option}", type=int, default=default, help=text)
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared 2-core machine")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--speed-batch", type=int, default=64)
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE",
        help="recipe override for every stage, e.g. the ViT route: --set model.name=vit_tiny_patch16_224 "
        "--set 'model.kwargs={...}' --set loss.kind=token",
    )  # fmt: skip
    parser.add_argument("--speed-repeats", type=int, default=10)
    args = parser.parse_args()
    args.counts = counts
    torch.set_num_threads(args.threads)
    stages = args.stages.split(",")
    for stage in stages:  # every name checked before hours of training go into the first
        if stage not in jobs and not re.fullmatch(r"teacher|student|control|student_r[0-9.]+", stage):
            names = ", ".join(["teacher", "student", "student_r<rho>", "control", *jobs])
            raise SystemExit(f"unknown stage {stage!r}; use {names}")
    for stage in stages:
        start = time.time()
        metrics = jobs[stage](args) if stage in jobs else run_stage(stage, args, recipe)
        print(f"[{stage}] done in {time.time() - start:.0f}s: {json.dumps(metrics)}", flush=True)


if __name__ == "__main__":
    run_stages(__doc__, RECIPE, {"report": report}, "runs/seg", teacher_epochs=5.0, student_epochs=2.0)
