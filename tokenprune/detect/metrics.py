"""COCO-style detection scores: mAP@[.5:.95] and mAP@.5, by torchmetrics' `MeanAveragePrecision`.

torchmetrics (with pycocotools, its default backend) is an optional dependency: ``pip install torchmetrics
pycocotools``. Under DDP the metric gathers every rank's detections when it computes.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

__all__ = ["DetectionScores"]


class DetectionScores:
    """Accumulates detections and targets over an evaluation set; `compute` gives ``{"map", "map_50"}`` in %.

    Raises:
        ConfigError: when torchmetrics or pycocotools is not installed (says how to install them).
    """

    def __init__(self) -> None:
        try:
            from torchmetrics.detection import MeanAveragePrecision

            self.metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
        except (ImportError, ModuleNotFoundError) as e:
            raise ConfigError(
                f"detection scores need torchmetrics and pycocotools ({e}); pip install 'tokenprune[detection]'."
            ) from None

    def update(self, detections: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]]) -> None:
        """Add a batch: the detector's eval-mode output and the targets (``boxes`` xyxy, ``labels``)."""
        self.metric.update(
            [
                {k: d[k].detach().float() if k != "labels" else d[k] for k in ("boxes", "scores", "labels")}
                for d in detections
            ],
            [{"boxes": t["boxes"].float(), "labels": t["labels"]} for t in targets],
        )

    def compute(self) -> dict[str, float]:
        """mAP over IoU 0.5:0.95 (COCO's primary score) and at IoU 0.5, in %."""
        result = self.metric.compute()
        return {"map": 100.0 * float(result["map"]), "map_50": 100.0 * float(result["map_50"])}
