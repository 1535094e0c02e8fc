"""The authors' released DynamicViT checkpoints (github.com/raoyongming/DynamicViT, "Model Zoo"), read into
tokenprune models (docs/design.md §4.1).

Three of the official model families are laid out as tokenprune lays them out, so importing them is a renaming:

- **DeiT** (``deit-256``, ``deit-s``, ``deit-b``; `VisionTransformerDiffPruning`): the backbone under timm's DeiT
  names, one `PredictorLG` per stage (``score_predictor.s.in_conv.{0,1}``, ``out_conv.{0,2,4}``), whose layers are
  `TokenPredictor`'s. Stages before blocks 3, 6, 9 keep rho, rho^2, rho^3 of the patches.
- **ConvNeXt** (``convnext-t``, ``convnext-s``, ``convnext-b``, "DynamicCNN"; `AdaConvNeXt`): the backbone under the
  ConvNeXt authors' names (``downsample_layers``, ``stages.i.j.dwconv``, ``pwconv1``, ...), renamed to timm's; each
  block after the first stage has a fast path (``fast_path.{0,1}``, ``fast_path_gamma``: `FastPath`'s norm, proj and
  gamma); the predictors are the same MLP written with 1x1 convolutions. Stages before blocks 1, 2, 3 (ConvNeXt-T)
  or 3, 6, 9 (S, B) of the third stage keep rho, rho - 0.2, rho - 0.4 of all locations, each deciding
  independently.
- **Swin** (``swin-t``, ``swin-s``, ``swin-b``, "DynamicSwin"; `AdaSwinTransformer`): the backbone under the Swin
  authors' names, renamed to timm's (a layer's downsampling at the start of the next, ``head.fc``; the relative
  position index and shift masks they persist are recomputed by timm); each block after the first stage has a
  fast path (``fastmlp.fc1.{0,1}``: `FastPath`'s norm and proj, no scale); the predictors sit in the third layer.
  Stages before its blocks 1, 2, 3 (Swin-T) or 2, 4, 6 (S, B), as ConvNeXt's. Its predictors' LayerNorm has
  epsilon 1e-5 there and 1e-6 here, every tokenprune spatial predictor's (docs/design.md §4.1).

The keep ratios are the official code's floats (``0.7 - 0.2`` is 0.49999999999999994, so it keeps 97 of 196
locations where tokenprune's own schedule, 0.5, keeps 98). A training checkpoint also holds the run's ``args`` (an
``argparse.Namespace``: ``model`` names the architecture, ``base_rate`` the ratio), read as a plain record; nothing
in the file is executed. LV-ViT files are refused, naming what they are.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from .weights import FORMAT, check_fit, read_pickle, read_weights, require_file, tensor_dict

__all__ = ["OfficialArch", "OFFICIAL_MODELS", "is_official_file", "load_official"]


@dataclass(frozen=True)
class OfficialArch:
    """How tokenprune builds one official architecture: a timm name with constructor keywords, the chain blocks the
    official code places its stages before (None: tokenprune's default), and its keep-ratio schedule."""

    kind: str  # "token" (DeiT) or "spatial" (ConvNeXt, Swin)
    timm_name: str | None = None
    locations: tuple[int, ...] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def keep_ratios(self, rho: float, stages: int) -> list[float]:
        """The official per-stage keep ratios, as the official `main.py`/`infer.py` compute them (same floats)."""
        if self.kind == "token":
            return [rho ** (s + 1) for s in range(stages)]  # [rho, rho ** 2, rho ** 3]
        return [rho - 0.2 * s for s in range(stages)]  # [rho, rho - 0.2, rho - 0.4]


#: The official ``--model`` names the authors' `main.py`/`infer.py` build: DeiT with 12 blocks, patch 16, qkv bias,
#: head dim 64 (``deit-256``: DeiT-S at width 256, 4 heads); ConvNeXt as facebookresearch/ConvNeXt; Swin as
#: microsoft/Swin-Transformer (window 7), its stages in the third layer.
OFFICIAL_MODELS = {
    "deit-256": OfficialArch("token", "deit_small_patch16_224", (3, 6, 9), {"embed_dim": 256, "num_heads": 4}),
    "deit-s": OfficialArch("token", "deit_small_patch16_224", (3, 6, 9)),
    "deit-b": OfficialArch("token", "deit_base_patch16_224", (3, 6, 9)),
    "convnext-t": OfficialArch("spatial", "convnext_tiny", (1, 2, 3)),
    "convnext-s": OfficialArch("spatial", "convnext_small", (3, 6, 9)),
    "convnext-b": OfficialArch("spatial", "convnext_base", (3, 6, 9)),
    "swin-t": OfficialArch("spatial", "swin_tiny_patch4_window7_224", (1, 2, 3)),
    "swin-s": OfficialArch("spatial", "swin_small_patch4_window7_224", (2, 4, 6)),
    "swin-b": OfficialArch("spatial", "swin_base_patch4_window7_224", (2, 4, 6)),
}


@dataclass(frozen=True)
class _Layout:
    """How one official family names its tensors, as rules onto timm's names and tokenprune's modules."""

    kind: str
    #: official backbone names -> timm's: (pattern at the key's start, replacement), first match wins
    renames: tuple[tuple[str, Any], ...] = ()
    #: an official fast path's tensors: groups s (stage), b (block), part, leaf; and the timm block they belong to
    fast_path: str | None = None
    fast_block: str = ""
    fast_parts: dict[str, str] = field(default_factory=dict)
    #: the predictors: groups (stage index, rest of the key)
    predictor: str = r"score_predictor\.(\d+)\.(.+)"
    #: buffers the official file holds and timm recomputes
    dropped: str | None = None
    #: what tells the released models apart (timm names): the tensor whose size along a dim is the width, that dim,
    #: and the name prefix of the third stage's blocks, whose count is its depth (None: width alone)
    shape: tuple[str, int, str | None] = ("cls_token", -1, None)

    def released(self, backbone: dict[str, torch.Tensor]) -> str | None:
        key, dim, blocks = self.shape
        width = backbone.get(key)
        if not isinstance(width, torch.Tensor) or width.dim() == 0:
            return None
        depth = len({k[len(blocks) :].split(".")[0] for k in backbone if k.startswith(blocks)}) if blocks else None
        return _RELEASED.get((blocks, int(width.shape[dim]), depth))


_LAYOUTS = {
    "deit": _Layout("token"),
    "convnext": _Layout(
        "spatial",
        renames=(
            (r"downsample_layers\.0\.", "stem."),
            (r"downsample_layers\.(\d+)\.", r"stages.\1.downsample."),
            (r"stages\.(\d+)\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
            (r"stages\.(\d+)\.(\d+)\.pwconv1\.", r"stages.\1.blocks.\2.mlp.fc1."),
            (r"stages\.(\d+)\.(\d+)\.pwconv2\.", r"stages.\1.blocks.\2.mlp.fc2."),
            (r"stages\.(\d+)\.(\d+)\.(norm\.|gamma$)", r"stages.\1.blocks.\2.\3"),
            (r"norm\.", "head.norm."),
            (r"head\.", "head.fc."),
        ),
        fast_path=r"stages\.(?P<s>\d+)\.(?P<b>\d+)\.(?P<part>fast_path\.[01]\.|fast_path_gamma)(?P<leaf>.*)",
        fast_block=r"stages.\g<s>.blocks.\g<b>",
        fast_parts={"fast_path.0.": "norm.", "fast_path.1.": "proj.", "fast_path_gamma": "gamma"},
        shape=("stem.0.weight", 0, "stages.2.blocks."),
    ),
    "swin": _Layout(
        "spatial",
        renames=(  # the Swin authors downsample at the end of a layer, timm at the start of the next
            (r"layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) + 1}.downsample."),
            (r"head\.", "head.fc."),
        ),
        fast_path=r"layers\.(?P<s>\d+)\.blocks\.(?P<b>\d+)\.fastmlp\.fc1\.(?P<part>[01]\.)(?P<leaf>.+)",
        fast_block=r"layers.\g<s>.blocks.\g<b>",
        fast_parts={"0.": "norm.", "1.": "proj."},
        predictor=r"layers\.\d+\.score_predictor\.(\d+)\.(.+)",
        dropped=r".*\.(relative_position_index|attn_mask)",
        shape=("patch_embed.proj.weight", 0, "layers.2.blocks."),
    ),
}
#: The released models by shape, for files without ``args``: DeiT by width; ConvNeXt and Swin by stem width and the
#: number of blocks in their third stage.
_RELEASED = {
    (None, 256, None): "deit-256",
    (None, 384, None): "deit-s",
    (None, 768, None): "deit-b",
    ("stages.2.blocks.", 96, 9): "convnext-t",
    ("stages.2.blocks.", 96, 27): "convnext-s",
    ("stages.2.blocks.", 128, 27): "convnext-b",
    ("layers.2.blocks.", 96, 6): "swin-t",
    ("layers.2.blocks.", 96, 18): "swin-s",
    ("layers.2.blocks.", 128, 18): "swin-b",
}
_PREDICTOR = "score_predictor."
#: Official predictor submodules -> `TokenPredictor`'s (the ConvNeXt one's 1x1 convolutions are its Linears).
_PREDICTOR_PARTS = {
    "in_conv.0": "embed.0",
    "in_conv.1": "embed.1",
    "out_conv.0": "score.0",
    "out_conv.2": "score.2",
    "out_conv.4": "score.4",
}
#: Keys only the models tokenprune does not import have, and what those models are.
_NOT_IMPORTED = {"aux_head": "an LV-ViT checkpoint (not a timm architecture)"}
#: The most of a pickle's index (`data.pkl`: keys and structure, not tensor data) read to recognise an official file.
_SNIFF_BYTES = 32 << 20


def is_official_file(path: str | os.PathLike[str]) -> bool:
    """Whether `path` holds the official predictors (``score_predictor.``): a torch zip checkpoint, decided from the
    pickle's index without unpickling it, or a safetensors file of the official tensors, from its header."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix == ".safetensors":
        return _safetensors_is_official(path)
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            index = next((i for i in z.infolist() if i.filename.endswith("/data.pkl")), None)
            if index is None or index.file_size > _SNIFF_BYTES:
                return False
            return _PREDICTOR.encode() in z.read(index)
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def _safetensors_is_official(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("format") == FORMAT:
                return False  # a tokenprune model file
            return any(_PREDICTOR in key for key in f.keys())  # noqa: SIM118 - safe_open is no dict
    except Exception:  # noqa: BLE001 - not a readable safetensors file: the loaders say so
        return False


def load_official(
    path: str | os.PathLike[str], *, ratio: float | None = None, model: nn.Module | None = None
) -> tuple[nn.Module, nn.Module]:
    """(dense, sparse) from an official DynamicViT DeiT, ConvNeXt or Swin checkpoint: the timm model with the file's
    backbone, and it sparsified as the official code prunes it, with the file's predictors (and fast paths).

    Args:
        path: the checkpoint (``.pth`` as released, or its tensors re-saved as ``.safetensors``).
        ratio: base keep ratio rho; by default the file's own (``args.base_rate``). A file that does not record it
            needs it given (the released DeiT and Swin files are 0.7; the ConvNeXt ones 0.7 or 0.9).
        model: the dense architecture, for a file of another shape than the released ones (built as the official
            code builds them otherwise); not changed. It must use timm's names (ConvNeXt and Swin files are renamed
            to them).

    Returns:
        (dense, sparse), both in eval mode.

    Raises:
        CheckpointError: an unreadable file, one that is not an official DeiT, ConvNeXt or Swin checkpoint (naming what
            it is where known), or weights that do not fit the architecture.
        ConfigError: no ratio given or recorded, or keep ratios `sparsify` refuses.
    """
    from .. import sparsify
    from ..fx.tracing import model_name

    path = Path(path)
    tensors, args = _read(path)
    layout = _layout_of(tensors, path)
    tensors = {k: v for k, v in tensors.items() if not (layout.dropped and re.fullmatch(layout.dropped, k))}
    predictors = _predictor_states(tensors, layout, path)
    backbone, fast_paths = _backbone_states(tensors, layout)
    arch = _arch(args, layout, backbone, path, known_model=model is not None)
    dense = _build(arch, backbone) if model is None else copy.deepcopy(model)
    what = model_name(dense)
    check_fit(dense.state_dict(), backbone, path, f"{what} (the official checkpoint's backbone)")
    dense.load_state_dict(backbone, strict=True)
    rho = _ratio(ratio, args, path)
    locations = list(arch.locations) if arch.locations is not None else None
    try:
        sparse = sparsify(dense, locations=locations, keep_ratios=arch.keep_ratios(rho, len(predictors)))
    except ConfigError as e:
        raise ConfigError(f"{path} ({len(predictors)} official predictors, rho = {rho}): {e}") from None
    _load_stages(sparse, predictors, fast_paths, path, what)
    _keep_official_counts(sparse)
    return dense.eval(), sparse.eval()


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The file's tensors (under ``"model"`` when wrapped) and its run's ``args`` as a dict ({} when absent)."""
    require_file(path)
    if path.suffix == ".safetensors":
        return read_weights(path), {}
    state = read_pickle(path, allowed=(argparse.Namespace,))
    args = state.get("args") if isinstance(state, dict) else None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = {"model": state["model"]}  # the weights `infer.py` evaluates (not "model_ema", not the optimizer's)
    return tensor_dict(state, path), (vars(args) if isinstance(args, argparse.Namespace) else {})


def _layout_of(tensors: dict[str, torch.Tensor], path: Path) -> _Layout:
    """The official family whose names the file uses (refusing the ones not imported)."""
    for marker, what in _NOT_IMPORTED.items():
        if any(marker in k.split(".") for k in tensors):
            raise CheckpointError(
                f"{path} looks like {what}; tokenprune imports the official DeiT, ConvNeXt and Swin checkpoints "
                f"({', '.join(OFFICIAL_MODELS)}) only. Fine-tune a tokenprune model from the dense weights instead."
            )
    if any(k.startswith("downsample_layers.") for k in tensors):
        return _LAYOUTS["convnext"]
    if any(".fastmlp." in k for k in tensors):
        return _LAYOUTS["swin"]
    return _LAYOUTS["deit"]


def _predictor_states(tensors: dict[str, torch.Tensor], layout: _Layout, path: Path) -> list[dict[str, torch.Tensor]]:
    """Per stage, the official predictor's tensors under `TokenPredictor`'s names (1x1 conv weights as Linear's)."""
    stages: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = re.fullmatch(layout.predictor, key)
        if match is None:
            if _PREDICTOR in key:
                raise CheckpointError(f"{path}: {key} is not where the official {layout.kind} models keep predictors.")
            continue
        index, rest = match.groups()
        part, _, leaf = rest.rpartition(".")
        if part not in _PREDICTOR_PARTS:
            raise CheckpointError(f"{path}: {key} is not a key of the official predictor (PredictorLG).")
        weight = value.flatten(1) if value.dim() == 4 and value.shape[2:] == (1, 1) else value
        stages.setdefault(int(index), {})[f"{_PREDICTOR_PARTS[part]}.{leaf}"] = weight
    if not stages:
        raise CheckpointError(
            f"{path} holds no official DynamicViT predictors ({_PREDICTOR}*); for plain dense weights use "
            "tokenprune.create_model(name, checkpoint=path), for tokenprune's own files tokenprune.load."
        )
    if sorted(stages) != list(range(len(stages))):
        raise CheckpointError(f"{path}: predictors {sorted(stages)} are not numbered 0..{len(stages) - 1}.")
    return [stages[i] for i in range(len(stages))]


def _backbone_states(
    tensors: dict[str, torch.Tensor], layout: _Layout
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """The backbone's tensors under timm's names, and each block's fast path under `FastPath`'s, by the block's
    timm name."""
    backbone: dict[str, torch.Tensor] = {}
    fast_paths: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if re.fullmatch(layout.predictor, key):
            continue
        fast = re.fullmatch(layout.fast_path, key) if layout.fast_path else None
        if fast:
            block = fast.expand(layout.fast_block)
            fast_paths.setdefault(block, {})[layout.fast_parts[fast["part"]] + fast["leaf"]] = value
        else:
            backbone[_renamed(key, layout)] = value
    return backbone, fast_paths


def _renamed(key: str, layout: _Layout) -> str:
    for pattern, replacement in layout.renames:
        renamed, count = re.subn("^" + pattern, replacement, key, count=1)
        if count:
            return renamed
    return key


def _arch(
    args: dict[str, Any], layout: _Layout, backbone: dict[str, torch.Tensor], path: Path, known_model: bool
) -> OfficialArch:
    """The architecture the run's ``args.model`` names, else the released one of the file's shape; for a dense
    model given, the official placement and schedule of the file's kind when its name is not one of them."""
    name = args.get("model") or layout.released(backbone)
    arch = OFFICIAL_MODELS.get(name) if isinstance(name, str) else None
    if arch is not None and arch.kind == layout.kind:
        return arch
    if known_model:
        return OfficialArch(layout.kind)
    said = f"is a {name!r} checkpoint" if name else "does not say which architecture it is (no args.model)"
    raise CheckpointError(
        f"{path} {said} and is not one of the official models tokenprune builds ({', '.join(OFFICIAL_MODELS)}); "
        "build the dense model it was trained on with timm's names and pass it (load_official(path, model=...))."
    )


def _build(arch: OfficialArch, backbone: dict[str, torch.Tensor]) -> nn.Module:
    from ..models import create_model

    head = backbone.get("head.weight", backbone.get("head.fc.weight"))
    classes = int(head.shape[0]) if isinstance(head, torch.Tensor) and head.dim() == 2 else 1000
    return create_model(str(arch.timm_name), library="timm", num_classes=classes, **arch.kwargs)


def _load_stages(
    sparse: nn.Module,
    predictors: list[dict[str, torch.Tensor]],
    fast_paths: dict[str, dict[str, torch.Tensor]],
    path: Path,
    what: str,
) -> None:
    """Give each stage's predictor and each rewritten block's fast path the file's weights, strictly."""
    from ..nn.asymmetric import FastPath
    from ..nn.recorder import selectors

    for stage, state in zip(selectors(sparse), predictors, strict=True):  # sparsify made one stage per predictor
        check_fit(stage.predictor.state_dict(), state, path, f"{what}'s stage {stage.stage} predictor")
        stage.predictor.load_state_dict(state, strict=True)
    mine = {name: m for name, m in sparse.named_modules() if isinstance(m, FastPath)}
    owner = {name: next((b for b in fast_paths if name.startswith(b + ".")), None) for name in mine}
    unmatched = sorted(set(fast_paths) - set(owner.values())) + sorted(n for n, b in owner.items() if b is None)
    if unmatched:
        raise CheckpointError(
            f"{path}: the fast paths of the file and of {what} sparsified at the official stages are in different "
            f"blocks ({', '.join(unmatched[:3])}); pass the dense model the file was trained on (model=)."
        )
    for name, module in mine.items():
        check_fit(module.state_dict(), fast_paths[owner[name]], path, f"{what}'s fast path {name}")
        module.load_state_dict(fast_paths[owner[name]], strict=True)


def _ratio(ratio: float | None, args: dict[str, Any], path: Path) -> float:
    """The base keep ratio: the one given, else the run's ``args.base_rate``."""
    from ..config import check_ratio

    if ratio is not None:
        return check_ratio(ratio)
    recorded = args.get("base_rate")
    if recorded is not None:
        return check_ratio(recorded, f"{path}: args.base_rate")
    raise ConfigError(
        f"{path} does not record the keep ratio it was trained at (no args.base_rate); give it: "
        f"`tokenprune convert {path} --ratio 0.7 --out DIR` writes a model file that records it (use DIR "
        "afterwards), load_official(path, ratio=0.7) in Python. The released files were trained at 0.7, some "
        "ConvNeXt ones at 0.9; their names say which."
    )


@torch.no_grad()
def _keep_official_counts(sparse: nn.Module) -> None:
    """Keep the official counts at the model's input size.

    The official code keeps ``int(N * rho_s)`` of N; tokenprune ``floor(rho_s N + 1e-6)`` (a ratio written as a
    fraction should not lose a token to rounding). The two differ where the official float is a hair below an
    integer multiple: ``0.7 - 0.2`` is 0.49999999999999994, so the official ConvNeXt keeps 97 of 196 locations there,
    not 98. Such a stage keeps ``int(N * rho_s) / N`` instead: the official count at this size (other sizes keep that
    fraction, within a token of the official count).
    """
    from ..nn.recorder import config_of, selectors
    from ..sparsify import set_keep_ratios

    stages = selectors(sparse)
    sparse.eval()(torch.zeros(1, *config_of(sparse).input_size))
    ratios = [sel.keep_ratio for sel in stages]
    official = [
        r if sel.keep_count(sel.last_initial_patches) == int(sel.last_initial_patches * r)
        else int(sel.last_initial_patches * r) / sel.last_initial_patches
        for sel, r in zip(stages, ratios, strict=True)
    ]  # fmt: skip
    if official != ratios:
        set_keep_ratios(sparse, official)
