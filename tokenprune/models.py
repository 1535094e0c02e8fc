"""Create timm and torchvision models by name, remembering how to rebuild them (`model.tokenprune_source`).

Besides the libraries' own models, `create_model(name, task_head="fpn", ...)` (and `segmenter`) wraps a timm
backbone in a small segmentation model: the backbone's feature pyramid (``features_only=True``), torchvision's
``FeaturePyramidNetwork`` and a 1x1 classifier, upsampled to the input size. It is one plain ``nn.Module``, so
`tokenprune.sparsify` treats it like any other model (docs/design.md §3.5).
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, ConfigError
from .inputs import geometry_kwargs  # noqa: F401 - re-exported; input geometry lives in tokenprune.inputs

__all__ = [
    "LIBRARIES",
    "TASK_HEADS",
    "Segmenter",
    "segmenter",
    "create_model",
    "copy_model",
    "resolve_library",
    "geometry_kwargs",
    "model_source",
]

LIBRARIES = ("timm", "torchvision")
# Heads `create_model(..., task_head=...)` can put on a timm backbone; None keeps the library's own (classifier) head.
# "fpn": a `Segmenter`; the detection heads: a torchvision detector (`tokenprune.detect.detector`).
TASK_HEADS = ("fpn", "fcos", "retinanet", "fasterrcnn")


class Segmenter(nn.Module):
    """Semantic segmentation: a feature-pyramid backbone, an FPN, a 1x1 classifier on the finest level, upsampled.

    Args:
        backbone: a module returning a list of feature maps [B, C_i, H_i, W_i], finest first, with
            ``feature_info.channels()`` (a timm model created with ``features_only=True``).
        num_classes: output classes K.
        fpn_channels: channels of every FPN level.

    The forward returns logits [B, K, H, W] at the input's resolution.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, fpn_channels: int = 64) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork

        self.backbone = backbone
        self.fpn = FeaturePyramidNetwork(list(backbone.feature_info.channels()), fpn_channels)
        self.classifier = nn.Conv2d(fpn_channels, num_classes, 1)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        pyramid = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))
        logits = self.classifier(pyramid["0"])
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def segmenter(
    backbone: str,
    num_classes: int,
    *,
    fpn_channels: int = 64,
    pretrained: bool = False,
    **kwargs: Any,
) -> Segmenter:
    """Build a `Segmenter` on a timm backbone created with ``features_only=True``.

    Args:
        backbone: a timm model name with feature-pyramid support (ConvNeXt, Swin, ...), e.g. ``convnext_atto``.
        num_classes: output classes.
        fpn_channels: channels of the FPN levels.
        pretrained: the backbone's pretrained weights (the FPN and classifier always start random).
        **kwargs: backbone keywords, e.g. ``in_chans=1, dims=[32, 64, 128, 256], depths=[1, 1, 6, 1]``.

    Raises:
        ConfigError: unknown backbone or keywords it rejects.
    """
    import timm

    try:
        body = timm.create_model(backbone, pretrained=pretrained, features_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - constructors raise many types
        error = f"{type(e).__name__}: {e}"
        raise ConfigError(f"cannot create timm backbone {backbone!r} (features_only=True, {kwargs}): {error}") from None
    return Segmenter(body, num_classes, fpn_channels)


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models()


def _is_timm(name: str) -> bool:
    import timm

    return timm.is_model(name)  # accepts "arch.pretrained_tag" too


def resolve_library(name: str) -> str:
    """The library that defines `name`: timm first (it also knows ``arch.tag`` names), then torchvision.

    Raises:
        ConfigError: if neither library knows the name; the message lists close matches.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"model name {name!r} is not a non-empty string.")
    if _is_timm(name):
        return "timm"
    if name in _torchvision_names():
        return "torchvision"
    candidates = _timm_names() + _torchvision_names()
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise ConfigError(
        f"unknown model {name!r}: neither timm nor torchvision defines it.{hint} "
        "List names with `python -c \"import timm; print(timm.list_models('*vit*'))\"` or "
        "torchvision.models.list_models()."
    )


def _jsonable(value: Any) -> Any:
    """Tuples become lists (as JSON would make them); anything JSON cannot hold raises ConfigError."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        raise ConfigError(
            f"model keyword arguments {value!r} are not JSON-serialisable, so a saved model could not record how to "
            "rebuild it; use numbers, strings, booleans, lists and dicts."
        ) from None


def model_source(library: str, name: str, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `tokenprune_source` record: enough to call `create_model` again. Validates its parts."""
    if library not in LIBRARIES:
        raise ConfigError(f"source library {library!r} is not supported; use one of {', '.join(LIBRARIES)}.")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"source name {name!r} must be a model name string.")
    return {"library": library, "name": name, "kwargs": _jsonable(dict(kwargs or {}))}


def _build(library: str, name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    kwargs = dict(kwargs)
    head = kwargs.pop("task_head", None)
    if head is not None:
        if head not in TASK_HEADS:
            raise ConfigError(f"task_head={head!r} is unknown; known: {', '.join(TASK_HEADS)} (or none).")
        if library != "timm":
            raise ConfigError(f"task_head={head!r} needs a timm backbone (features_only=True); {name} is {library}.")
        num_classes = kwargs.pop("num_classes", None)
        if num_classes is None:
            raise ConfigError(f"task_head={head!r} needs num_classes, e.g. model.kwargs.num_classes=150.")
        if head == "fpn":
            return segmenter(name, int(num_classes), pretrained=pretrained, **kwargs)
        from .detect import detector

        return detector(name, int(num_classes), head=head, pretrained=pretrained, **kwargs)
    if library == "timm":
        import timm

        return timm.create_model(name, pretrained=pretrained, **kwargs)
    import torchvision

    return torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    library: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Create a timm or torchvision model by name, with weights from a local checkpoint or the library's download.

    The result carries ``tokenprune_source = {"library", "name", "kwargs"}``, which `tokenprune.sparsify` records
    in the `SparsifyConfig` and `tokenprune.save` writes into the file, so `tokenprune.load` can rebuild it.

    Args:
        name: a timm name (``deit_small_patch16_224``, also ``arch.tag``) or a torchvision name (``vit_b_16``).
        pretrained: download the library's pretrained weights (needs internet access; ignored with `checkpoint`).
        checkpoint: a local ``.safetensors`` or ``.pth``/``.pt``/``.bin`` state dict for this architecture.
            Pickles are read with ``weights_only=True``: nothing in them is executed.
        library: "timm" or "torchvision" to skip name resolution (names such as ``resnet50`` exist in both;
            timm is tried first).
        **kwargs: constructor keywords, e.g. ``num_classes=10, img_size=64``. ``task_head="fpn"`` builds a
            `Segmenter` on the timm backbone `name` instead (``num_classes`` required, ``fpn_channels`` optional,
            the rest go to the backbone); ``task_head="fcos" | "retinanet" | "fasterrcnn"`` a torchvision detector on
            it (`tokenprune.detect.detector`: ``num_classes`` counts the background; ``min_size``, ``max_size``,
            ``levels``, ``fpn_channels`` and post-processing thresholds optional). The head is recorded in the source
            like any other keyword.

    Returns:
        The model, in train mode as the libraries return it.

    Raises:
        ConfigError: unknown name (with close matches) or keywords the constructor rejects.
        CheckpointError: pretrained weights could not be downloaded, or the checkpoint is unreadable or does not fit.
    """
    library = library or resolve_library(name)
    source = model_source(library, name, kwargs)
    if checkpoint is not None:
        pretrained = False  # the checkpoint replaces every weight anyway
    try:
        model = _build(library, name, pretrained, kwargs)
    except ConfigError:
        raise  # already says what to change (a task head's own checks)
    except Exception as e:  # noqa: BLE001 - constructors and hub downloads raise many types
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if pretrained:
            try:  # tell a download failure from a bad keyword: does the bare architecture build?
                _build(library, name, False, kwargs)
            except Exception:  # noqa: BLE001
                pass
            else:
                raise CheckpointError(
                    f"could not get the pretrained weights of {library} model {name} ({error}). Without internet "
                    "access, download them elsewhere and pass them as a file: `--checkpoint PATH` on the command "
                    "line, create_model(name, checkpoint=PATH) in Python."
                ) from None
        raise ConfigError(f"cannot create {library} model {name!r} with {kwargs}: {error}") from None
    if checkpoint is not None:
        from .io.weights import load_weights

        load_weights(model, checkpoint)
    model.tokenprune_source = source
    return model


def copy_model(model: nn.Module) -> nn.Module:
    """`copy.deepcopy(model)`, also when a module holds a tensor computed with autograd.

    torch deepcopies only tensors that are leaves of the autograd graph. A model run in evaluation without
    `torch.no_grad()` may hold others: timm's attention bias cache (LeViT, EfficientFormer, TinyViT) stores a
    gathered copy of the bias table, with its grad_fn, on the first evaluation forward, and `deepcopy` of the model
    then failed. Such tensors (in a module's own attributes, or in dicts, lists and tuples there) are copied
    detached; parameters and buffers are leaves and copy as usual. The model itself is not changed.
    """
    memo: dict[int, object] = {}

    def detach(value: object) -> None:
        if isinstance(value, torch.Tensor):
            if not value.is_leaf and id(value) not in memo:
                memo[id(value)] = value.detach().clone()
        elif isinstance(value, dict):
            for item in value.values():
                detach(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                detach(item)

    for module in model.modules():
        for key, value in vars(module).items():
            if key not in ("_parameters", "_buffers", "_modules"):
                detach(value)
    return copy.deepcopy(model, memo)
