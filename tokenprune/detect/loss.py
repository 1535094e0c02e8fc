"""The fine-tuning objective of a sparsified detector: the detector's own losses plus the sparsification terms.

    L = ce * sum(detector's train-mode losses) + ratio * ratio loss + distill * backbone feature distillation

The detector's losses (FCOS: classification, box regression, centerness; RetinaNet: classification, box regression;
Faster R-CNN: RPN objectness and boxes, box classifier and boxes) take the place of the classification
cross-entropy, so they carry the ``ce`` weight. The ratio loss is the paper's (mean over stages of
(mean keep - target)^2); the distillation compares the student's chain output with the teacher's, both computed on
the same transformed images (the detector's transform is deterministic): the feature-map MSE for spatial backbones,
the final-token term for ViTs (`tokenprune.train.losses`). A detector has no logits to distill, so the ``kl``
weight must be 0.
"""

from __future__ import annotations

from torch import Tensor

from ..errors import ConfigError
from ..state import SparsityState

__all__ = ["DetectionLoss"]


class DetectionLoss:
    """The weighted objective; calling it returns a `LossOutput` with the total and every unweighted part.

    Args:
        weights: a `tokenprune.train.losses.LossWeights` (``ce`` weighs the detector's losses; ``kl`` must be 0).

    Raises:
        ConfigError: a non-zero ``kl`` weight.
    """

    task = "detection"

    def __init__(self, weights) -> None:
        if weights.kl > 0:
            raise ConfigError(
                f"loss.kl={weights.kl}: a detector returns boxes, not logits, so there is nothing for logit "
                "distillation to compare; set loss.kl: 0 (the feature distillation, loss.distill, still applies)."
            )
        self.weights = weights

    def __call__(
        self,
        losses: dict[str, Tensor],
        state: SparsityState | None,
        teacher_features: Tensor | None = None,
        keep_ratios: Tensor | None = None,
    ):
        """Compute the loss of one batch.

        Args:
            losses: the detector's train-mode output (a dict of scalar losses).
            state: the student's `SparsityState` of this forward (``None`` for a dense detector).
            teacher_features: the teacher's output of the block named ``state.chain_output``.
            keep_ratios: targets rho_s overriding ``state.keep_ratios`` (learned ratios).
        """
        from ..train.losses import LossOutput, sparsity_terms

        if not isinstance(losses, dict) or not losses:
            raise ConfigError(
                f"a detector in train mode returns a dict of losses; got {type(losses).__name__}. task: detection "
                "needs a torchvision detector (model.task_head: fcos, retinanet or fasterrcnn)."
            )
        w = self.weights
        detection = sum(v.float() for v in losses.values())
        zero = detection.new_zeros(())
        parts = {"ce": detection, "ratio": zero, "kl": zero, "distill": zero}
        parts.update({f"det_{k}": v.detach().float() for k, v in losses.items()})  # each term, for the log
        parts.update(sparsity_terms(w, state, teacher_features, keep_ratios))
        total = w.ce * parts["ce"] + w.ratio * parts["ratio"] + w.distill * parts["distill"]
        return LossOutput(total, parts)
