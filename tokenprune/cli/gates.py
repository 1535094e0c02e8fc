"""Compression gates for CI: FLOPs reduction, speed-up and accuracy drop thresholds on a report.

A gate compares one figure of a `tokenprune.measure.build_report` result with a threshold; `check_gates` returns
a one-line description of each failure. Accuracy comes from `evaluate_accuracy` on an ImageFolder or Fashion-MNIST
(`eval_dataset`), for the dense and the sparse model alike, and is stored in the report under ``accuracy``::

    "accuracy": {"data": str, "images": int, "dense_top1": float, "sparse_top1": float, "drop": float}

with top-1 in percent and ``drop = dense_top1 - sparse_top1`` in percentage points.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import ConfigError, DataError

__all__ = [
    "Gates",
    "check_gates",
    "eval_dataset",
    "classifier_dataset",
    "evaluate_accuracy",
    "accuracy_entry",
    "FASHION_MNIST",
]

FASHION_MNIST = "fashion-mnist"


@dataclass
class Gates:
    """Thresholds; ``None`` disables a gate.

    Attributes:
        min_flops_reduction: smallest acceptable ``flops_reduction`` (a fraction: 0.3 = 30% fewer multiply-adds).
        min_speedup: smallest acceptable ``speedup`` (sparse images/s over dense images/s, e.g. 1.2).
        max_accuracy_drop: largest acceptable top-1 drop in percentage points (0.5 = half a point).
    """

    min_flops_reduction: float | None = None
    min_speedup: float | None = None
    max_accuracy_drop: float | None = None

    def __post_init__(self) -> None:
        for name in ("min_flops_reduction", "min_speedup", "max_accuracy_drop"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or math.isnan(value)):
                raise ConfigError(f"{name}={value!r} is not a number.")

    @property
    def needs_timing(self) -> bool:
        return self.min_speedup is not None

    @property
    def needs_accuracy(self) -> bool:
        return self.max_accuracy_drop is not None

    def any(self) -> bool:
        return any(v is not None for v in (self.min_flops_reduction, self.min_speedup, self.max_accuracy_drop))


def check_gates(report: dict[str, Any], gates: Gates) -> list[str]:
    """Check `report` against `gates`.

    Args:
        report: a `build_report` result (with ``accuracy`` when the accuracy gate is set).
        gates: the thresholds.

    Returns:
        One description per failed gate, e.g. ``"FLOPs reduction 31.2% < required 40.0% (short by 8.8 points)"``;
        empty when every gate passes.

    Raises:
        ConfigError: when a gate needs a figure the report lacks (timing skipped, no evaluation data).
    """
    failures = []
    if gates.min_flops_reduction is not None:
        got, want = report["flops_reduction"], gates.min_flops_reduction
        if got < want:
            failures.append(
                f"FLOPs reduction {got:.1%} < required {want:.1%} (short by {100 * (want - got):.1f} points)"
            )
    if gates.min_speedup is not None:
        got, want = report.get("speedup"), gates.min_speedup
        if got is None:
            raise ConfigError("--min-speedup needs timings; drop --flops-only.")
        if got < want:
            doubt = "".join(f"; WARNING: {w}" for w in report.get("warnings") or [])
            failures.append(f"speed-up {got:.3f}x < required {want:.3f}x (short by {want - got:.3f}x){doubt}")
    if gates.max_accuracy_drop is not None:
        acc, allowed = report.get("accuracy"), gates.max_accuracy_drop
        if acc is None:
            raise ConfigError("--max-accuracy-drop needs evaluation data; pass --eval-data.")
        if acc["drop"] > allowed:
            failures.append(
                f"top-1 drop {acc['drop']:.2f} points ({acc['dense_top1']:.2f}% -> {acc['sparse_top1']:.2f}%) > "
                f"allowed {allowed:.2f} (over by {acc['drop'] - allowed:.2f} points)"
            )
    return failures


def _imagefolder(root: Path, input_size: tuple[int, int, int], model: nn.Module) -> Dataset:
    from timm.data import create_transform, resolve_data_config

    from ..train.data import _imagefolder as image_folder  # the one ImageFolder loader, with its errors

    cfg = resolve_data_config({"input_size": tuple(input_size)}, model=model)
    transform = create_transform(
        cfg["input_size"], is_training=False, mean=cfg["mean"], std=cfg["std"],
        interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"],
    )  # fmt: skip
    if input_size[0] == 1:
        from torchvision import transforms

        transform = transforms.Compose([transforms.Grayscale(), transform])
    # reason: a dataset root with train/ and val/ (the fine-tuning layout) is evaluated on val/.
    if (root / "val").is_dir():
        return image_folder(root, "val", transform)
    return image_folder(root.parent, root.name, transform)


def eval_dataset(spec: str | os.PathLike[str], input_size: tuple[int, int, int], model: nn.Module) -> Dataset:
    """The evaluation dataset `spec` names.

    Args:
        spec: ``"fashion-mnist"`` (its test split, from tokenprune's fine-tuning data module) or a folder of
            ``<class>/<image>`` files (its ``val/`` sub-folder when it has one), read with timm's eval transform.
        input_size: (C, H, W) the model takes.
        model: the dense model, for timm's normalisation and crop settings.

    Raises:
        DataError: a missing or malformed dataset.
    """
    if str(spec).lower() in (FASHION_MNIST, "fashion_mnist"):
        from ..train.data import FASHION_MNIST_ROOT, FashionMNIST

        if input_size[0] != 1 or input_size[1] != input_size[2]:
            raise ConfigError(
                f"Fashion-MNIST images are square and single-channel; the model takes {list(input_size)}. "
                "Build it with in_chans=1 and num_classes=10 (e.g. --input-size 1,28,28 -k num_classes=10)."
            )
        return FashionMNIST(FASHION_MNIST_ROOT, "test", int(input_size[1]))
    root = Path(spec)
    if not root.is_dir():
        raise DataError(f"evaluation data {root} is not a folder; pass an ImageFolder root or 'fashion-mnist'.")
    return _imagefolder(root, input_size, model)


def classifier_dataset(spec: str | os.PathLike[str], input_size: tuple[int, int, int], dense: nn.Module) -> Dataset:
    """`eval_dataset`, checked against the classifier `dense`: no more classes than its head predicts."""
    dataset = eval_dataset(spec, input_size, dense)
    classes = getattr(dataset, "classes", None)
    head = getattr(dense, "num_classes", None)
    if classes is not None and isinstance(head, int) and len(classes) > head:
        raise ConfigError(
            f"{spec} has {len(classes)} classes but the model predicts {head}; pass a checkpoint trained on it and "
            f"-k num_classes={len(classes)}."
        )
    return dataset


@torch.inference_mode()
def evaluate_accuracy(
    model: nn.Module, dataset: Dataset, *, batch_size: int = 64, limit: int | None = None, device: str = "cpu"
) -> float:
    """Top-1 accuracy in percent of `model` (eval mode) on the first `limit` images of `dataset`."""
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    if len(dataset) == 0:
        raise DataError("the evaluation dataset is empty.")
    training = model.training
    model.eval().to(device)
    correct = total = 0
    try:
        for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            logits = model(images.to(device))
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                # reason: argmax over the last dim of a feature map or a dense prediction would be silently wrong
                from ..outputs import named_outputs

                found = ", ".join(f"{n} {list(t.shape)}" for n, t in named_outputs(logits, "the model"))
                raise ConfigError(
                    f"top-1 accuracy needs a classifier's logits [B, K]; {type(model).__name__} returns {found}. "
                    "Drop --eval-data/--max-accuracy-drop for feature extractors and dense prediction models."
                )
            correct += int((logits.argmax(-1).cpu() == labels).sum())
            total += len(labels)
    finally:
        model.train(training)
    return 100.0 * correct / total


def accuracy_entry(
    dense: nn.Module,
    sparse: nn.Module,
    spec: str | os.PathLike[str],
    input_size: tuple[int, int, int],
    *,
    batch_size: int = 64,
    limit: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Evaluate both models on the same images; the ``accuracy`` entry of a report (see the module docstring)."""
    dataset = classifier_dataset(spec, input_size, dense)
    kwargs = {"batch_size": batch_size, "limit": limit, "device": device}
    dense_top1 = evaluate_accuracy(dense, dataset, **kwargs)
    sparse_top1 = evaluate_accuracy(sparse, dataset, **kwargs)
    images = len(dataset) if limit is None else min(limit, len(dataset))
    return {
        "data": str(spec),
        "images": images,
        "dense_top1": dense_top1,
        "sparse_top1": sparse_top1,
        "drop": dense_top1 - sparse_top1,
    }
