"""Pictures of what a sparsified model kept: the input with each stage's dropped patches shaded.

Token models: a stage's panel shades the patches that the stage (or an earlier one) dropped. Spatial models: it
shades the locations that take the fast path after that stage, so what stays clear is where the slow path runs
(docs/design.md §1.2). Decisions come from `tokenprune.sparsity_state` after one eval forward: one [B, N, 1] mask
per stage over the N initial patches (or H*W locations of the sparsified stage), numbered row-major. The grid (h, w)
is found from N and the image's aspect ratio, so any input size the model accepts works.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import nn

from .errors import ConfigError, DataError, TokenPruneError
from .nn.recorder import find_config

__all__ = ["visualize", "visualize_files", "patch_grid", "kept_masks", "SHADE", "SHADE_ALPHA", "GAP", "LABEL_HEIGHT"]

#: Colour that dropped patches are blended with, and how much of it they get. A blue tint, not grey: on greyscale
#: images a grey shade is hard to tell from grey content.
SHADE, SHADE_ALPHA = (40, 90, 210), 0.6
#: White pixels between panels, and the height of the caption band above them (when `labels=True`).
GAP, LABEL_HEIGHT = 4, 14


def patch_grid(patches: int, height: int, width: int) -> tuple[int, int]:
    """The (rows, columns) of a row-major grid of `patches` cells laid over a `height` x `width` image.

    Among the factor pairs rows * columns = patches, the one whose aspect ratio is closest to the image's.
    """
    target = math.log(height / width)
    pairs = [(r, patches // r) for r in range(1, patches + 1) if patches % r == 0]
    return min(pairs, key=lambda rc: abs(math.log(rc[0] / rc[1]) - target))


@torch.no_grad()
def kept_masks(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Run `model` in eval mode on `images` and return one [B, N] boolean keep mask per stage (nested).

    The model's training flag is restored afterwards.

    Raises:
        TokenPruneError: if `model` is not a sparsified model.
    """
    from .state import sparsity_state

    was_training = {m: m.training for m in model.modules()}
    try:
        model.eval()(images)
        decisions = sparsity_state(model).decisions
    finally:
        for module, mode in was_training.items():
            module.training = mode
    return [d.reshape(d.shape[0], -1) > 0.5 for d in decisions]


def _channel_values(value: float | Sequence[float] | None, channels: int, default: float) -> torch.Tensor:
    if value is None:
        return torch.full((channels, 1, 1), default)
    values = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ConfigError(f"mean/std have {len(values)} values for {channels}-channel images; give 1 or {channels}.")
    return torch.tensor(values).reshape(channels, 1, 1)


def _to_rgb(image: torch.Tensor, mean, std) -> torch.Tensor:
    """[C, H, W] model input -> [H, W, 3] uint8. Without mean/std the image's own min..max range is stretched."""
    x = image.detach().float().cpu()
    if mean is not None or std is not None:
        channels = x.shape[0]
        x = x * _channel_values(std, channels, 1.0) + _channel_values(mean, channels, 0.0)
    else:
        low, high = x.min(), x.max()
        x = (x - low) / (high - low).clamp_min(1e-12)
    x = x[:3] if x.shape[0] >= 3 else x[:1].expand(3, -1, -1)  # greyscale (or 2-channel) shown as grey
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)


def _panel(rgb: torch.Tensor, keep: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """`rgb` [H, W, 3] with the cells where `keep` [rows * cols] is False blended with SHADE."""
    rows, cols = grid
    height, width = rgb.shape[:2]
    # Each image pixel belongs to the cell whose span covers it (spans rounded when sizes do not divide).
    cell_row = torch.div(torch.arange(height) * rows, height, rounding_mode="floor")
    cell_col = torch.div(torch.arange(width) * cols, width, rounding_mode="floor")
    dropped = ~keep.cpu().reshape(rows, cols)[cell_row][:, cell_col]
    shade = torch.tensor(SHADE, dtype=torch.float32)
    blended = (rgb.float() * (1 - SHADE_ALPHA) + shade * SHADE_ALPHA).round().to(torch.uint8)
    return torch.where(dropped[..., None], blended, rgb)


def visualize(
    model: nn.Module,
    images: torch.Tensor,
    *,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    scale: int | None = None,
    labels: bool = True,
) -> list[Image.Image]:
    """One picture per input image: a panel per stage, the patches that stage dropped shaded (tinted blue).

    Panel s (from 0) starts at x = s * (W * scale + GAP) and, with `labels`, at y = LABEL_HEIGHT under a caption
    such as "stage 1: 34/49 kept" ("stage 1: 11/16 slow" for spatial models: slow-path locations). Images are
    enlarged by whole pixels (nearest), so every patch stays a block.

    Args:
        model: a result of `tokenprune.sparsify` or `tokenprune.load` (token or spatial). It runs once in eval mode;
            its training flag is restored.
        images: model input [B, C, H, W] (or one image [C, H, W]), normalised as the model expects.
        mean: per-channel mean (or one value) that the input was normalised with, to show true colours.
        std: per-channel std (or one value). Without mean and std each image's own value range is stretched.
        scale: integer enlargement; default: the smallest that makes the shorter side at least 112 pixels.
        labels: draw a caption above each panel.

    Returns:
        A list of RGB `PIL.Image.Image`, one per input image (greyscale inputs are shown in grey).

    Raises:
        TokenPruneError: if `model` is not sparsified or `images` is not an image batch.
    """
    if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4):
        raise TokenPruneError(f"images must be a tensor [B, C, H, W] or [C, H, W], got {_describe(images)}.")
    batch = images if images.dim() == 4 else images[None]
    masks = kept_masks(model, batch)
    config = find_config(model)
    word = "slow" if config is not None and config.kind == "spatial" else "kept"
    height, width = batch.shape[-2:]
    scale = scale or max(1, math.ceil(112 / min(height, width)))
    pictures = []
    for b in range(batch.shape[0]):
        rgb = _to_rgb(batch[b], mean, std)
        panels = []
        for keep in masks:
            cells = keep.shape[1]
            panel = _panel(rgb, keep[b], patch_grid(cells, height, width))
            panels.append((Image.fromarray(panel.numpy()), int(keep[b].sum()), cells))
        pictures.append(_compose(panels, scale, labels, word))
    return pictures


def _describe(value: object) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def _compose(panels: list[tuple[Image.Image, int, int]], scale: int, labels: bool, word: str) -> Image.Image:
    width, height = panels[0][0].width * scale, panels[0][0].height * scale
    top = LABEL_HEIGHT if labels else 0
    canvas = Image.new("RGB", (len(panels) * width + (len(panels) - 1) * GAP, top + height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for s, (panel, kept, cells) in enumerate(panels):
        x = s * (width + GAP)
        canvas.paste(panel.resize((width, height), Image.Resampling.NEAREST), (x, top))
        if labels:
            draw.text((x + 2, 1), f"stage {s + 1}: {kept}/{cells} {word}", fill=(0, 0, 0))
    return canvas


# ---- files in, files out (the `tokenprune visualize` command) ----------------------------------------------------


def _read_image(path: Path, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """An image file as a [C, H, W] tensor in [0, 1], converted to `channels` and resized to `size` (H, W)."""
    if not path.is_file():
        raise DataError(f"{path}: no such image file; check the path.")
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB").resize(size[::-1], Image.Resampling.BILINEAR)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path} is not an image Pillow can read ({type(e).__name__}: {e}).") from None
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).float() / 255
    return x.reshape(size[0], size[1], -1).permute(2, 0, 1)


def _load_model(model: str, ratio: float | None, pretrained: bool) -> nn.Module:
    from .config import DEFAULT_RATIO
    from .loaders import load_model
    from .models import create_model
    from .sparsify import set_keep_ratios, sparsify

    path = Path(model)
    if path.suffix in (".safetensors", ".pt") or path.exists():
        loaded = load_model(path)
        return loaded if ratio is None else set_keep_ratios(loaded, ratio=ratio)
    return sparsify(create_model(model, pretrained=pretrained).eval(), DEFAULT_RATIO if ratio is None else ratio).eval()


def visualize_files(
    model: str,
    images: Sequence[str | Path],
    out: str | Path,
    *,
    ratio: float | None = None,
    pretrained: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> list[Path]:
    """Write `<out>/<image stem>_kept.png` for each image file, as `visualize` draws it.

    Args:
        model: a tokenprune ``.safetensors`` file (`tokenprune.load`) or a timm/torchvision model name, which is
            created (random weights unless `pretrained`) and sparsified at `ratio`.
        images: image files Pillow reads; each is converted to the model's channel count and resized to the input
            size the model was sparsified for.
        out: output folder (created).
        ratio: base keep ratio: a name is sparsified at it (default 0.7); a file keeps what it was saved with
            unless it is given (`tokenprune.set_keep_ratios`).
        pretrained: download the library's weights when `model` is a name.
        mean: per-channel mean to normalise the [0, 1] images with; default ImageNet's for 3-channel models, else 0.5.
        std: per-channel std; default ImageNet's for 3-channel models, else 0.5.

    Returns:
        The paths written.

    Raises:
        DataError: a missing or unreadable image file.
        CheckpointError, ConfigError, UnsupportedModelError: from loading or creating the model.
    """
    from .nn.recorder import config_of

    paths = [Path(p) for p in images]
    if not paths:
        raise DataError("no image files given; pass at least one.")
    for p in paths:  # fail on a bad image before spending time on the model
        if not p.is_file():
            raise DataError(f"{p}: no such image file; check the path.")
    sparse = _load_model(model, ratio, pretrained)
    channels, height, width = config_of(sparse).input_size
    imagenet = channels == 3
    mean = mean if mean is not None else ((0.485, 0.456, 0.406) if imagenet else (0.5,))
    std = std if std is not None else ((0.229, 0.224, 0.225) if imagenet else (0.5,))
    raw = torch.stack([_read_image(p, channels, (height, width)) for p in paths])
    m, s = _channel_values(mean, channels, 0.0), _channel_values(std, channels, 1.0)
    pictures = visualize(sparse, (raw - m) / s, mean=mean, std=std)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for p, picture in zip(paths, pictures):
        target = out / f"{p.stem}_kept.png"
        picture.save(target)
        written.append(target)
    return written
