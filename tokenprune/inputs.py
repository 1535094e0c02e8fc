"""Input geometry, in one place: a model's input size, an example input, the CLI's size syntax, and the constructor
keywords that build a model for a size."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, UnsupportedModelError

__all__ = ["input_size", "example_input", "parse_input_size", "geometry_kwargs"]


def input_size(model: nn.Module) -> tuple[int, int, int] | None:
    """(C, H, W) a model is built for, or None when nothing tells.

    In order: the patch embedding's ``img_size`` when it holds the model's first convolution (the size the model was
    built for, which may differ from the pretrained one), the model's own ``img_size`` (timm's MaxViT family),
    timm's ``pretrained_cfg["input_size"]``, torchvision ViT's
    ``image_size``, and for other models with a convolutional stem 224 x 224 (what ImageNet classifiers are built and
    counted at). The channels are the model's own ``in_chans`` (timm records what it was built with), else its first
    convolution's input channels.
    """
    stem = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    # reason: the first convolution is not always the image's: TResNet's space-to-depth stem feeds it 48 channels
    chans = getattr(model, "in_chans", None)
    chans = chans if isinstance(chans, int) and chans > 0 else (stem.in_channels if stem is not None else None)
    # reason: timm's patch embeddings (also under another attribute name, e.g. MLP-Mixer's `stem`, and after a CNN
    # backbone in hybrid ViTs) record the image size the model was built for.
    embed = next((m for m in model.modules() if getattr(m, "img_size", None) is not None and hasattr(m, "proj")), None)
    # reason: only an embedding that holds the first convolution sees the image itself; one after a convolutional
    # stem (Visformer) records the size of the stem's output.
    if embed is not None and stem is not None and any(m is stem for m in embed.modules()):
        img_size = embed.img_size if isinstance(embed.img_size, (tuple, list)) else (embed.img_size, embed.img_size)
        return (int(chans), *(int(v) for v in img_size))
    own = _pair(getattr(model, "img_size", None))
    if own is not None and chans is not None:  # reason: timm's MaxViT family records the size it was built for here
        return (int(chans), *own)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:  # reason: the pretrained size; `chans` are those the model was built with
        channels, height, width = (int(v) for v in cfg["input_size"])
        return (int(chans) if chans is not None else channels, height, width)
    if isinstance(getattr(model, "image_size", None), int):  # torchvision VisionTransformer
        return (3, model.image_size, model.image_size)
    return (int(chans), 224, 224) if chans is not None else None


def _pair(value: object) -> tuple[int, int] | None:
    """(H, W) from an image size given as one int or a pair of ints, else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return (int(value[0]), int(value[1]))
    return None


def example_input(model: nn.Module, example_inputs: torch.Tensor | None = None, batch: int = 2) -> torch.Tensor:
    """An input to trace shapes with: the caller's, else a random batch of `input_size(model)`; a floating-point
    input is in the model's floating-point dtype (a bf16 model is analysed with a bf16 image; the caller's tensor is
    converted, not changed).

    Raises:
        UnsupportedModelError: when `example_inputs` is not a tensor, or no size is known.
    """
    from .fx.tracing import model_name

    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    if example_inputs is not None:
        if not isinstance(example_inputs, torch.Tensor):
            raise UnsupportedModelError(
                f"{model_name(model)}: example_inputs must be one image tensor [B, C, H, W], "
                f"got {type(example_inputs).__name__}."
            )
        if example_inputs.is_inference():  # made under torch.inference_mode: autograd may not record it
            with torch.inference_mode(False):
                example_inputs = example_inputs.clone()
        return example_inputs.to(dtype) if example_inputs.is_floating_point() else example_inputs
    size = input_size(model)
    if size is None:
        raise UnsupportedModelError(
            f"{model_name(model)}: cannot tell the input size (no timm pretrained_cfg, no torchvision image_size); "
            "pass example_inputs=torch.randn(1, 3, H, W)."
        )
    device = param.device if param is not None else "cpu"
    return torch.randn(batch, *size, device=device, dtype=dtype)


def parse_input_size(text: str | None, option: str = "--input-size") -> tuple[int, int, int] | None:
    """ "224" -> (3, 224, 224); "224,160" -> (3, 224, 160); "1,28,28" or "1x28x28" -> (1, 28, 28).

    Raises:
        ConfigError: for anything else.
    """
    if text is None:
        return None
    usage = f"{option} {text!r}: give H, H,W or C,H,W (positive integers), e.g. 224 or 3,224,224."
    try:
        values = [int(v) for v in text.lower().replace("x", ",").replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(usage) from None
    if not values or len(values) > 3 or any(v < 1 for v in values):
        raise ConfigError(usage)
    if len(values) == 1:
        values = [values[0]] * 2
    return tuple([3, *values] if len(values) == 2 else values)


def geometry_kwargs(library: str, name: str, size: Sequence[int] | None) -> dict[str, Any]:
    """Constructor keywords that build `name` for input `size` (C, H, W): positional embeddings and patch grids
    depend on it, so a ViT must be created at the size it will run at.

    timm models take ``img_size`` and ``in_chans``; torchvision's ViTs take ``image_size`` (square, 3 channels).
    Returns ``{}`` when no size is given.

    Raises:
        ConfigError: for a size a torchvision model cannot take.
    """
    if size is None:
        return {}
    chans, height, width = (int(v) for v in size)
    if library == "timm":
        kwargs: dict[str, Any] = {"img_size": [height, width]}
        if chans != 3:
            kwargs["in_chans"] = chans
        return kwargs
    if chans != 3:
        raise ConfigError(f"torchvision model {name} takes 3-channel images; got input size {list(size)}.")
    if name.startswith("vit_"):
        if height != width:
            raise ConfigError(f"torchvision {name} takes square images; got input size {list(size)}.")
        return {"image_size": height}
    return {}
