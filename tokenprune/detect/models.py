"""Object detectors on timm backbones: torchvision's FCOS, RetinaNet and Faster R-CNN over a feature pyramid.

`detector(backbone, num_classes, head=...)` (and `tokenprune.create_model(name, task_head="fcos" | "retinanet" |
"fasterrcnn", num_classes=...)`) builds a `torchvision.models.detection` model whose backbone is a timm model created
with ``features_only=True`` followed by torchvision's ``FeaturePyramidNetwork`` (`PyramidBackbone`). The detector's
forward is not traceable (a list of images in, data-dependent post-processing out); `tokenprune.sparsify` rewrites
the traceable submodule inside it that holds the chain and is called on the batched image tensor, here the
`PyramidBackbone`. Spatial sparsification keeps the feature maps whole (and the refill route gives a ViT's heads the
whole token set), so the FPN and the detection heads run unchanged.

Label convention (torchvision's): ``num_classes`` counts the background, label 0, which no box carries; a data set
with K object classes uses ``num_classes=K + 1`` and labels 1..K.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["HEADS", "PyramidBackbone", "detector"]

# Detector heads `detector(..., head=...)` builds, by the torchvision class they instantiate.
HEADS = ("fcos", "retinanet", "fasterrcnn")


class PyramidBackbone(nn.Module):
    """A timm feature extractor followed by an FPN: torchvision's detector backbone contract (``out_channels``;
    ``forward(images [B, C, H, W]) -> OrderedDict`` of maps [B, out_channels, h, w], finest first).

    Args:
        body: a timm model created with ``features_only=True`` (its ``feature_info`` gives channels and strides).
        out_channels: channels of every pyramid level.
        levels: how many of the body's levels, counted from the coarsest, feed the FPN.
        extra: "p6p7" (two more levels at strides x2 and x4, as FCOS and RetinaNet use) or "pool" (one max-pooled
            level, as Faster R-CNN uses).
    """

    def __init__(self, body: nn.Module, out_channels: int, levels: int, extra: str) -> None:
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

        channels = list(body.feature_info.channels())
        if not 1 <= levels <= len(channels):
            raise ConfigError(
                f"levels={levels}: the backbone has {len(channels)} feature levels; use 1..{len(channels)}."
            )
        self.body = body
        self.levels = levels
        # reason: timm's Swin (and other channels-last models) return [B, H, W, C] maps; the FPN takes [B, C, H, W].
        self.channels_last = getattr(body, "output_fmt", "NCHW") == "NHWC"
        blocks = LastLevelP6P7(out_channels, out_channels) if extra == "p6p7" else None
        self.fpn = FeaturePyramidNetwork(channels[-levels:], out_channels, extra_blocks=blocks)
        # reason: torchvision's LastLevelMaxPool takes and returns lists; without parameters it stays one opaque call
        # in tokenprune's trace (fx/tracing.py::training_dependent), whose result cannot be unpacked. Same op here.
        self.pool = extra == "pool"
        self.out_channels = out_channels
        reductions = [int(r) for r in body.feature_info.reduction()][-levels:]
        extras = [reductions[-1] * 2, reductions[-1] * 4] if extra == "p6p7" else [reductions[-1] * 2]
        self.strides = reductions + extras  # one per output level, for the anchor sizes

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.body(x)[-self.levels :]
        if self.channels_last:
            features = [f.permute(0, 3, 1, 2) for f in features]
        pyramid = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))
        if self.pool:
            pyramid["pool"] = F.max_pool2d(pyramid[str(len(features) - 1)], 1, 2, 0)
        return pyramid


def _anchors(strides: list[int], head: str):
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    # Sizes relative to each level's stride, as torchvision's own detectors have them: FCOS one point of the
    # stride's size, RetinaNet 4x the stride at three octave scales, Faster R-CNN 8x the stride.
    if head == "fcos":
        return AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
    if head == "retinanet":
        sizes = tuple(tuple(4 * s * 2 ** (i / 3) for i in range(3)) for s in strides)
        return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(strides))
    return AnchorGenerator(tuple((8 * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides))


def detector(
    backbone: str,
    num_classes: int,
    *,
    head: str = "fcos",
    fpn_channels: int = 64,
    levels: int | None = None,
    min_size: int = 224,
    max_size: int | None = None,
    score_thresh: float | None = None,
    nms_thresh: float | None = None,
    detections_per_img: int | None = None,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a torchvision detector on a timm backbone created with ``features_only=True`` and an FPN.

    Args:
        backbone: a timm model name with feature-pyramid support (ConvNeXt, Swin, a ViT), e.g. ``convnext_atto``.
        num_classes: classes including the background (label 0): K object classes need K + 1.
        head: "fcos", "retinanet" or "fasterrcnn".
        fpn_channels: channels of every FPN level. FCOS's head normalises with GroupNorm(32): a multiple of 32, and
            at least 64 when the top level is 1x1 (small images), or a batch of one cannot be normalised there.
        levels: backbone levels feeding the FPN, counted from the coarsest; default 3 (FCOS, RetinaNet: strides 8 to
            32 of a four-stage backbone, plus P6 and P7) or all (Faster R-CNN, plus a pooled level).
        min_size, max_size: the detector's transform resizes each image so its short side is `min_size` unless its
            long side would pass `max_size` (default `min_size`); fix them for measurements.
        score_thresh, nms_thresh, detections_per_img: post-processing; default: torchvision's for the head.
        pretrained: the backbone's pretrained weights (the FPN and heads always start random).
        **kwargs: backbone keywords, e.g. ``in_chans=1, dims=[32, 64, 128, 256], depths=[1, 1, 6, 1]``.

    Returns:
        A ``torchvision.models.detection`` FCOS, RetinaNet or FasterRCNN. Its transform normalises with mean 0 and
        std 1 (the data pipeline normalises).

    Raises:
        ConfigError: unknown head or backbone, or keywords they reject.
    """
    import timm
    from torchvision.models import detection

    if head not in HEADS:
        raise ConfigError(f"detector head {head!r} is unknown; choose one of {', '.join(HEADS)}.")
    try:
        body = timm.create_model(backbone, pretrained=pretrained, features_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - constructors raise many types
        error = f"{type(e).__name__}: {e}"
        raise ConfigError(f"cannot create timm backbone {backbone!r} (features_only=True, {kwargs}): {error}") from None
    if head == "fcos" and fpn_channels % 32:
        raise ConfigError(f"fpn_channels={fpn_channels}: FCOS's head uses GroupNorm(32); use a multiple of 32.")
    depth = len(body.feature_info.channels())
    levels = levels if levels is not None else (min(3, depth) if head != "fasterrcnn" else depth)
    pyramid = PyramidBackbone(body, fpn_channels, levels, "pool" if head == "fasterrcnn" else "p6p7")
    chans = _in_channels(body)
    common = dict(min_size=min_size, max_size=max_size or min_size, image_mean=[0.0] * chans, image_std=[1.0] * chans)
    post = {"score_thresh": score_thresh, "nms_thresh": nms_thresh, "detections_per_img": detections_per_img}
    anchors = _anchors(pyramid.strides, head)
    try:
        if head == "fcos":
            return detection.FCOS(pyramid, num_classes, anchor_generator=anchors, **common, **_given(post))
        if head == "retinanet":
            return detection.RetinaNet(pyramid, num_classes, anchor_generator=anchors, **common, **_given(post))
        from torchvision.ops import MultiScaleRoIAlign

        pooled = [str(i) for i in range(levels)]  # the pyramid's own levels, not the max-pooled extra one
        box_post = {f"box_{k}": v for k, v in _given(post).items()}
        return detection.FasterRCNN(
            pyramid,
            num_classes,
            rpn_anchor_generator=anchors,
            box_roi_pool=MultiScaleRoIAlign(pooled, output_size=7, sampling_ratio=2),
            **common,
            **box_post,
        )
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - torchvision's constructors raise ValueError, TypeError, ...
        raise ConfigError(f"cannot build a {head} detector on {backbone!r}: {type(e).__name__}: {e}") from None


def _given(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _in_channels(body: nn.Module) -> int:
    """The image channels: the first convolution's input channels."""
    stem = next((m for m in body.modules() if isinstance(m, nn.Conv2d)), None)
    return int(stem.in_channels) if stem is not None else 3
