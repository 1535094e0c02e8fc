"""Proof on real data: DynamicViT on a small ViT trained from scratch on Fashion-MNIST, on CPU.

Stages (each resumable: rerunning a stage continues from its ``last.pt``):

1. ``teacher``: train a dense ViT (depth 12, 28x28 input, patch 4 -> 49 tokens + class token, 1 channel) with the
   harness (``sparsify.enabled=false``).
2. ``student``: sparsify it at rho = 0.7 (stages before blocks 3, 6, 9) and fine-tune with the DynamicViT objective.
3. ``learned``: the same with learned keep ratios under one compute budget equal to the fixed schedule's estimate.
4. ``control``: the dense teacher trained for as many more epochs, with the same schedule and backbone learning
   rate, cross-entropy only: the students' extra epochs also train the backbone, and this run shows how much of
   their accuracy comes from that rather than from the method.
5. ``attention``: the teacher sparsified with the training-free attention scorer (``scorer="attention"``), its
   backbone fine-tuned with the same budget and objective as the student (there are no predictors to train).
6. ``warm``: the student with a predictor warm start (``sparsify.warm_start_steps``: the predictors first imitate
   the attention scorer, backbone frozen), then fine-tuned for **half** the student's epochs: does it reach the
   student's accuracy in half the steps?
7. ``report``: top-1 of all of them on the full 10,000-image test set, plus the attention scorer with no training at
   all, GMACs (tokenprune.measure, fvcore-based) and CPU throughput, written to ``<out>/results.json`` and
   ``<out>/results.md``.
8. ``student_r<rho>`` (e.g. ``student_r0.5``): the student fine-tuned at another base keep ratio.
9. ``rekeep``: the rho = 0.7 student evaluated at other keep ratios without retraining
   (``tokenprune.set_keep_ratios``), beside random tokens at the same counts and any ``student_r<rho>`` run
   fine-tuned at that ratio; written to ``<out>/rekeep.json`` and ``<out>/rekeep.md``.

Run everything in the background (about 3 hours at 1 thread in order; the teacher takes ~55 min, and the student,
learned and control stages can run as three processes at once, ~55 min on 2 cores, see the README)::

    nohup python examples/fashion_mnist_proof.py --out runs/fmnist > runs/fmnist.log 2>&1 &

Needs ``apt-get install dataset-fashion-mnist`` (or ``--data-root`` pointing at the IDX .gz files).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from proof_stages import dense_overrides, rekeep, teacher_overrides, top1

import tokenprune
from tokenprune.measure.ablation import random_decisions
from tokenprune.measure.cost import ComputeModel
from tokenprune.train import build_datasets, build_teacher, finetune, load_recipe, load_trained

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "fashion_mnist_cpu.yaml"
KEEP = [0.7, 0.7**2, 0.7**3]
LOCATIONS = [3, 6, 9]


def _common(args: argparse.Namespace) -> list[str]:
    common = [f"run.threads={args.threads}", f"model.kwargs.embed_dim={args.width}", f"run.seed={args.seed}"]
    if args.data_root:
        common.append(f"data.root={args.data_root}")
    if args.train_subset:
        common.append(f"data.train_subset={args.train_subset}")
    if args.batch_size:
        common.append(f"optim.batch_size={args.batch_size}")
    return common


def fixed_budget(args: argparse.Namespace) -> float:
    """The compute estimate of the fixed rho = 0.7 schedule, used as the learned run's budget (same FLOPs)."""
    model = ComputeModel.from_formula("token", depth=12, locations=LOCATIONS, dim=args.width, patches=49, prefix=1)
    return round(float(model.ratio(torch.tensor(KEEP))), 4)


def run_stage(stage: str, args: argparse.Namespace) -> dict:
    out = Path(args.out)
    teacher_ckpt = out / "teacher" / "final.pt"
    if stage == "teacher":
        overrides = teacher_overrides(
            out / "teacher", epochs=args.teacher_epochs, lr=args.teacher_lr, warmup_epochs=0.5
        )
    elif stage == "control":
        control = out / "control"
        overrides = dense_overrides(RECIPE, _common(args), teacher_ckpt, epochs=args.student_epochs, out_dir=control)
    else:
        overrides = [
            f"model.checkpoint={teacher_ckpt}",
            f"optim.epochs={args.student_epochs}",
            f"run.output_dir={out / stage}",
        ]
        if stage == "learned":
            overrides += ["learned_ratios.enabled=true", f"learned_ratios.target_flops={fixed_budget(args)}"]
        elif stage == "attention":
            overrides += ["sparsify.scorer=attention"]
        elif stage.startswith("student_r"):
            overrides += [f"sparsify.ratio={float(stage.removeprefix('student_r')):g}"]
        elif stage == "warm":
            overrides[1] = f"optim.epochs={args.student_epochs / 2:g}"
            overrides += [f"sparsify.warm_start_steps={args.warm_steps}", f"sparsify.warm_start_lr={args.warm_lr:g}"]
    result = finetune(RECIPE, overrides=_common(args) + overrides)
    return result.metrics


def random_selection_top1(student: torch.nn.Module, dataset) -> float:
    """The ablation: the student's top-1 when each stage keeps as many tokens, chosen at random."""
    with random_decisions(student):
        return top1(student, dataset)


def _student(teacher: torch.nn.Module, path: Path | None, scorer: str = "predictor") -> torch.nn.Module:
    """The student saved at `path` (tokenprune.train.load_trained), or with `path` None the teacher sparsified at
    rho = 0.7 with `scorer` and no training."""
    if path is not None:
        return load_trained(path)
    example = torch.randn(1, 1, 28, 28)
    return tokenprune.sparsify(
        teacher, 0.7, locations=LOCATIONS, keep_ratios=KEEP, example_inputs=example, scorer=scorer
    ).eval()


def _steps(path: Path) -> int | None:
    """Optimizer steps of a finished run (its metrics' final line), warm-start steps not included."""
    if not path.is_file():
        return None
    finals = [json.loads(line) for line in path.read_text().splitlines() if '"final"' in line]
    return finals[-1]["steps"] if finals else None


def _recipe_and_data(args: argparse.Namespace):
    """(recipe with the teacher's checkpoint, datasets, example input) for the evaluating stages."""
    recipe = load_recipe(RECIPE, [*_common(args), f"model.checkpoint={Path(args.out) / 'teacher' / 'final.pt'}"])
    return recipe, build_datasets(recipe.data, img_size=28, in_chans=1), torch.randn(1, 1, 28, 28)


def _teacher_and_data(args: argparse.Namespace):
    """(teacher, datasets, example input, the teacher's GMACs) for the report."""
    from tokenprune.measure import profile_flops

    recipe, data, example = _recipe_and_data(args)
    teacher = build_teacher(recipe).eval()
    return teacher, data, example, profile_flops(teacher, example).gmacs


def report(args: argparse.Namespace) -> dict:
    """Re-evaluate the saved models from scratch and measure FLOPs and CPU throughput."""
    from tokenprune.measure import compare, profile_flops

    out = Path(args.out)
    teacher, data, example, dense_gmacs = _teacher_and_data(args)
    results: dict = {"test_images": len(data.val), "threads": torch.get_num_threads()}
    results["teacher"] = {"top1": top1(teacher, data.val), "gmacs": dense_gmacs}
    if (out / "control" / "final.pt").is_file():
        control = load_trained(out / "control" / "final.pt")
        epochs = load_recipe(out / "control" / "recipe.yaml").optim.epochs
        results["control"] = {"top1": top1(control, data.val), "gmacs": dense_gmacs, "epochs": epochs}
    for name in ("attention_untrained", "attention", "student", "warm", "learned"):
        path = None if name == "attention_untrained" else out / name / "final.pt"
        if path is not None and not path.is_file():
            continue
        student = _student(teacher, path, scorer="attention")
        flops = profile_flops(student, example)
        speed = compare(teacher, student, (1, 28, 28), batch_size=args.speed_batch, repeats=args.speed_repeats)
        config = tokenprune.config_of(student)
        results[name] = {
            "top1": top1(student, data.val),
            "scorer": config.scorer,
            "steps": _steps(out / name / "metrics.jsonl") if path is not None else 0,
            "random_selection_top1": random_selection_top1(student, data.val) if config.scorer == "predictor" else None,
            # for the untrained row: the same keep counts, random tokens, also untrained (the scorer's control)
            "random_untrained_top1": random_selection_top1(_student(teacher, None, "predictor"), data.val)
            if path is None
            else None,
            "gmacs": flops.gmacs,
            "flops_vs_teacher": flops.gmacs / dense_gmacs,
            "keep_ratios": [s.keep_ratio for s in tokenprune.selectors(student)],
            "images_per_s": speed["sparse"]["images_per_s"],
            "teacher_images_per_s": speed["dense"]["images_per_s"],
            "speedup": speed["paired_speedup"],
        }
        results[name]["top1_gap"] = results["teacher"]["top1"] - results[name]["top1"]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(_markdown(results, args))
    return results


def rekeep_stage(args: argparse.Namespace) -> dict:
    """Stage ``rekeep`` (proof_stages.rekeep) on the whole test set."""
    _, data, example = _recipe_and_data(args)
    return rekeep(Path(args.out), data.val, example, f"python examples/fashion_mnist_proof.py --out {args.out}")


def _markdown(results: dict, args: argparse.Namespace) -> str:
    teacher = results["teacher"]
    lines = [
        f"Fashion-MNIST proof (`python examples/fashion_mnist_proof.py --out {args.out}`), "
        f"ViT depth 12, width {args.width}, 49+1 tokens, {results['test_images']} test images, "
        f"{results['threads']} CPU thread(s).",
        "",
        f"| model | top-1 | top-1, random tokens | GMACs | x teacher FLOPs | keep ratios | "
        f"img/s (CPU, batch {args.speed_batch}) | speed-up |",
        "|---|---|---|---|---|---|---|---|",
        f"| teacher (dense) | {teacher['top1']:.2f} | - | {teacher['gmacs']:.4f} | 1.00 | - | - | - |",
    ]
    if "control" in results:
        lines.append(
            f"| control: teacher + {results['control']['epochs']:g} dense epochs | {results['control']['top1']:.2f} | "
            f"- | {teacher['gmacs']:.4f} | 1.00 | - | - | - |"
        )
    labels = {
        "attention_untrained": "attention scorer, no training",
        "attention": "attention scorer + fine-tuned backbone",
        "student": "learned predictors (student)",
        "warm": "learned predictors, warm start, half the epochs",
        "learned": "learned predictors, learned ratios",
    }
    for name, label in labels.items():
        if name in results:
            r = results[name]
            ratios = ", ".join(f"{k:.3f}" for k in r["keep_ratios"])
            random = next((f"{r[k]:.2f}" for k in ("random_selection_top1", "random_untrained_top1") if r.get(k)), "-")
            lines.append(
                f"| {label} ({r['steps']} steps) | {r['top1']:.2f} | {random} | {r['gmacs']:.4f} | "
                f"{r['flops_vs_teacher']:.3f} | {ratios} | "
                f"{r['images_per_s']:.0f} (teacher {r['teacher_images_per_s']:.0f}) | {r['speedup']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/fmnist", help="where the runs and the results go")
    parser.add_argument("--stages", default="teacher,student,attention,warm,learned,control,report")
    parser.add_argument("--teacher-epochs", type=float, default=6.0)
    parser.add_argument("--teacher-lr", type=float, default=1.5e-3)
    parser.add_argument("--student-epochs", type=float, default=3.0)
    parser.add_argument("--width", type=int, default=96, help="embedding width (3 heads)")
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared 2-core machine")
    parser.add_argument("--train-subset", type=int, default=None, help="train on the first N images only")
    parser.add_argument("--batch-size", type=int, default=None, help="optim.batch_size (default: the recipe's)")
    parser.add_argument(
        "--seed", type=int, default=0,
        help="run.seed of every stage (initialisation, data order, augmentation, Gumbel noise); the test set is fixed",
    )  # fmt: skip
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--speed-batch", type=int, default=128)
    parser.add_argument("--speed-repeats", type=int, default=10)
    parser.add_argument("--warm-steps", type=int, default=300, help="predictor warm-start steps (stage warm)")
    parser.add_argument("--warm-lr", type=float, default=3e-3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stages = args.stages.split(",")
    for stage in stages:  # every name checked before an hour of training goes into the first
        if not re.fullmatch(r"teacher|student|learned|control|attention|warm|report|rekeep|student_r[0-9.]+", stage):
            raise SystemExit(f"unknown stage {stage!r}; use one of those in the module's docstring")
    for stage in stages:
        start = time.time()
        job = {"report": report, "rekeep": rekeep_stage}.get(stage)
        metrics = job(args) if job else run_stage(stage, args)
        print(f"[{stage}] done in {time.time() - start:.0f}s: {json.dumps(metrics)}", flush=True)


if __name__ == "__main__":
    main()
