"""Segmentation metrics from a confusion matrix: mean IoU and pixel accuracy (docs/design.md §3.5).

Definitions, over every labelled pixel of the evaluation set (pixels labelled `ignore_index` are left out, whatever
was predicted there):

- pixel accuracy = correct pixels / labelled pixels, in %;
- IoU_c = TP_c / (TP_c + FP_c + FN_c) for each class c that occurs in the targets or in the predictions
  (TP_c + FP_c + FN_c > 0); classes absent from both are left out of the mean instead of counting as 0 or 1;
- mIoU = the mean of those IoU_c, in %.

The confusion matrix is accumulated over the whole set before dividing (as mmsegmentation and torchmetrics do), not
averaged per image.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["confusion_matrix", "segmentation_scores"]


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Counts [K, K] (row: target class, column: predicted class) over the pixels whose target is not ignored.

    Args:
        pred: predicted classes, any shape.
        target: labels of the same shape.
        num_classes: K.
        ignore_index: label of pixels to leave out.
    """
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    index = t * num_classes + p
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(confusion: Tensor) -> dict[str, float]:
    """``{"miou": ..., "pixel_acc": ...}`` in % from a confusion matrix (see the module docstring)."""
    c = confusion.double()
    tp = c.diag()
    union = c.sum(0) + c.sum(1) - tp
    present = union > 0
    miou = float((tp[present] / union[present]).mean()) * 100.0 if bool(present.any()) else 0.0
    total = float(c.sum())
    return {"miou": miou, "pixel_acc": 100.0 * float(tp.sum()) / total if total else 0.0}
