"""Parameter groups and the learning-rate schedule (docs/design.md §3.2).

The new modules (predictors and anything the rewrite named ``tokenprune_...``) train at ``lr``; the pretrained
backbone at ``lr * backbone_lr_scale`` (0.01 for DeiT, 0.2 for ConvNeXt), so the predictors can learn quickly
without wrecking features the teacher already has. Biases and norm weights get no weight decay (timm's convention).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["is_new_parameter", "original_parameter_names", "param_groups", "build_optimizer", "warmup_cosine"]


def is_new_parameter(name: str, original: set[str]) -> bool:
    """A parameter the sparsification added: not in the original model, or under a ``tokenprune_`` module."""
    return name not in original or "tokenprune_" in name or ".predictor." in f".{name}"


def original_parameter_names(model: nn.Module, teacher: nn.Module | None = None) -> set[str]:
    """Names of the parameters of a sparsified `model` that come from the pretrained network.

    Those are the ones outside the modules tokenprune inserted (the classes of `tokenprune.nn`: stages, predictors,
    fast paths), further restricted to the teacher's parameter names when a teacher is given. The teacher is not
    needed: a student trained without distillation still has a backbone to train at ``backbone_lr_scale``.
    """
    # reason: structural, not by name: a fast path is called "fast_path" unless that name was taken.
    ours = [m for m in model.modules() if type(m).__module__.startswith("tokenprune.nn.")]
    inserted = {id(p) for m in ours for p in m.parameters()}
    names = {n for n, p in model.named_parameters() if id(p) not in inserted}
    if teacher is not None:
        names &= {n for n, _ in teacher.named_parameters()}
    return names


def param_groups(
    model: nn.Module,
    original_names: Iterable[str],
    *,
    lr: float,
    backbone_lr_scale: float,
    weight_decay: float,
) -> list[dict]:
    """AdamW groups: new/backbone x decay/no-decay, each tagged with a ``name`` for logging.

    Args:
        model: the sparsified student.
        original_names: parameter names of the original (teacher) model.
        lr: learning rate of the new modules.
        backbone_lr_scale: factor of the backbone's learning rate.
        weight_decay: weight decay of matrices and convolution kernels.
    """
    original = set(original_names)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and not name.endswith(".bias")
        groups.setdefault((is_new_parameter(name, original), decay), []).append(p)
    out = []
    for (new, decay), params in sorted(groups.items(), reverse=True):
        out.append(
            {
                "name": f"{'new' if new else 'backbone'}{'' if decay else '_no_decay'}",
                "params": params,
                "lr": lr if new else lr * backbone_lr_scale,
                "weight_decay": weight_decay if decay else 0.0,
            }
        )
    return out


def build_optimizer(groups: list[dict], betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """AdamW over `groups` (the paper's optimizer)."""
    return torch.optim.AdamW(groups, betas=tuple(betas))


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int,
    start_factor: float,
    end_factor: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warm-up from `start_factor` to 1, then cosine down to `end_factor`.

    Factors multiply every group's base learning rate, so the backbone's scale is kept throughout.
    """
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return start_factor + (1.0 - start_factor) * step / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return end_factor + (1.0 - end_factor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
