"""The fine-tuning objective of DynamicViT (docs/design.md §3.1) and its spatial variant.

Token models::

    L = ce * CE(y, p) + ratio * (1/S) sum_s mean_b (mean_i D_s - rho_s)^2
        + kl * KL(p_teacher || p_student) + distill * token_MSE

where token_MSE is the mean squared difference between the student's final tokens and the teacher's at the positions
the student kept (patch tokens only), both after the model's final norm where it has one, as in the official
DynamicViT code (`mse_token=True`). ``distill_type: kl`` compares them by a KL over channels instead (an option, not
the paper's). Spatial models use the MSE between the final feature maps and weight the ratio term 10 instead of 2.
Each part is returned separately so the trainer can log it.

Segmentation (docs/design.md §3.5) replaces CE(y, p) by the per-pixel cross-entropy over labelled pixels (the
ignore label, 255, counts nowhere) and the logit KL by a per-pixel KL averaged over pixels; the ratio and
feature-map terms are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..nn.recorder import DistillationPoint
from ..state import SparsityState

__all__ = [
    "LossWeights",
    "LossOutput",
    "SparsificationLoss",
    "ratio_loss",
    "logit_distillation",
    "token_distillation",
    "distillation_point",
    "hook_teacher",
    "sparsity_terms",
    "feature_distillation",
    "classification_loss",
    "segmentation_loss",
    "pixel_distillation",
]

# docs/design.md §3.1 (DeiT: lambda_r = 2; ConvNeXt/Swin: 10); CE 1.0 and KL 0.5 in both.
_RATIO_DEFAULT = {"token": 2.0, "spatial": 10.0}
_DISTILL_DEFAULT = {"token": "mse", "spatial": "mse"}
#: Where distillation reads the models: "final" the model's final features after its final norm (the official code's
#: target: tokens after the norm; the final-stage map the head pools, normalised per location), "last_block" the
#: chain's last block output (tokenprune's earlier target), "auto" final where the model has it, else last_block.
DISTILL_POINTS = ("auto", "final", "last_block")


@dataclass
class LossWeights:
    """Weights of the loss parts, resolved for one model kind.

    Attributes:
        kind: "token" or "spatial".
        ce: cross-entropy weight.
        ratio: keep-ratio loss weight.
        kl: logit distillation weight, KL(teacher || student).
        distill: final-token (or feature-map) distillation weight.
        distill_type: "mse" (the paper's) or "kl" (over channels; an option, not the paper's).
        temperature: logit-distillation temperature.
        distill_point: where distillation reads the models, one of `DISTILL_POINTS`.
    """

    kind: str = "token"
    ce: float = 1.0
    ratio: float = 2.0
    kl: float = 0.5
    distill: float = 0.5
    distill_type: str = "mse"
    temperature: float = 1.0
    distill_point: str = "auto"

    @classmethod
    def for_kind(
        cls,
        kind: str,
        *,
        ce: float = 1.0,
        ratio: float | None = None,
        kl: float = 0.5,
        distill: float = 0.5,
        distill_type: str = "auto",
        temperature: float = 1.0,
        distill_point: str = "auto",
    ) -> LossWeights:
        """Paper defaults for `kind` ("token" or "spatial"), with any weight overridden.

        Raises:
            ConfigError: on an unknown kind or distillation type, or a negative weight.
        """
        if kind not in _RATIO_DEFAULT:
            raise ConfigError(f"loss kind {kind!r} is unknown; use 'token' or 'spatial'.")
        distill_type = _DISTILL_DEFAULT[kind] if distill_type == "auto" else distill_type
        if distill_type not in ("kl", "mse"):
            raise ConfigError(f"loss.distill_type={distill_type!r} is unknown; use 'auto', 'kl' or 'mse'.")
        if distill_point not in DISTILL_POINTS:
            choices = ", ".join(map(repr, DISTILL_POINTS))
            raise ConfigError(f"loss.distill_point={distill_point!r} is unknown; use one of {choices}.")
        ratio = _RATIO_DEFAULT[kind] if ratio is None else ratio
        weights = cls(kind, ce, ratio, kl, distill, distill_type, temperature, distill_point)
        for name in ("ce", "ratio", "kl", "distill", "temperature"):
            if not getattr(weights, name) >= 0:
                raise ConfigError(f"loss.{name}={getattr(weights, name)!r} must be a non-negative number.")
        return weights


@dataclass
class LossOutput:
    """The total loss and its unweighted parts (``ce``, ``ratio``, ``kl``, ``distill``), all scalar tensors."""

    total: Tensor
    parts: dict[str, Tensor]


def classification_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy with hard labels [B] or soft targets [B, K] (mixup/cutmix)."""
    if target.dtype.is_floating_point and target.dim() == logits.dim():
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return F.cross_entropy(logits.float(), target)


def segmentation_loss(logits: Tensor, target: Tensor, ignore_index: int = 255) -> Tensor:
    """Per-pixel cross-entropy of logits [B, K, H, W] against labels [B, H, W], over pixels not `ignore_index`.

    Zero (with a gradient path) when every pixel of the batch is ignored, instead of PyTorch's NaN.
    """
    if not bool((target != ignore_index).any()):
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index)


def pixel_distillation(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_teacher || p_student) over the classes of each pixel (dim 1 of [B, K, H, W]), averaged over pixels."""
    k = student.shape[1]
    flat = [t.movedim(1, -1).reshape(-1, k) for t in (student, teacher)]
    return logit_distillation(flat[0], flat[1], temperature)


def ratio_loss(decisions: list[Tensor], keep_ratios: Tensor | list[float]) -> Tensor:
    """(1/S) sum_s mean_b (mean_i D_s - rho_s)^2 (docs/design.md §3.1).

    Args:
        decisions: per-stage keep decisions, [B, ...] each (tokens or spatial locations after the batch dim).
        keep_ratios: the per-stage targets rho_s, a list or a (possibly learnable) tensor [S].
    """
    if not decisions:
        raise ConfigError("the model recorded no pruning stages; is it a result of tokenprune.sparsify?")
    device = decisions[0].device
    if isinstance(keep_ratios, Tensor):
        rho = keep_ratios.to(device=device, dtype=torch.float32)  # keeps the graph of learned ratios
    else:
        rho = torch.tensor([float(r) for r in keep_ratios], dtype=torch.float32, device=device)
    if rho.numel() != len(decisions):
        raise ConfigError(f"{len(decisions)} pruning stages but {rho.numel()} keep ratios; they must match.")
    total = decisions[0].new_zeros((), dtype=torch.float32)
    for s, d in enumerate(decisions):
        kept = d.float().flatten(1).mean(1)
        total = total + ((kept - rho[s]) ** 2).mean()
    return total / len(decisions)


def logit_distillation(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_teacher || p_student) per image, averaged over the batch, scaled by T^2 (Hinton et al.)."""
    t = temperature
    loss = F.kl_div(
        F.log_softmax(student.float() / t, dim=-1),
        F.log_softmax(teacher.float() / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return loss * t * t


def token_distillation(state: SparsityState, teacher_tokens: Tensor, kind: str = "kl", point: str = "auto") -> Tensor:
    """Compare the student's final tokens with the teacher's at the positions the student kept (patch tokens only).

    Both are taken after the model's final norm where it has one (`state.final_norm`), else at the chain's output.
    Works in masked (train) execution, where the final tokens have the full length and a keep mask, and in pruned
    execution, where `state.final_index` says where each kept token came from.

    Args:
        state: the student's `SparsityState` of this forward.
        teacher_tokens: the teacher's output of the module named `distillation_point(state)`, [B, N, C].
        kind: "mse" (the official DynamicViT objective: mean squared error over the kept tokens' channels) or "kl"
            (KL over channels; not the paper's).
        point: one of `DISTILL_POINTS`; "last_block" compares the chain's output, before any final norm.

    Returns:
        The mean over kept patch tokens (zero if none is kept).
    """
    student = state.final_normed if _reads_final(state, point) else state.final_tokens
    if student is None or state.final_index is None:
        raise ConfigError(
            "the student recorded no final tokens (after its final norm, where it has one); token distillation needs "
            "a token model in masked (training) execution."
        )
    index = state.final_index.long()
    teacher = torch.gather(teacher_tokens, 1, index.unsqueeze(-1).expand(-1, -1, teacher_tokens.shape[-1]))
    keep = index >= state.prefix_tokens
    if state.final_mask is not None:
        # reason: the mask only selects positions; gradients reach the tokens through their values (as in the paper).
        keep = keep & (state.final_mask.detach().reshape(index.shape) > 0.5)
    if not bool(keep.any()):
        return student.new_zeros((), dtype=torch.float32)
    s, t = student[keep].float(), teacher[keep].float()
    if kind == "mse":
        return F.mse_loss(s, t)
    return F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), reduction="batchmean", log_target=True)


def _reads_final(state: SparsityState, point: str) -> bool:
    """Whether distillation reads the model's final normalised features (else the chain's last block output): the one
    place that decides it for the student (`sparsity_terms`) and the teacher (`distillation_point`).

    Raises:
        ConfigError: "final" asked of a model that has no such features.
    """
    has = state.final_map is not None or state.final_norm is not None
    if point == "final" and not has:
        raise ConfigError(
            "loss.distill_point='final' needs the model's final normalised features, and this model has none (no "
            "final per-token norm after the chain; or no map pooled by its head, as in a features_only backbone); "
            "use 'auto' or 'last_block'."
        )
    return has and point != "last_block"


def distillation_point(state: SparsityState, point: str = "auto") -> DistillationPoint:
    """Where the teacher is read: the module whose output (normalised by `DistillationPoint.norm` where named) is
    compared with the student's. Token models: the final norm where the model has one, else the chain's last block;
    spatial models: the final-stage map the head pools, normalised per location by the model's final norm
    (`SparsityState.final_map`), else the chain's last block. ``point="last_block"`` always reads the chain's last
    block (docs/design.md §3.1)."""
    if not _reads_final(state, point):
        return DistillationPoint(state.chain_output)
    return state.final_map or DistillationPoint(state.final_norm)


def hook_teacher(teacher: nn.Module, state: SparsityState, point: str, sink) -> torch.utils.hooks.RemovableHandle:
    """Register a forward hook that passes the teacher's features at `distillation_point(state, point)` to `sink`.

    Raises:
        ConfigError: the teacher has no module of that name (it must be the original, dense model).
    """
    where = distillation_point(state, point)
    try:
        module = teacher.get_submodule(where.module)
        if where.norm is not None:
            teacher.get_submodule(where.norm)
    except AttributeError:
        raise ConfigError(
            f"the teacher ({type(teacher).__name__}) has no module {where.module!r} or {where.norm!r}, where the "
            "student's distillation features are read; the teacher must be the original (dense) model."
        ) from None
    return module.register_forward_hook(lambda _m, _i, out: sink(where.features(teacher, out)))


def feature_distillation(student_map: Tensor, teacher_map: Tensor) -> Tensor:
    """MSE between the student's and the teacher's final feature maps (docs/design.md §3.1; the map keeps its shape)."""
    if student_map.shape != teacher_map.shape:
        raise ConfigError(
            f"student feature map {tuple(student_map.shape)} and teacher's {tuple(teacher_map.shape)} differ."
        )
    return F.mse_loss(student_map.float(), teacher_map.float())


def sparsity_terms(
    weights: LossWeights, state: SparsityState | None, teacher_features: Tensor | None, keep_ratios: Tensor | None
) -> dict[str, Tensor]:
    """The method's own terms, whatever the task's loss: the keep-ratio loss and the final-token (token models) or
    final-map (spatial models) distillation, each present when its weight is non-zero and the model is sparsified.

    Raises:
        ConfigError: a distillation weight without the teacher's features.
    """
    terms: dict[str, Tensor] = {}
    if state is None:
        return terms
    if weights.ratio > 0:
        terms["ratio"] = ratio_loss(state.decisions, state.keep_ratios if keep_ratios is None else keep_ratios)
    if weights.distill > 0:
        if teacher_features is None:
            raise ConfigError("loss.distill > 0 needs the teacher's final features; set loss.distill=0 if none.")
        point = weights.distill_point
        if weights.kind == "spatial":
            student = state.final_normed if _reads_final(state, point) else state.final_tokens
            terms["distill"] = feature_distillation(student, teacher_features)
        else:
            terms["distill"] = token_distillation(state, teacher_features, weights.distill_type, point)
    return terms


def _first_output(outputs, weights: LossWeights) -> Tensor:
    """The first tensor of a multi-output model's result; CE and logit KL have no logits to compare there."""
    from ..outputs import named_outputs

    named = named_outputs(outputs, "the student")
    if weights.ce > 0 or weights.kl > 0:
        raise ConfigError(
            f"the model returns {len(named)} outputs ({', '.join(n for n, _ in named)}), not logits, so cross-entropy "
            "and logit distillation cannot be computed; set loss.ce=0 and loss.kl=0 (the ratio and feature "
            "distillation parts still train the stages), or use a task loss for these outputs."
        )
    return named[0][1]


class SparsificationLoss(nn.Module):
    """The weighted DynamicViT objective; ``forward`` returns the total and each unweighted part.

    Args:
        weights: resolved weights (see `LossWeights.for_kind`).
        task: "classification" (logits [B, K]) or "segmentation" (logits [B, K, H, W], labels [B, H, W]).
        ignore_index: segmentation label that counts in no loss.
    """

    def __init__(self, weights: LossWeights, task: str = "classification", ignore_index: int = 255) -> None:
        super().__init__()
        if task not in ("classification", "segmentation"):
            raise ConfigError(f"task {task!r} is unknown; use 'classification' or 'segmentation'.")
        self.weights, self.task, self.ignore_index = weights, task, ignore_index

    def forward(
        self,
        logits: Tensor,
        target: Tensor,
        state: SparsityState | None,
        teacher_logits: Tensor | None = None,
        teacher_features: Tensor | None = None,
        keep_ratios: Tensor | None = None,
    ) -> LossOutput:
        """Compute the loss of one batch.

        Args:
            logits: the student's output [B, K]; a dict, list or tuple of feature maps is accepted when the CE and
                KL weights are 0 (ratio and feature distillation only; otherwise `ConfigError`).
            target: labels [B] or soft targets [B, K].
            state: the student's `SparsityState` of this forward (``None`` for a dense model: CE and KL only).
            teacher_logits: the frozen teacher's output [B, K], needed when the KL weight is non-zero.
            teacher_features: the teacher's features at ``distillation_point(state, weights.distill_point)``
                (`hook_teacher` collects them).
            keep_ratios: targets rho_s overriding ``state.keep_ratios`` (learned ratios pass their tensor here).
        """
        w = self.weights
        if self.task == "segmentation":
            zero = logits.new_zeros((), dtype=torch.float32)
            parts = {"ce": segmentation_loss(logits, target, self.ignore_index), "ratio": zero, "kl": zero,
                     "distill": zero}  # fmt: skip
        elif isinstance(logits, Tensor):
            zero = logits.new_zeros((), dtype=torch.float32)
            parts = {"ce": classification_loss(logits, target), "ratio": zero, "kl": zero, "distill": zero}
        else:  # several feature maps (dict/list/tuple), no logits: docs/design.md §5.5
            zero = _first_output(logits, w).new_zeros((), dtype=torch.float32)
            parts = {"ce": zero, "ratio": zero, "kl": zero, "distill": zero}
        parts.update(sparsity_terms(w, state, teacher_features, keep_ratios))
        if w.kl > 0:
            if teacher_logits is None:
                raise ConfigError("loss.kl > 0 needs the teacher's logits; pass a teacher or set loss.kl=0.")
            distill = pixel_distillation if self.task == "segmentation" else logit_distillation
            parts["kl"] = distill(logits, teacher_logits, w.temperature)
        total = w.ce * parts["ce"] + w.ratio * parts["ratio"] + w.kl * parts["kl"] + w.distill * parts["distill"]
        return LossOutput(total, parts)
