"""Fine-tuning recipes: a typed schema, YAML loading, `key=value` overrides, and the resolved copy saved with a run.

A recipe is plain YAML with the sections below, plus one top-level key, ``task``: "classification" (the default),
"segmentation" (per-pixel labels, mIoU and pixel accuracy; docs/design.md §3.5) or "detection" (boxes and labels, a
torchvision detector's own losses, COCO mAP; `tokenprune.detect`). Every key has a default, so a recipe
only states what differs; an unknown key (in the file or on the command line) is a `ConfigError` that names it,
because a typo such as `optim.backbone_lr_sacle=0.1` would otherwise silently train with the default.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import DECISIONS, DEFAULT_RATIO, FAST_PATHS
from ..errors import ConfigError
from .schema import MAX_RECIPE_BYTES, check_value, describe, key, rule_of, safe_yaml

TASKS = ("classification", "segmentation", "detection")

__all__ = [
    "TASKS",
    "ModelSection",
    "SparsifySection",
    "LearnedRatiosSection",
    "LossSection",
    "DataSection",
    "OptimSection",
    "RunSection",
    "Recipe",
    "load_recipe",
    "apply_overrides",
    "save_recipe",
    "describe_recipe",
]


def _scorers() -> tuple[str, ...]:
    from ..nn.select import SCORERS

    return SCORERS


@dataclass
class ModelSection:
    """The teacher (the original model) and how to build it."""

    name: str = key(
        "vit_tiny_patch16_224", "timm or torchvision model name, e.g. deit_small_patch16_224, vit_b_16.", pattern=r".+"
    )
    pretrained: bool = key(False, "Load the library's pretrained weights (needs them cached or reachable).")
    checkpoint: str | None = key(None, "Teacher weights: a state dict, a safetensors file or a harness checkpoint.")
    kwargs: dict[str, Any] = key(
        doc="Constructor keywords (timm: img_size, in_chans, embed_dim, depth, ...; torchvision: image_size, ...); "
        "with task_head: fpn also num_classes and fpn_channels.",
        factory=dict,
    )
    library: str | None = key(
        None, "'timm' or 'torchvision' when a name exists in both (null: timm first).", choices=("timm", "torchvision")
    )
    task_head: str | None = key(
        None,
        "null builds the library's classifier; 'fpn' a segmentation model on the timm backbone `name` "
        "(features_only + FeaturePyramidNetwork + 1x1 classifier, tokenprune.models.segmenter); 'fcos', 'retinanet' "
        "or 'fasterrcnn' a torchvision detector on it (tokenprune.detect.detector; num_classes counts the "
        "background; fix kwargs.min_size to the image size).",
        choices=("fpn", "fcos", "retinanet", "fasterrcnn"),
    )


@dataclass
class SparsifySection:
    """Arguments of `tokenprune.sparsify` (docs/design.md §1.1: rho = 0.7 before blocks 3, 6, 9)."""

    enabled: bool = key(True, "Sparsify; false trains the model itself, densely and without a teacher.")
    ratio: float = key(DEFAULT_RATIO, "The base keep ratio rho.", gt=0, le=1)
    locations: list[int] | None = key(
        None, "Chain indices of the blocks a predictor precedes (null: the default).", ge=0
    )
    keep_ratios: list[float] | None = key(None, "Per-stage keep ratios (null: rho^s).", gt=0, le=1)
    scorer: str = key(
        "predictor",
        "'predictor' (learned, DynamicViT) or 'attention' (training-free; fine-tuning then trains the backbone only).",
        choices=_scorers,
    )
    decisions: str = key(
        "auto",
        "How later stages relate to earlier ones: 'auto' (tokens nested; spatial maps independent, as the official "
        "AdaConvNeXt/AdaSwin), 'nested' or 'independent' (spatial only).",
        choices=DECISIONS,
    )
    fast_path: str = key(
        "block",
        "Spatial fast paths: 'block' (a layer scale only where the block has one, its norm's epsilon: the official "
        "code) or 'scaled' (always a layer scale, epsilon 1e-6).",
        choices=FAST_PATHS,
    )
    warm_start_steps: int = key(
        0,
        "Train the predictors this many steps to imitate the attention scorer before "
        "fine-tuning, backbone frozen (warmstart.py); 0 = off.",
        ge=0,
    )
    warm_start_lr: float = key(1e-3, "The warm start's learning rate (AdamW on the predictors).", gt=0)


@dataclass
class LearnedRatiosSection:
    """Learn per-stage keep ratios under one compute budget instead of fixing rho^s (see `ratios.py`)."""

    enabled: bool = key(False, "Turn the mode on.")
    target_flops: float = key(0.6, "The chain's compute as a fraction of dense.", gt=0, le=1)
    budget_weight: float = key(20.0, "Weight of the squared relative budget error.", ge=0)
    lr: float = key(1e-2, "Learning rate of the ratio parameters (AdamW, no weight decay).", gt=0)
    mlp_ratio: float = key(4.0, "Deprecated and ignored: the cost model is measured on the model with fvcore.", gt=0)


@dataclass
class LossSection:
    """Loss weights (docs/design.md §3.1). ``None`` means the kind's paper default."""

    kind: str = key(
        "auto",
        "'auto' (from the sparsified model's config), 'token' or 'spatial'.",
        choices=("auto", "token", "spatial"),
    )
    ce: float = key(1.0, "Cross-entropy weight.", ge=0)
    ratio: float | None = key(None, "Keep-ratio loss weight (null: token 2.0, spatial 10.0).", ge=0)
    kl: float = key(0.5, "KL(teacher || student) weight on the logits.", ge=0)
    distill: float = key(0.5, "Final-token or feature-map distillation weight.", ge=0)
    distill_type: str = key(
        "auto",
        "'auto' (MSE, the paper's), 'mse' or 'kl' (over channels; not the paper's).",
        choices=("auto", "kl", "mse"),
    )
    temperature: float = key(1.0, "Softmax temperature of the logit KL.", gt=0)
    distill_point: str = key(
        "auto",
        "Where distillation reads the models: 'final' (the official target: tokens after the final norm; the "
        "final-stage map the head pools, normalised per location), 'last_block' (the chain's last block output) "
        "or 'auto' (final where the model has it, else last_block).",
        choices=("auto", "final", "last_block"),
    )


@dataclass
class DataSection:
    """Where images come from."""

    source: str = key(
        "imagefolder",
        "Classification: 'imagefolder' (root/train, root/val), 'fashion_mnist' (IDX files), "
        "'fashion_mnist_objects' (one item on a cluttered canvas) or 'synthetic'; segmentation: 'segfolder' "
        "(root/<split>/images + masks) or 'fashion_mnist_scenes'; detection: 'fashion_mnist_detection' (the scenes "
        "with a box per visible item) or 'coco' (root/images + root/annotations/instances_<split>.json).",
        choices=(
            "imagefolder",
            "fashion_mnist",
            "fashion_mnist_objects",
            "synthetic",
            "segfolder",
            "fashion_mnist_scenes",
            "fashion_mnist_detection",
            "coco",
        ),
    )
    root: str | None = key(None, "Dataset folder; for fashion_mnist the Debian install path when null.")
    train_split: str = key("train", "Sub-folder of the training images (imagefolder, segfolder).", pattern=r".+")
    val_split: str = key("val", "Sub-folder of the validation images (imagefolder, segfolder).", pattern=r".+")
    img_size: int | None = key(
        None, "Input resolution (null: from the model); segmentation: crop or canvas size.", ge=1, le=16384
    )
    num_classes: int = key(10, "Classes of the synthetic and segfolder sources (others infer it).", ge=1, le=1 << 20)
    synthetic_size: int = key(64, "Images per split of the synthetic source.", ge=1, le=1 << 24)
    train_subset: int | None = key(None, "Use only the first N training images (null: all).", ge=1)
    val_subset: int | None = key(None, "Use only the first N validation images (null: all).", ge=1)
    workers: int | None = key(
        None,
        "DataLoader worker processes per training process (null: up to 4, within the CPUs this process may use, "
        "shared among the training processes on its machine, one left for the process itself).",
        ge=0,
        le=1024,
    )
    augment: dict[str, Any] = key(
        doc="Keywords of timm.data.create_transform in training (auto_augment, re_prob, "
        "...); segmentation sources take hflip.",
        factory=dict,
    )
    check_images: str = key(
        "header",
        "Before training, open every image file: 'header' (format and size), 'full' "
        "(decode every pixel; slow on large sets) or 'off'.",
        choices=("off", "header", "full"),
    )
    ignore_index: int = key(
        255, "Segmentation label of pixels that count in neither loss nor metrics.", ge=-(1 << 31), le=(1 << 31) - 1
    )
    reduce_zero_label: bool = key(
        False,
        "segfolder: label 0 is 'unlabelled' (ADE20K); it becomes ignore_index and every other label moves down by one.",
    )
    scenes: int = key(8000, "fashion_mnist_scenes: training canvases.", ge=1, le=1 << 24)
    val_scenes: int = key(2000, "fashion_mnist_scenes: test canvases.", ge=1, le=1 << 24)
    scene_items: list[int] = key(
        doc="fashion_mnist_scenes: [min, max] items per canvas.", factory=lambda: [2, 4], ge=1, le=64, length=2
    )
    ink_threshold: int = key(
        50, "fashion_mnist_scenes: an item pixel above this (0-255) is the item's class.", ge=0, le=255
    )
    canvas: int = key(
        112, "fashion_mnist_objects: side of the generated canvas (resized to the model's input).", ge=1, le=4096
    )
    object_size: list[int] = key(
        doc="fashion_mnist_objects: [min, max] side of the item on the canvas, px (max <= data.canvas).",
        factory=lambda: [28, 56], ge=1, le=4096, length=2,
    )  # fmt: skip
    clutter: float = key(
        0.5, "fashion_mnist_objects: peak intensity of the label-free clutter, a fraction of full ink (0: none).",
        ge=0, le=1,
    )  # fmt: skip


@dataclass
class OptimSection:
    """Optimisation (docs/design.md §3.2: lr 1e-3 for new modules, backbone x 0.01, 5 warm-up epochs, cosine)."""

    epochs: float = key(30, "Training epochs (fractions allowed).", gt=0)
    max_steps: int | None = key(None, "Stop after this many optimizer steps (null: no limit).", ge=1)
    batch_size: int = key(128, "Images per process per forward (the micro-batch).", ge=1, le=1 << 20)
    global_batch_size: int | None = key(
        None, "If set, gradient accumulation is derived so that batch_size x processes x accum_steps equals it.", ge=1
    )
    accum_steps: int = key(1, "Micro-batches per optimizer step.", ge=1, le=1 << 16)
    lr: float = key(1e-3, "Learning rate of the new modules (predictors, anything named tokenprune_).", gt=0)
    backbone_lr_scale: float = key(0.01, "The backbone's learning rate is lr x backbone_lr_scale.", ge=0)
    weight_decay: float = key(0.05, "AdamW weight decay (not applied to biases and norms).", ge=0)
    betas: list[float] = key(doc="AdamW betas.", factory=lambda: [0.9, 0.999], ge=0, lt=1, length=2)
    warmup_epochs: float = key(5, "Linear warm-up length in epochs (fractions allowed).", ge=0)
    warmup_lr: float = key(1e-6, "Learning rate of the new-module group at step 0 (other groups scaled alike).", ge=0)
    min_lr: float = key(1e-5, "Cosine floor of the new-module group (other groups scaled alike).", ge=0)
    clip_grad: float | None = key(None, "Max gradient norm (null: no clipping).", gt=0)


@dataclass
class RunSection:
    """Where and how the run executes (docs/design.md §8: what a run guarantees)."""

    output_dir: str = key(
        "runs/finetune", "Checkpoints, metrics.jsonl, recipe.yaml and final.pt go here.", pattern=r".+"
    )
    seed: int = key(
        0, "Base seed; each process adds its rank for model randomness (Gumbel noise, dropout).", ge=0, le=(1 << 31) - 1
    )
    device: str = key(
        "auto",
        "'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'.",
        pattern=r"auto|cpu|cuda(:\d+)?",
        words="one of 'auto', 'cpu', 'cuda', 'cuda:N'",
    )
    amp: bool = key(True, "Mixed precision on CUDA (ignored on CPU).")
    amp_dtype: str = key(
        "bfloat16", "'bfloat16' or 'float16' (the latter with a gradient scaler).", choices=("bfloat16", "float16")
    )
    resume: Any = key(
        "auto",
        "true/'auto': continue from output_dir/last.pt when present; a path: continue from "
        "that checkpoint; false/'none': start anew.",
    )
    checkpoint_every: int = key(0, "Also checkpoint every N optimizer steps (0: only at epoch ends).", ge=0)
    keep_checkpoints: int = key(2, "Checkpoints kept: last.pt, last.1.pt, ... (all with finite weights).", ge=1, le=100)
    log_every: int = key(20, "Optimizer steps between progress log lines.", ge=1)
    eval_every: int = key(1, "Epochs between evaluations (0 disables).", ge=0)
    threads: int | None = key(None, "Torch intra-op threads on CPU (null: torch's default).", ge=1, le=4096)
    find_unused_parameters: bool = key(False, "Passed to DistributedDataParallel.")


_SECTIONS = {
    "model": ModelSection,
    "sparsify": SparsifySection,
    "learned_ratios": LearnedRatiosSection,
    "loss": LossSection,
    "data": DataSection,
    "optim": OptimSection,
    "run": RunSection,
}

# reason: these take free-form dictionaries whose keys are passed through to timm, so they are not validated here.
_FREE_FORM = {("model", "kwargs"), ("data", "augment")}


@dataclass
class Recipe:
    """A complete, validated fine-tuning recipe (`task` is "classification", "segmentation" or "detection")."""

    task: str = "classification"
    model: ModelSection = field(default_factory=ModelSection)
    sparsify: SparsifySection = field(default_factory=SparsifySection)
    learned_ratios: LearnedRatiosSection = field(default_factory=LearnedRatiosSection)
    loss: LossSection = field(default_factory=LossSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict[str, Any]:
        """Return the recipe as nested plain dictionaries (what `save_recipe` writes)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, source: str = "recipe") -> Recipe:
        """Build a recipe from nested dictionaries, rejecting unknown keys.

        Args:
            data: the parsed YAML (``None`` or ``{}`` gives all defaults).
            source: where the data came from, for error messages.

        Raises:
            ConfigError: on an unknown section or key, or a section that is not a mapping.
        """
        data = data or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a recipe must be a mapping of sections, got {type(data).__name__}.")
        sections: dict[str, Any] = {}
        for name, value in data.items():
            if name == "task":
                if not isinstance(value, str) or value not in TASKS:
                    raise ConfigError(f"{source}: task={value!r} is unknown; use one of {', '.join(TASKS)}.")
                sections["task"] = value
                continue
            if name not in _SECTIONS:
                known = ", ".join(["task", *_SECTIONS])
                raise ConfigError(f"{source}: unknown recipe section {name!r}; known: {known}.")
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: section {name!r} must be a mapping, got {value!r}.")
            known = {f.name for f in dataclasses.fields(_SECTIONS[name])}
            for k in value:
                if k not in known:
                    listed = ", ".join(sorted(known))
                    raise ConfigError(f"{source}: unknown recipe key '{name}.{k}'; known keys of {name!r}: {listed}.")
            fields = {f.name: f for f in dataclasses.fields(_SECTIONS[name])}
            value = {
                k: check_value(f"{name}.{k}", str(fields[k].type), rule_of(fields[k]), v, source)
                for k, v in value.items()
            }
            sections[name] = _SECTIONS[name](**value)
        recipe = cls(**sections)
        _check_together(recipe, source)
        return recipe


def _check_together(recipe: Recipe, source: str) -> None:
    """Rules between keys (each key's own type and range are checked by the schema)."""
    sp = recipe.sparsify
    low, high = recipe.data.scene_items
    if low > high:
        raise ConfigError(f"{source}: data.scene_items={[low, high]} must be [min, max] with min <= max.")
    if sp.scorer == "attention" and recipe.learned_ratios.enabled:
        raise ConfigError(
            f"{source}: learned keep ratios are learned through the predictors' decisions; the attention scorer's "
            "top-k decisions give them no gradient. Use sparsify.scorer=predictor or learned_ratios.enabled=false."
        )
    if sp.scorer == "attention" and sp.warm_start_steps:
        raise ConfigError(
            f"{source}: sparsify.warm_start_steps trains learned predictors to imitate the attention scorer; with "
            "sparsify.scorer=attention there are none. Set one of them back."
        )


def load_recipe(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a YAML recipe and apply ``key=value`` overrides.

    Args:
        path: YAML file; ``None`` starts from the defaults.
        overrides: strings such as ``optim.lr=5e-4`` or ``sparsify.locations=[3,6,9]`` (values parsed as YAML).

    Returns:
        The validated recipe.

    Raises:
        ConfigError: if the file is missing, not valid YAML or uses aliases, a key is unknown or a value is not
            allowed (each key's type and range: `describe_recipe`).
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            if Path(path).stat().st_size > MAX_RECIPE_BYTES:
                raise ConfigError(f"recipe {path} is larger than {MAX_RECIPE_BYTES} bytes; a recipe is a few KB.")
            text = Path(path).read_text(errors="replace")
        except OSError as e:
            raise ConfigError(f"cannot read recipe {path}: {e.strerror}; pass an existing YAML file.") from None
        data = safe_yaml(text, f"recipe {path}") or {}
    recipe = Recipe.from_dict(data, source=source)
    return apply_overrides(recipe, overrides or [])


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """Return a copy of `recipe` with dotted ``key=value`` overrides applied (values parsed as YAML)."""
    data = recipe.to_dict()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value, e.g. optim.lr=5e-4.")
        # text that is not YAML (e.g. a path with a colon) is taken as the string it is
        value = safe_yaml(raw, f"override {key}", text_if_invalid=True) if raw != "" else None
        parts = key.strip().split(".")
        if parts == ["task"]:
            data["task"] = value
            continue
        if parts[0] not in _SECTIONS or len(parts) < 2:
            listed = ", ".join(_SECTIONS)
            raise ConfigError(f"unknown recipe key {key!r}; keys look like section.name, sections: {listed}.")
        if (parts[0], parts[1]) not in _FREE_FORM and len(parts) > 2:
            raise ConfigError(f"unknown recipe key {key!r}: {parts[0]}.{parts[1]} has no sub-keys.")
        node = data[parts[0]]
        if parts[1] not in node:
            raise ConfigError(f"unknown recipe key {key!r}; known keys of {parts[0]!r}: {', '.join(sorted(node))}.")
        for part in parts[1:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return Recipe.from_dict(data, source="overrides")


def save_recipe(recipe: Recipe, path: str | os.PathLike[str]) -> None:
    """Write the resolved recipe as YAML (atomically, so a crash never leaves half a file)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        os.replace(tmp, path)
    except OSError as e:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write the recipe to {path}: {e.strerror or e}; check run.output_dir.") from None


def describe_recipe() -> list[dict[str, str]]:
    """Every recipe key with its type, allowed values, default and doc (the schema the validator uses)."""
    task = {
        "key": "task",
        "type": "str",
        "allowed": "one of " + ", ".join(map(repr, TASKS)),
        "default": "'classification'",
        "doc": "Classification (top-1), segmentation (per-pixel labels, mIoU; docs/design.md §3.5) or detection "
        "(boxes; the detector's losses, COCO mAP).",
    }
    return [task, *describe(_SECTIONS)]
