"""Where a student trained on Fashion-MNIST objects keeps its locations: the share of the object's area, and of the
background's, that each stage keeps, beside the share of all locations it keeps (what random locations keep of
either, on average).

    python examples/kept_on_object.py runs/spatial_t8/student/final.pt runs/spatial_t8_ce/student/final.pt

Each file is a student the spatial or token scene proof trained (``<out>/student/final.pt``): its recipe, stored in
it, gives the test images (``data.source: fashion_mnist_objects``, one item on a cluttered canvas at a known box). A
stage's decisions are over the chain's initial locations (``tokenprune.sparsity_state``), a row-major grid over the
input; each location's share of the object is the part of the object's box it covers. The same measure with
random decisions (``tokenprune.measure.ablation.random_decisions``) is printed beside it: it should keep the object
and the background at the stage's keep ratio, which checks the measure. A predictor that finds the object keeps
more of it than of the background.

Needs ``apt-get install dataset-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import torch

import tokenprune
from tokenprune.measure.ablation import random_decisions
from tokenprune.train import Recipe, build_datasets, load_trained
from tokenprune.train.checkpoint import load_checkpoint
from tokenprune.train.objects import FashionMNISTObjects


def object_cover(box: tuple[int, int, int], canvas: int, grid: tuple[int, int]) -> torch.Tensor:
    """[h * w], row-major: the share of the object's box (top, left, side in canvas pixels) that each location's cell
    covers; the cells tile the canvas, so the shares sum to 1."""
    top, left, side = box
    h, w = grid

    def overlap(start: int, cells: int) -> torch.Tensor:
        edges = torch.arange(cells + 1, dtype=torch.float64) * canvas / cells
        return torch.minimum(edges[1:], torch.tensor(start + side)) - torch.maximum(edges[:-1], torch.tensor(start))

    rows, cols = overlap(top, h).clamp(min=0), overlap(left, w).clamp(min=0)
    return (rows[:, None] * cols[None, :]).flatten() / side**2


@torch.no_grad()
def kept_shares(model: torch.nn.Module, test: FashionMNISTObjects, images: int, batch_size: int = 250) -> list[dict]:
    """Per stage, averaged over the first `images` test images: the share of all locations, of the object's area and
    of the background's area that the stage keeps."""
    sums: list[dict[str, float]] = []
    for start in range(0, images, batch_size):
        index = range(start, min(start + batch_size, images))
        model(torch.stack([test[i][0] for i in index]))
        decisions = tokenprune.sparsity_state(model).decisions
        count = decisions[0].shape[1]
        side = math.isqrt(count)
        if side * side != count:
            raise SystemExit(f"the chain has {count} locations, not a square grid; this script reads square grids only")
        boxes = [test.scene(i).box for i in index]
        cover = torch.stack([object_cover(box, test.canvas, (side, side)) for box in boxes])  # [B, N]
        # the background in each cell, as a share of the canvas: the cell's share less the object's part of it
        share = torch.tensor([(box[2] / test.canvas) ** 2 for box in boxes], dtype=torch.float64)[:, None]
        rest = 1.0 / count - cover * share
        for s, kept in enumerate(decisions):
            kept = kept[..., 0].double()  # [B, N], 1 = kept
            if len(sums) <= s:
                sums.append({"all": 0.0, "object": 0.0, "background": 0.0})
            sums[s]["all"] += float(kept.mean(1).sum())
            sums[s]["object"] += float((cover * kept).sum(1).sum())
            sums[s]["background"] += float(((rest * kept).sum(1) / rest.sum(1)).sum())
    return [{k: v / images for k, v in stage.items()} for stage in sums]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("students", nargs="+", type=Path, help="trainer checkpoints (<out>/student/final.pt)")
    parser.add_argument("--images", type=int, default=10000, help="the first N test images")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for path in args.students:
        recipe = Recipe.from_dict(load_checkpoint(path)["recipe"], source=str(path))
        data = dataclasses.replace(recipe.data, val_subset=None)
        if data.source != "fashion_mnist_objects":
            raise SystemExit(f"{path}: trained on {data.source!r}, not fashion_mnist_objects: no object to look for")
        test = build_datasets(data, img_size=data.img_size, in_chans=1, seed=recipe.run.seed).val
        images = min(args.images, len(test))
        model = load_trained(path).eval()
        learned = kept_shares(model, test, images)
        with random_decisions(model):
            random = kept_shares(model, test, images)
        print(f"\n{path} ({recipe.model.name}, {images} test images): share kept per stage")
        print("| stage | of all locations | of the object | of the background | random: object / background |")
        print("|---|---|---|---|---|")
        for s, (mine, chance) in enumerate(zip(learned, random, strict=True), 1):
            print(
                f"| {s} | {mine['all']:.3f} | {mine['object']:.3f} | {mine['background']:.3f} | "
                f"{chance['object']:.3f} / {chance['background']:.3f} |"
            )


if __name__ == "__main__":
    main()
