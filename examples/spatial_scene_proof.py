"""Proof on real data for spatial classification: a sparsified small ConvNeXt on Fashion-MNIST objects, on CPU.

The journal extension's main case, a ConvNeXt classifier that keeps its feature map and skips the MLP of later blocks
at the locations a stage drops (docs/design.md §1.2), on data where most locations do not matter: one Fashion-MNIST
item per 112x112 canvas, 28-56 px at a random position, over label-free clutter (``recipes/scene_convnext_cpu.yaml``,
the scene proof's data). The model: a ConvNeXt (dims 32/64/192/256, depths 1/1/9/1, layer scale 1.0) from scratch;
its third stage is 7x7 = 49 locations and 9 blocks. Stages (each resumable: rerunning a stage continues from its
``last.pt``):

1. ``teacher``: the dense model from scratch (``sparsify.enabled=false``).
2. ``student``: sparsified at rho = 0.7 (the spatial schedule 0.7/0.5/0.3 of the third stage's locations before its
   blocks 1, 2, 3) and fine-tuned with the official ConvNeXt objective: CE + 10 ratio loss + 0.5 KL + 0.5 MSE of the
   final normalised map.
3. ``control``: the dense teacher trained as many more epochs at the student's backbone learning rate, so the
   student's extra epochs are not mistaken for the method's gain.
4. ``report``: top-1 on the whole test split (10,000 images) of all of them; the student with *random* locations at
   the same keep counts (the predictors' ablation), with every location on the slow path and with one per stage
   (what the choice can be worth); GMACs (tokenprune.measure, fvcore-based) and the CPU speed-up (dense vs sparse,
   timed interleaved in one process); written to ``<out>/results.json`` and ``<out>/results.md``.
5. ``student_r<rho>`` (e.g. ``student_r0.5``): the student fine-tuned at another base keep ratio (schedule rho,
   rho - 0.2, rho - 0.4).
6. ``rekeep``: the rho = 0.7 student evaluated at rho 0.5-0.9 without retraining (``tokenprune.set_keep_ratios``),
   beside random locations at the same counts and any ``student_r<rho>`` run; ``<out>/rekeep.json`` and ``.md``.

Sizing, measured through the harness at 1 thread on the 2-core machine, batch 64: dense training ~77 images/s, so
~20 min teacher (3 epochs x 30,000), then student and control side by side on the two cores. Run it in the
background::

    nohup python examples/spatial_scene_proof.py --out runs/spatial --stages teacher > runs/spatial.log 2>&1 &
    # then --stages student and --stages control in two processes, then --stages report alone on the idle machine

With the default 3-epoch teacher, far from converged, the official objective's distillation holds the student back
(measured in docs/results.md#spatial-classification-proof): ``--teacher-epochs 8`` (~1 h) gives a teacher it does
not, and ``--set loss.kl=0 --set loss.distill=0`` trains the student with CE and the ratio loss alone.

Other spatial classifiers go through the same stages with ``--set`` (docs/results.md#spatial-classification-proof):
ConvNeXt V2 (``--set model.name=convnextv2_atto``, the same dims and depths), and XCiT, a token model without a class
token in its blocks whose 49 tokens are sparsified as the locations of their 7x7 grid (docs/design.md §2.1)::

    python examples/spatial_scene_proof.py --out runs/spatial_xcit --set model.name=xcit_nano_12_p16_224 \
        --set 'model.kwargs={img_size: 112, in_chans: 1, num_classes: 10}'

Needs ``apt-get install dataset-fashion-mnist`` (or ``--data-root`` pointing at the IDX .gz files).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from proof_stages import rekeep, top1
from segmentation_proof import _common, run_stages  # the same four stages; only the recipe and the report differ

import tokenprune
from tokenprune.measure import compare, profile_flops
from tokenprune.measure.ablation import fixed_keep, random_decisions
from tokenprune.train import build_datasets, build_teacher, load_recipe, load_trained

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "scene_convnext_cpu.yaml"
#: The data-size options: training items, and the per-epoch evaluation's test images (the report uses all of them).
COUNTS = (
    ("train-subset", "data.train_subset", 30000, "train on the first N training items"),
    ("val-subset", "data.val_subset", 2000, "test images evaluated at each epoch's end"),
)


def report(args: argparse.Namespace) -> dict:
    """Re-evaluate the saved models on the whole test split; measure GMACs and the CPU speed-up."""
    out = Path(args.out)
    recipe, test, example = _test_set(args)
    size = example.shape[-1]
    teacher = build_teacher(recipe).eval()
    dense = profile_flops(teacher, example).gmacs
    results: dict = {
        "test_images": len(test),
        "canvas": size,
        "threads": torch.get_num_threads(),
        "model": recipe.model.name,
        "teacher": {"top1": top1(teacher, test), "gmacs": dense, "epochs": _epochs(out / "teacher")},
    }
    if (out / "control" / "final.pt").is_file():
        control = load_trained(out / "control" / "final.pt")
        results["control"] = {"top1": top1(control, test), "gmacs": dense, "epochs": _epochs(out / "control")}
    if (out / "student" / "final.pt").is_file():
        student = load_trained(out / "student" / "final.pt").eval()
        with random_decisions(student):
            random_top1 = top1(student, test)
        with fixed_keep(student, 1.0):
            keep_all = top1(student, test)
        with fixed_keep(student, 0.0):
            keep_one = top1(student, test)
        pruned, labels = predictions(student, test)
        masked, _ = predictions(tokenprune.set_execution(student, "masked"), test)
        tokenprune.set_execution(student, "auto")
        sparse = profile_flops(student, example).gmacs
        speed = None  # --speed-repeats 0 skips the timing
        if args.speed_repeats > 0:
            speed = compare(teacher, student, (1, size, size), batch_size=args.speed_batch, repeats=args.speed_repeats)
        results["student"] = {
            "top1": 100.0 * int((pruned == labels).sum()) / len(labels),  # the pruned predictions' top-1
            "masked_agrees": int((pruned == masked).sum()),  # predictions of masked and pruned execution
            "random_locations_top1": random_top1,
            "keep_all_top1": keep_all,
            "keep_one_top1": keep_one,
            "gmacs": sparse,
            "flops_vs_dense": sparse / dense,
            "keep_ratios": [s.keep_ratio for s in tokenprune.selectors(student)],
            "epochs": _epochs(out / "student"),
            "images_per_s": speed and speed["sparse"]["images_per_s"],
            "dense_images_per_s": speed and speed["dense"]["images_per_s"],
            "speedup": speed and speed["paired_speedup"],
        }
        if "control" in results:
            results["student"]["gap_to_control"] = results["control"]["top1"] - results["student"]["top1"]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(_markdown(results, args))
    return results


def _test_set(args: argparse.Namespace):
    """(recipe with the teacher's checkpoint, every test image, an example input) for the evaluating stages."""
    recipe = load_recipe(RECIPE, [*_common(args), f"model.checkpoint={Path(args.out) / 'teacher' / 'final.pt'}"])
    data = dataclasses.replace(recipe.data, val_subset=None)  # every test image
    test = build_datasets(data, img_size=data.img_size, in_chans=1, seed=recipe.run.seed).val
    return recipe, test, torch.randn(1, 1, data.img_size, data.img_size)


def rekeep_stage(args: argparse.Namespace) -> dict:
    """Stage ``rekeep`` (proof_stages.rekeep) on every test image."""
    _, test, example = _test_set(args)
    return rekeep(Path(args.out), test, example, f"python examples/spatial_scene_proof.py --out {args.out}")


def _epochs(run: Path) -> float:
    """The epochs a stage's run trained, from the recipe it saved."""
    return load_recipe(run / "recipe.yaml").optim.epochs


@torch.no_grad()
def predictions(model: torch.nn.Module, dataset, batch_size: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, label) of every image, in eval mode."""
    model.eval()
    pairs = [(model(x).argmax(-1), y) for x, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size)]
    return torch.cat([p for p, _ in pairs]), torch.cat([y for _, y in pairs])


def _markdown(results: dict, args: argparse.Namespace) -> str:
    t = results["teacher"]
    lines = [
        f"Spatial classification proof (`python examples/spatial_scene_proof.py --out {args.out}`): Fashion-MNIST "
        f"objects, {results['canvas']}x{results['canvas']}, 10 classes, `{results['model']}`, "
        f"{results['test_images']} test images, {results['threads']} CPU thread(s). GMACs per image.",
        "",
        f"| model | top-1 | top-1, random locations | GMACs | x dense FLOPs | images/s (CPU, batch {args.speed_batch}) "
        "| speed-up |",
        "|---|---|---|---|---|---|---|",
        f"| teacher (dense, {t['epochs']:g} epochs) | {t['top1']:.2f} | - | {t['gmacs']:.4f} | 1.00 | - | - |",
    ]
    if "control" in results:
        c = results["control"]
        lines.append(
            f"| control: teacher + {c['epochs']:g} dense epochs | {c['top1']:.2f} | - | {c['gmacs']:.4f} | 1.00 | - "
            "| - |"
        )
    if "student" in results:
        s = results["student"]
        timed = s["speedup"] is not None
        speed = "- | -"
        if timed:
            speed = f"{s['images_per_s']:.0f} (dense {s['dense_images_per_s']:.0f}) | {s['speedup']:.2f}x"
        lines.append(
            f"| student (rho 0.7, {s['epochs']:g} epochs) | {s['top1']:.2f} | {s['random_locations_top1']:.2f} | "
            f"{s['gmacs']:.4f} | {s['flops_vs_dense']:.3f} | {speed} |"
        )
        lines += ["", "Targets:"]
        if "gap_to_control" in s:
            lines.append(f"- top-1 within 1.0 point of the control: gap {s['gap_to_control']:+.2f}")
        lines += [
            f"- FLOPs <= 0.85x dense: {s['flops_vs_dense']:.3f}x",
            f"- masked execution (training's computation, eval decisions) predicts as pruned on {s['masked_agrees']:,} "
            f"of {results['test_images']:,} test images",
            f"- predictors beat random locations: {s['top1']:.2f} vs {s['random_locations_top1']:.2f} "
            f"(every location on the slow path: {s['keep_all_top1']:.2f}; one per stage: {s['keep_one_top1']:.2f})",
        ]
        if timed:
            lines.append(f"- CPU speed-up >= 1.15x: {s['speedup']:.2f}x")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    jobs = {"report": report, "rekeep": rekeep_stage}
    run_stages(__doc__, RECIPE, jobs, "runs/spatial", teacher_epochs=3.0, student_epochs=2.0, counts=COUNTS)
