"""Accuracy vs GMACs on Fashion-MNIST objects (196 tokens): tables and a plot from examples/scene_proof.py's results.

``python examples/scene_proof.py --stages report`` calls `write_curve`; this script redraws from a saved
``<out>/results.json`` without evaluating anything::

    python examples/scene_curve.py --out runs/scene

Writes ``<out>/results.md`` (every model at rho = 0.7) and ``<out>/curve.md`` (top-1 and x teacher FLOPs at each
keep ratio: learned predictors, the training-free attention scorer, random tokens, the static baseline; the dense
teacher and control for reference), and ``<out>/curve.png`` (needs matplotlib, an optional dependency:
``pip install 'tokenprune[examples]'``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: row label of each model, in the order of the tables.
LABELS = {
    "student": "learned predictors",
    "learned": "learned predictors, learned ratios (same FLOPs budget)",
    "warm": "learned predictors, warm start",
    "attention": "attention scorer + fine-tuned backbone",
    "attention_untrained": "attention scorer, no training",
    "random": "random tokens + fine-tuned backbone",
    "random_untrained": "random tokens, no training",
    "static": "static: fewer tokens for every image, fine-tuned",
}
#: what the curve plots: (key, label, marker).
CURVE = (
    ("student", "learned predictors (fine-tuned)", "o-"),
    ("attention_untrained", "attention scorer (no training)", "s--"),
    ("random_untrained", "random tokens (no training)", "x:"),
    ("static", "static, fewer tokens (fine-tuned)", "^-."),
)
#: fine-tuned only at rho = 0.7: single points.
POINTS = (
    ("learned", "learned ratios", "P"),
    ("warm", "warm start", "v"),
    ("attention", "attention scorer (fine-tuned)", "s"),
    ("random", "random tokens (fine-tuned)", "X"),
)
DENSE = (("teacher", "dense teacher", "*"), ("control", "dense control (trained as long)", "D"))


def _header(results: dict, command: str) -> str:
    return (
        f"Fashion-MNIST objects, 112 px canvas, patch 8: 196 patch tokens + class token; ViT depth 12, width "
        f"{results['width']}; top-1 on {results['test_images']} test images, {results['threads']} CPU thread(s). "
        f"GMACs per image (fvcore). Produced by `{command}`."
    )


def results_table(results: dict, command: str) -> str:
    """Every model at rho = 0.7 (the paper's setting), teacher and control first."""
    teacher = results["teacher"]
    lines = [
        _header(results, command),
        "",
        "| model (rho 0.7) | top-1 | top-1, its predictors replaced by random tokens | GMACs | x teacher FLOPs | "
        "keep ratios | steps |",
        "|---|---|---|---|---|---|---|",
        f"| teacher (dense) | {teacher['top1']:.2f} | - | {teacher['gmacs']:.4f} | 1.000 | - | - |",
    ]
    if "control" in results:
        c = results["control"]
        lines.append(
            f"| control: teacher trained as long, dense | {c['top1']:.2f} | - | {c['gmacs']:.4f} | 1.000 | - | - |"
        )
    row = results["curve"].get("0.7", {})
    for key, label in LABELS.items():
        if key not in row:
            continue
        r = row[key]
        if key == "static":
            label += f" ({r['tokens']} tokens)"
        ratios = ", ".join(f"{k:.3f}" for k in r.get("keep_ratios", [])) or "-"
        chance = f"{r['random_tokens_top1']:.2f}" if "random_tokens_top1" in r else "-"
        lines.append(
            f"| {label} | {r['top1']:.2f} | {chance} | {r['gmacs']:.4f} | {r['flops_vs_teacher']:.3f} | {ratios} | "
            f"{r.get('steps') or '-'} |"
        )
    if "speed" in results:
        s = results["speed"]
        lines += [
            "",
            f"CPU throughput, batch {s['batch']}: teacher {s['teacher_images_per_s']:.0f} img/s, learned-predictor "
            f"student {s['student_images_per_s']:.0f} img/s ({s['student_speedup']:.2f}x).",
        ]
    return "\n".join(lines) + "\n"


def curve_table(results: dict, command: str) -> str:
    """Top-1 (x teacher FLOPs) of each method at each keep ratio."""
    rhos = sorted(results["curve"], key=float)
    lines = [
        _header(results, command),
        "",
        "| method | " + " | ".join(f"rho {r}" for r in rhos) + " |",
        "|---|" + "---|" * len(rhos),
    ]
    for key, label, _ in CURVE:
        cells = []
        for rho in rhos:
            r = results["curve"][rho].get(key)
            cells.append(f"{r['top1']:.2f} ({r['flops_vs_teacher']:.2f}x)" if r else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if key == "student":  # the same students with random tokens at their keep counts: what the predictors add
            chance = [results["curve"][rho].get(key, {}).get("random_tokens_top1") for rho in rhos]
            cells = [f"{c:.2f}" if c is not None else "-" for c in chance]
            lines.append("| the same students, their tokens chosen at random | " + " | ".join(cells) + " |")
    dense = [f"{label} {results[key]['top1']:.2f}" for key, label, _ in DENSE if key in results]
    lines += ["", "Dense, 1.00x FLOPs: " + "; ".join(dense) + "."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Top-1 against GMACs per image, one line per method; dense models as points."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            f"matplotlib is not installed, so {path} was not drawn (the tables were written): `pip install "
            "'tokenprune[examples]'`, then `python examples/scene_curve.py --out <out>`."
        ) from None
    rhos = sorted(results["curve"], key=float)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    at = results["curve"].get("0.7", {})
    for key, label, marker in POINTS:  # first, so that a curve's point at the same place stays visible
        if key in at:
            ax.plot([at[key]["gmacs"]], [at[key]["top1"]], marker, markersize=8, label=f"{label}, rho 0.7")
    for key, label, style in CURVE:
        points = [(results["curve"][r][key]["gmacs"], results["curve"][r][key]["top1"]) for r in rhos
                  if key in results["curve"][r]]  # fmt: skip
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label, zorder=3)
    for key, label, marker in DENSE:
        if key in results:
            ax.plot([results[key]["gmacs"]], [results[key]["top1"]], marker, markersize=10, label=label)
    ax.set_xlabel("GMACs per image")
    ax.set_ylabel(f"top-1 (%), {results['test_images']} test images")
    ax.set_title("Fashion-MNIST objects, 196 tokens: keep ratio 0.5-0.9")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_curve(results: dict, out: Path, command: str) -> None:
    """Write results.md and curve.md, then curve.png (a clear message, not a traceback, without matplotlib)."""
    out = Path(out)
    (out / "results.md").write_text(results_table(results, command))
    (out / "curve.md").write_text(curve_table(results, command))
    plot(results, out / "curve.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/scene", help="the proof's output folder (holds results.json)")
    args = parser.parse_args()
    path = Path(args.out) / "results.json"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist; run `python examples/scene_proof.py --out {args.out}` first.")
    write_curve(json.loads(path.read_text()), Path(args.out), f"python examples/scene_curve.py --out {args.out}")


if __name__ == "__main__":
    main()
