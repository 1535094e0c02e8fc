"""What a Fashion-MNIST student keeps: test images with the patches each stage dropped shaded, as one PNG.

    python examples/visualize_kept.py                                    # student of the proof, if it was run
    python examples/visualize_kept.py --student runs/fm3/student/final.pt --out docs/img/kept_fashion_mnist.png
    python examples/visualize_kept.py --student runs/scene/student/final.pt --out docs/img/kept_objects.png

The student is the one `examples/fashion_mnist_proof.py` or `examples/scene_proof.py` trains
(``<out>/student/final.pt``: the model and the test images follow the recipe stored in it), or a tokenprune
``.safetensors`` file (shown on Fashion-MNIST). When the file does not exist the script sparsifies a fresh model of the
Fashion-MNIST proof's architecture (random weights) and says so, on stdout and in the picture: its choices show how
the stages work, not what a trained predictor finds important. The first test image of each of the first ``--count``
classes to appear is drawn.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import tokenprune
from tokenprune.train import Recipe, load_recipe, load_trained
from tokenprune.train.checkpoint import load_checkpoint
from tokenprune.train.data import FASHION_MNIST_ROOT, FashionMNIST, build_datasets

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "fashion_mnist_cpu.yaml"
CLASSES = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
MEAN, STD = 0.2860, 0.3530  # what FashionMNIST normalises with


def student(path: Path) -> tuple[torch.nn.Module, Recipe, str]:
    """The trained student at `path` (a trainer checkpoint or a tokenprune file), else an untrained one, and the recipe
    it was trained with (for a tokenprune file or no file: the Fashion-MNIST proof's)."""
    if path.suffix == ".safetensors" and path.is_file():
        return tokenprune.load(path), load_recipe(RECIPE), f"trained student ({path.name})"
    if not path.is_file():
        recipe = load_recipe(RECIPE)
        spec = recipe.model
        dense = tokenprune.create_model(spec.name, **spec.kwargs).eval()
        size = spec.kwargs.get("img_size", 28)
        sparse = tokenprune.sparsify(dense, recipe.sparsify.ratio, example_inputs=torch.zeros(1, 1, size, size))
        what = "UNTRAINED student (random weights): the shading shows the mechanics, not learned choices"
        return sparse.eval(), recipe, what
    recipe = Recipe.from_dict(load_checkpoint(path)["recipe"], source=str(path))
    return load_trained(path), recipe, f"trained student ({path})"


def first_of_each_class(labels: torch.Tensor, count: int) -> list[int]:
    """Indices of the first image of each class, in order of appearance, until `count` classes are seen."""
    seen: dict[int, int] = {}
    for i, label in enumerate(labels.tolist()):
        seen.setdefault(int(label), i)
        if len(seen) == count:
            break
    return list(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path, default=ROOT / "runs" / "fmnist" / "student" / "final.pt")
    parser.add_argument("--data-root", type=Path, default=Path(FASHION_MNIST_ROOT))
    parser.add_argument("--count", type=int, default=4, help="images (one per class)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "kept_fashion_mnist.png")
    args = parser.parse_args()
    torch.manual_seed(0)

    model, recipe, what = student(args.student)
    print(f"model: {what}")
    if recipe.data.source == "fashion_mnist":
        data, mean, std = FashionMNIST(args.data_root, "test"), MEAN, STD
    else:  # e.g. fashion_mnist_objects: its test canvases; each picture's own value range is stretched
        section = dataclasses.replace(recipe.data, root=str(args.data_root), val_subset=None)
        size = recipe.model.kwargs.get("img_size", 28)
        data = build_datasets(section, img_size=size, in_chans=1, seed=recipe.run.seed).val
        mean = std = None
    picks = first_of_each_class(torch.as_tensor(data.labels), args.count)
    images = torch.stack([data[i][0] for i in picks])
    with torch.no_grad():
        predicted = model.eval()(images).argmax(-1).tolist()
    rows = tokenprune.visualize(model, images, mean=mean, std=std)

    label_width, gap, header = 96, 6, 18
    width = label_width + rows[0].width
    canvas = Image.new("RGB", (width, header + len(rows) * (rows[0].height + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 2), what if len(what) < 100 else what.split(":")[0], fill=(160, 0, 0))
    for r, (picture, i, guess) in enumerate(zip(rows, picks, predicted)):
        y = header + r * (picture.height + gap)
        canvas.paste(picture, (label_width, y))
        draw.text((2, y + picture.height // 2 - 12), f"#{i}: {CLASSES[int(data.labels[i])]}", fill=(0, 0, 0))
        draw.text((2, y + picture.height // 2 + 2), f"predicted: {CLASSES[guess]}", fill=(90, 90, 90))
        print(f"test image {i} ({CLASSES[int(data.labels[i])]}), predicted {CLASSES[guess]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out, optimize=True)
    print(f"wrote {args.out} ({canvas.width}x{canvas.height})")


if __name__ == "__main__":
    main()
