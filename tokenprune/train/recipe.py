"""Fine-tuning recipes: a typed schema, YAML loading, `key=value` overrides, and the resolved copy saved with a run.

A recipe is plain YAML with the sections below, plus one top-level key, ``task``: "classification" (the default) or
"segmentation" (per-pixel labels, mIoU and pixel accuracy; docs/design.md §3.5). Every key has a default, so a recipe
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

from ..errors import ConfigError

TASKS = ("classification", "segmentation")

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
]


@dataclass
class ModelSection:
    """The teacher (the original model) and how to build it.

    Attributes:
        name: timm or torchvision model name, e.g. ``deit_small_patch16_224`` or ``vit_b_16``.
        pretrained: load the library's pretrained weights (needs them cached or reachable).
        checkpoint: path to teacher weights (a state dict, a safetensors file, or a harness checkpoint).
        kwargs: constructor keywords (timm: img_size, in_chans, embed_dim, depth, ...; torchvision: image_size...).
        library: "timm" or "torchvision" when a name exists in both (``None``: timm first, then torchvision).
        task_head: ``None`` builds the library's model as is (a classifier); ``"fpn"`` builds a segmentation model
            on the timm backbone `name` (``features_only=True`` + torchvision's FeaturePyramidNetwork + a 1x1
            classifier, `tokenprune.models.segmenter`); ``kwargs`` then needs ``num_classes`` and may set
            ``fpn_channels``, the rest go to the backbone.
    """

    name: str = "vit_tiny_patch16_224"
    pretrained: bool = False
    checkpoint: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    library: str | None = None
    task_head: str | None = None


@dataclass
class SparsifySection:
    """Arguments of `tokenprune.sparsify` (docs/design.md §1.1: rho = 0.7 before blocks 3, 6, 9).

    ``enabled: false`` trains the model itself, densely and without a teacher (e.g. to make a teacher).

    Attributes:
        scorer: "predictor" (learned predictors, DynamicViT) or "attention" (training-free attention scores; a
            fine-tuning run then trains the backbone only).
        warm_start_steps: before fine-tuning, train the learned predictors this many steps to reproduce the attention
            scorer's decisions, backbone frozen (`warmstart.py`); 0 = off.
        warm_start_lr: the warm start's learning rate (AdamW on the predictors).
    """

    enabled: bool = True
    ratio: float = 0.7
    locations: list[int] | None = None
    keep_ratios: list[float] | None = None
    scorer: str = "predictor"
    warm_start_steps: int = 0
    warm_start_lr: float = 1e-3


@dataclass
class LearnedRatiosSection:
    """Learn per-stage keep ratios under one compute budget instead of fixing rho^s (see `ratios.py`).

    Attributes:
        enabled: turn the mode on.
        target_flops: the chain's compute as a fraction of dense (e.g. 0.6).
        budget_weight: weight of the squared relative budget error.
        lr: learning rate of the ratio parameters (AdamW, no weight decay).
        mlp_ratio: deprecated and ignored: the cost model is now measured on the model with fvcore.
    """

    enabled: bool = False
    target_flops: float = 0.6
    budget_weight: float = 20.0
    lr: float = 1e-2
    mlp_ratio: float = 4.0


@dataclass
class LossSection:
    """Loss weights (docs/design.md §3.1). ``None`` means the kind's paper default.

    Attributes:
        kind: "auto" (from the sparsified model's config), "token" or "spatial".
        ce: cross-entropy weight.
        ratio: keep-ratio loss weight (token 2.0, spatial 10.0).
        kl: KL(teacher || student) weight on the logits.
        distill: token (KL over channels) or feature-map (MSE) distillation weight.
        distill_type: "auto" (KL for token, MSE for spatial), "kl" or "mse".
        temperature: softmax temperature of the logit KL.
    """

    kind: str = "auto"
    ce: float = 1.0
    ratio: float | None = None
    kl: float = 0.5
    distill: float = 0.5
    distill_type: str = "auto"
    temperature: float = 1.0


@dataclass
class DataSection:
    """Where images come from.

    Attributes:
        source: classification: "imagefolder" (root/train, root/val), "fashion_mnist" (IDX files) or
            "synthetic"; segmentation: "segfolder" (root/<split>/images + root/<split>/masks) or
            "fashion_mnist_scenes" (Fashion-MNIST items composed into canvases; see `train/segdata.py`).
        root: dataset folder; for fashion_mnist the default Debian install path when ``None``.
        train_split: sub-folder of the training images (imagefolder).
        val_split: sub-folder of the validation images (imagefolder).
        img_size: input resolution; ``None`` takes it from the model. Segmentation: the crop size (segfolder) or
            the canvas size (fashion_mnist_scenes).
        num_classes: classes of the synthetic and segfolder sources (others infer it); a segfolder mask value at
            or above it that is not ``ignore_index`` is a `DataError`.
        synthetic_size: images per split of the synthetic source.
        train_subset: use only the first N training images (quick runs); ``None`` for all.
        val_subset: use only the first N validation images; ``None`` for all.
        workers: DataLoader worker processes.
        augment: keyword arguments for ``timm.data.create_transform`` in training (auto_augment, re_prob, ...);
            segmentation sources take ``hflip`` (probability, applied to image and mask together).
        ignore_index: segmentation label of pixels that count in neither loss nor metrics.
        reduce_zero_label: segfolder: label 0 means "unlabelled" (ADE20K's convention): it becomes ignore_index
            and every other label moves down by one.
        scenes: fashion_mnist_scenes: number of training canvases (from the training split).
        val_scenes: fashion_mnist_scenes: number of test canvases (from the test split).
        scene_items: fashion_mnist_scenes: [min, max] items per canvas.
        ink_threshold: fashion_mnist_scenes: an item pixel above this (0-255) is the item's class, else
            background (class 0).
    """

    source: str = "imagefolder"
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    img_size: int | None = None
    num_classes: int = 10
    synthetic_size: int = 64
    train_subset: int | None = None
    val_subset: int | None = None
    workers: int = 4
    augment: dict[str, Any] = field(default_factory=dict)
    ignore_index: int = 255
    reduce_zero_label: bool = False
    scenes: int = 8000
    val_scenes: int = 2000
    scene_items: list[int] = field(default_factory=lambda: [2, 4])
    ink_threshold: int = 50


@dataclass
class OptimSection:
    """Optimisation (docs/design.md §3.2: lr 1e-3 for new modules, backbone scaled by 0.01, 5 warm-up epochs, cosine).

    Attributes:
        epochs: training epochs.
        max_steps: stop after this many optimizer steps (smoke tests, time-boxed runs); ``None`` for no limit.
        batch_size: images per process per forward (the micro-batch).
        global_batch_size: if set, gradient accumulation is derived so that
            batch_size * world_size * accum_steps equals it; otherwise ``accum_steps`` is used.
        accum_steps: micro-batches per optimizer step.
        lr: learning rate of the new modules (predictors, anything named ``tokenprune_``).
        backbone_lr_scale: the backbone's learning rate is ``lr * backbone_lr_scale``.
        weight_decay: AdamW weight decay (not applied to biases and norms).
        betas: AdamW betas.
        warmup_epochs: linear warm-up length (fractions allowed).
        warmup_lr: learning rate of the new-module group at step 0 (other groups scaled alike).
        min_lr: cosine floor of the new-module group (other groups scaled alike).
        clip_grad: max gradient norm; ``None`` for no clipping.
    """

    epochs: float = 30
    max_steps: int | None = None
    batch_size: int = 128
    global_batch_size: int | None = None
    accum_steps: int = 1
    lr: float = 1e-3
    backbone_lr_scale: float = 0.01
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_epochs: float = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    clip_grad: float | None = None


@dataclass
class RunSection:
    """Where and how the run executes.

    Attributes:
        output_dir: checkpoints, metrics.jsonl, recipe.yaml and the final model go here.
        seed: base seed; each process adds its rank for model randomness (Gumbel noise, dropout).
        device: "auto" (cuda if available), "cpu" or "cuda".
        amp: mixed precision on CUDA (ignored on CPU).
        amp_dtype: "bfloat16" or "float16" (the latter with a gradient scaler).
        resume: ``True``/"auto" to resume from output_dir/last.pt when present, or a checkpoint path.
        checkpoint_every: also checkpoint every N optimizer steps (0: only at epoch ends).
        log_every: optimizer steps between progress log lines.
        eval_every: epochs between evaluations (0 disables).
        threads: torch intra-op threads on CPU (``None`` leaves torch's default).
        find_unused_parameters: passed to DistributedDataParallel.
    """

    output_dir: str = "runs/finetune"
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    amp_dtype: str = "bfloat16"
    resume: Any = "auto"
    checkpoint_every: int = 0
    log_every: int = 20
    eval_every: int = 1
    threads: int | None = None
    find_unused_parameters: bool = False


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


def _coerce(key: str, hint: str, value: Any, source: str) -> Any:
    """Check a scalar against its field's type; accept numbers written as strings (YAML reads ``1e-3`` as one)."""
    if value is None or not any(t in hint.split(" | ") for t in ("float", "int", "bool")):
        return value
    if "None" in hint and isinstance(value, str) and value.lower() in ("none", "null"):
        return None
    try:
        if "bool" in hint.split(" | "):
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "false", "1", "0", "yes", "no"):
                return str(value).lower() in ("true", "1", "yes")
            raise ValueError
        if "float" in hint.split(" | "):
            return float(value)
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: recipe key '{key}' should be {hint}, got {value!r}.") from None


@dataclass
class Recipe:
    """A complete, validated fine-tuning recipe (`task` is "classification" or "segmentation")."""

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
                if value not in TASKS:
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
            for key in value:
                if key not in known:
                    listed = ", ".join(sorted(known))
                    raise ConfigError(f"{source}: unknown recipe key '{name}.{key}'; known keys of {name!r}: {listed}.")
            hints = {f.name: str(f.type) for f in dataclasses.fields(_SECTIONS[name])}
            value = {k: _coerce(f"{name}.{k}", hints[k], v, source) for k, v in value.items()}
            sections[name] = _SECTIONS[name](**value)
        recipe = cls(**sections)
        _check_scorer(recipe, source)
        return recipe


def _check_scorer(recipe: Recipe, source: str) -> None:
    from ..nn.select import SCORERS

    sp = recipe.sparsify
    if sp.scorer not in SCORERS:
        raise ConfigError(f"{source}: sparsify.scorer={sp.scorer!r}; choose one of {', '.join(SCORERS)}.")
    if sp.warm_start_steps < 0:
        raise ConfigError(f"{source}: sparsify.warm_start_steps={sp.warm_start_steps} must be >= 0 (0 = off).")
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
        ConfigError: if the file is missing or not valid YAML, or a key is unknown.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read recipe {path}: {e.strerror}; pass an existing YAML file.") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
    recipe = Recipe.from_dict(data, source=source)
    return apply_overrides(recipe, overrides or [])


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """Return a copy of `recipe` with dotted ``key=value`` overrides applied (values parsed as YAML)."""
    data = recipe.to_dict()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value, e.g. optim.lr=5e-4.")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    os.replace(tmp, path)
