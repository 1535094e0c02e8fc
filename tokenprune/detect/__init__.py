"""Object detection with sparsified backbones: torchvision detectors on timm backbones (`models`), batching
(`batch`), the fine-tuning objective (`loss`) and COCO mAP (`metrics`)."""

from .batch import collate, targets_to
from .models import HEADS, PyramidBackbone, detector

__all__ = ["HEADS", "PyramidBackbone", "detector", "collate", "targets_to"]
