"""The authors' released DynamicViT checkpoints (github.com/raoyongming/DynamicViT, "Model Zoo"), read into
tokenprune models.

The official DeiT files (``deit-256``, ``deit-s``, ``deit-b``, trained at rho = 0.7, 76.53 / 79.32 / 81.43 % top-1 on
ImageNet as the authors report) hold a `VisionTransformerDiffPruning` state dict under ``"model"``: the backbone under
timm's DeiT names (``patch_embed.proj``, ``cls_token``, ``blocks.i.attn.qkv``, ``norm``, ``head``, ...) and one
predictor per stage, ``score_predictor.s.in_conv.{0,1}`` (LayerNorm, Linear) and ``score_predictor.s.out_conv.{0,2,4}``
(the three Linears), the architecture `tokenprune.nn.predictor.TokenPredictor` has under ``embed.{0,1}`` and
``score.{0,2,4}``. Importing is therefore a renaming, no conversion: the timm DeiT is built, given the backbone, and
sparsified at the official stages (blocks 3, 6, 9) and keep ratios (rho, rho^2, rho^3 of the 196 patches, floored);
each stage's predictor then takes its weights. A training checkpoint also holds the run's ``args`` (an
``argparse.Namespace``: its ``model`` names the architecture, its ``base_rate`` the ratio), read as a plain record;
nothing in the file is executed.

The official AdaConvNeXt and AdaSwin files (DynamicCNN, DynamicSwin) and LV-ViT are not imported: their fast paths
and predictors are laid out otherwise, and LV-ViT is not a timm architecture. They are refused, naming which they are.
"""

from __future__ import annotations

import argparse
import copy
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from .weights import check_fit, read_pickle, read_weights, require_file, tensor_dict

__all__ = ["OfficialArch", "OFFICIAL_TOKEN_MODELS", "is_official_file", "load_official"]


@dataclass(frozen=True)
class OfficialArch:
    """How tokenprune builds one of the official DeiT architectures: a timm name with constructor keywords, and the
    blocks the official code prunes before."""

    timm_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    locations: tuple[int, ...] = (3, 6, 9)


#: The official ``--model`` names of the token models, as the authors' `main.py`/`infer.py` build them (12 blocks,
#: patch 16, qkv bias, head dim 64; ``deit-256`` is DeiT-S at width 256 with 4 heads).
OFFICIAL_TOKEN_MODELS = {
    "deit-256": OfficialArch("deit_small_patch16_224", {"embed_dim": 256, "num_heads": 4}),
    "deit-s": OfficialArch("deit_small_patch16_224"),
    "deit-b": OfficialArch("deit_base_patch16_224"),
}
_BY_WIDTH = {256: "deit-256", 384: "deit-s", 768: "deit-b"}
_PREFIX = "score_predictor."
#: Official predictor submodules -> `TokenPredictor`'s.
_PREDICTOR_PARTS = {
    "in_conv.0": "embed.0",
    "in_conv.1": "embed.1",
    "out_conv.0": "score.0",
    "out_conv.2": "score.2",
    "out_conv.4": "score.4",
}
#: Keys only the models tokenprune does not import have, and what those models are.
_NOT_IMPORTED = {
    "fast_path": "an AdaConvNeXt or AdaSwin (DynamicCNN / DynamicSwin) checkpoint",
    "patch_embed.conv": "an LV-ViT checkpoint (not a timm architecture)",
    "aux_head": "an LV-ViT checkpoint (not a timm architecture)",
}
#: The most of a pickle's index (`data.pkl`: keys and structure, not tensor data) read to recognise an official file.
_SNIFF_BYTES = 32 << 20


def is_official_file(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a torch zip checkpoint whose keys include the official predictors (``score_predictor.``),
    decided from the pickle's index without unpickling it."""
    path = Path(path)
    if not (path.is_file() and zipfile.is_zipfile(path)):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            index = next((i for i in z.infolist() if i.filename.endswith("/data.pkl")), None)
            if index is None or index.file_size > _SNIFF_BYTES:
                return False
            return _PREFIX.encode() in z.read(index)
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def load_official(
    path: str | os.PathLike[str], *, ratio: float | None = None, model: nn.Module | None = None
) -> tuple[nn.Module, nn.Module]:
    """(dense, sparse) from an official DynamicViT DeiT checkpoint: the timm DeiT with the file's backbone, and it
    sparsified as the official code prunes it with the file's predictors.

    Args:
        path: the checkpoint (``.pth`` as released, or its tensors re-saved as ``.safetensors``).
        ratio: base keep ratio rho; by default the file's own (``args.base_rate``). A file that does not record it
            needs it given (the released DeiT files are 0.7).
        model: the dense architecture, for a file of another width or depth than the three released (built with
            the official defaults otherwise); not changed.

    Raises:
        CheckpointError: an unreadable file, one that is not an official DeiT checkpoint (naming what it is where
            known), or weights that do not fit the architecture.
        ConfigError: no ratio given or recorded, or one `sparsify` refuses.
    """
    from .. import sparsify
    from ..fx.tracing import model_name
    from ..nn.recorder import selectors

    path = Path(path)
    tensors, args = _read(path)
    backbone = {k: v for k, v in tensors.items() if not k.startswith(_PREFIX)}
    predictors = _predictor_states(tensors, path)
    arch = _arch(args, backbone, path) if model is None else None
    dense = _build(arch, backbone) if model is None else copy.deepcopy(model)
    what = model_name(dense)
    check_fit(dense.state_dict(), backbone, path, f"{what} (the official checkpoint's backbone)")
    dense.load_state_dict(backbone, strict=True)
    ratio = _ratio(ratio, args, path)
    locations = list(arch.locations) if arch is not None else None
    sparse = sparsify(dense, ratio=ratio, locations=locations)
    stages = selectors(sparse)
    if len(stages) != len(predictors):
        raise CheckpointError(
            f"{path} has {len(predictors)} official predictors but {what} sparsifies into {len(stages)} stages; "
            "pass the dense model the file was trained on (model=)."
        )
    for stage, state in zip(stages, predictors, strict=True):
        check_fit(stage.predictor.state_dict(), state, path, f"{what}'s stage {stage.stage} predictor")
        stage.predictor.load_state_dict(state, strict=True)
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


def _predictor_states(tensors: dict[str, torch.Tensor], path: Path) -> list[dict[str, torch.Tensor]]:
    """Per stage, the official predictor's tensors under `TokenPredictor`'s names."""
    for marker, what in _NOT_IMPORTED.items():
        if any(marker in k.split(".") or k.startswith(marker + ".") for k in tensors):
            raise CheckpointError(
                f"{path} looks like {what}; tokenprune imports the official DeiT checkpoints (deit-256, deit-s, "
                "deit-b) only. Fine-tune a tokenprune model from the dense weights instead."
            )
    stages: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(_PREFIX):
            continue
        index, _, rest = key.removeprefix(_PREFIX).partition(".")
        part, _, leaf = rest.rpartition(".")
        if not index.isdigit() or part not in _PREDICTOR_PARTS:
            raise CheckpointError(f"{path}: {key} is not a key of the official predictor (PredictorLG).")
        stages.setdefault(int(index), {})[f"{_PREDICTOR_PARTS[part]}.{leaf}"] = value
    if not stages:
        raise CheckpointError(
            f"{path} holds no official DynamicViT predictors ({_PREFIX}*); for plain dense weights use "
            "tokenprune.create_model(name, checkpoint=path), for tokenprune's own files tokenprune.load."
        )
    if sorted(stages) != list(range(len(stages))):
        raise CheckpointError(f"{path}: predictors {sorted(stages)} are not numbered 0..{len(stages) - 1}.")
    return [stages[i] for i in range(len(stages))]


def _arch(args: dict[str, Any], backbone: dict[str, torch.Tensor], path: Path) -> OfficialArch:
    """The architecture the run's ``args.model`` names, else the released one of the file's width."""
    name = args.get("model")
    if name is None:
        cls = backbone.get("cls_token")
        name = _BY_WIDTH.get(int(cls.shape[-1])) if isinstance(cls, torch.Tensor) and cls.dim() == 3 else None
    if name not in OFFICIAL_TOKEN_MODELS:
        known = ", ".join(OFFICIAL_TOKEN_MODELS)
        said = f"is a {name!r} checkpoint" if name else "does not say which architecture it is (no args.model)"
        raise CheckpointError(
            f"{path} {said} and is not one of the official DeiT models tokenprune builds ({known}); build the "
            "dense model it was trained on and pass it (load_official(path, model=...))."
        )
    return OFFICIAL_TOKEN_MODELS[name]


def _build(arch: OfficialArch, backbone: dict[str, torch.Tensor]) -> nn.Module:
    from ..models import create_model

    head = backbone.get("head.weight")
    classes = int(head.shape[0]) if isinstance(head, torch.Tensor) and head.dim() == 2 else 1000
    return create_model(arch.timm_name, library="timm", num_classes=classes, **arch.kwargs)


def _ratio(ratio: float | None, args: dict[str, Any], path: Path) -> float:
    if ratio is not None:
        return ratio
    recorded = args.get("base_rate")
    if isinstance(recorded, (int, float)) and not isinstance(recorded, bool):
        return float(recorded)
    raise ConfigError(
        f"{path} does not record the keep ratio it was trained at (no args.base_rate); give it: "
        f"`tokenprune convert {path} --ratio 0.7 --out DIR` writes a model file that records it (use DIR "
        "afterwards), load_official(path, ratio=0.7) in Python. The released DeiT checkpoints are all rho = 0.7."
    )
