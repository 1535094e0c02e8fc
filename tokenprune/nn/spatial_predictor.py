"""Stages of a spatial chain: the location-importance predictor, the selector, and the recorder (docs/design.md §1.2).

By default each stage decides *independently*, as the official AdaConvNeXt/AdaSwin do: it scores every location
(the predictor's global feature averaged over all of them) and keeps its own top k of H*W, so a location a stage
sent to the fast path may take the slow path again after the next one. ``nested=True`` decides as token stages do
(§1.1): D_s = sample_s * D_{s-1}, top-k among the locations the previous stage kept. Keep ratios are fractions of
all H*W locations and never increase. A stage's decision holds for every block after it until the next stage's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TokenPruneError
from ..state import SparsityState
from .predictor import TokenPredictor
from .recorder import DistillationPoint, SparsityRecorder
from .select import TokenSelector, positions, top_k

__all__ = ["SpatialPredictor", "SpatialSelector", "SpatialRecorder"]


def _locations(x: torch.Tensor, channel: int) -> torch.Tensor:
    """Map [B, C, H, W] or [B, H, W, C] (channel dim `channel`) -> row-major locations [B, H*W, C]."""
    return x.movedim(channel, -1).flatten(1, -2)


class SpatialPredictor(TokenPredictor):
    """The token predictor applied per location of a feature map (arXiv 2207.01580, spatial predictor).

    The paper writes it with 1x1 convolutions; a Linear over the channels of each location is the same map, so the
    layers are `TokenPredictor`'s: z = GELU(Linear(LayerNorm(x))), half of z local, half averaged over the kept
    locations (the "global feature = spatial mean"), then C -> C/2 -> C/4 -> 2 with a log-softmax.

    Args:
        dim: channel count C (even).
        channel: the channel dim of the maps it reads (1 for [B, C, H, W], 3 for [B, H, W, C]).
    """

    def __init__(self, dim: int, channel: int) -> None:
        super().__init__(dim)
        self.embed[0].eps = 1e-6  # the official spatial predictor's LayerNorm
        self.channel = channel

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            x: feature map, channel dim `self.channel`.
            policy: [B, H*W, 1] keep mask of the locations, or None when all are kept.

        Returns:
            [B, H*W, 2] log-probabilities of (keep, drop) per location.
        """
        return super().forward(_locations(x, self.channel), policy)


class SpatialSelector(TokenSelector):
    """One stage of a spatial chain: scores locations and decides which take the slow path in later blocks.

    Same interface as `TokenSelector` (`keep_ratio`, `stage`, `execution`, `last_decision`, `keep_count`), so
    `tokenprune.selectors`, `set_execution` and the trainer treat both alike. The map itself is never shortened.

    Args:
        dim: channel count C of the chain's maps.
        keep_ratio: fraction of all H*W locations whose slow path runs after this stage.
        stage: index of this stage.
        channel: channel dim of the chain's maps.
        nested: decide among the locations the previous stage kept (D_s = sample * D_{s-1}, the global feature
            averaged over them), as token stages do; False (the official AdaConvNeXt/AdaSwin): every stage scores
            every location, averages the global feature over all of them and keeps its own top k of H*W.
    """

    def __init__(self, dim: int, keep_ratio: float, stage: int, channel: int, nested: bool = False) -> None:
        super().__init__(dim, keep_ratio, 0, stage)
        self.predictor = SpatialPredictor(dim, channel)
        self.channel = channel
        self.nested = nested

    def extra_repr(self) -> str:
        return (
            f"stage={self.stage}, keep_ratio={self.keep_ratio:.4f}, channel={self.channel}, "
            f"decisions={'nested' if self.nested else 'independent'}"
        )

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, mask: torch.Tensor | None, keep: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Args:
            x: the map entering the next block.
            mask: [B, H*W, 1] the previous stage's mask (masked execution), or None.
            keep: [B, k'] the previous stage's kept locations (gathered execution), or None.

        Returns:
            (mask, keep, drop): masked execution gives the new [B, H*W, 1] mask and None, None; gathered execution
            gives None and the sorted kept [B, k] and dropped [B, H*W - k] location indices.
        """
        locations = x.numel() // (x.shape[0] * x.shape[self.channel])  # H*W
        previous = mask if self.nested else None
        if previous is None and keep is not None and self.nested:
            previous = torch.zeros(x.shape[0], locations, 1, device=x.device).scatter(1, keep.unsqueeze(-1), 1.0)
        log_probs = self.predictor(x, previous)
        self.last_initial_patches = locations
        k = self.keep_count(locations)
        if self.pruned() or not self.training:
            kept, dropped = self._split(log_probs[..., 0], previous, k)
            decision = torch.zeros_like(log_probs[..., :1]).scatter(1, kept.unsqueeze(-1), 1.0)
            if self.pruned():
                self.last_decision, self.last_index = decision, kept
                return None, kept, dropped
        else:
            # Hard sample, straight-through gradients (docs/design.md §1.2); nested: D_s = sample * D_s-1.
            decision = F.gumbel_softmax(log_probs, hard=True)[..., :1]
            if previous is not None:
                decision = decision * previous
        self.last_decision, self.last_index = decision, None
        return decision, None, None

    @staticmethod
    def _split(score: torch.Tensor, previous: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k among the locations still kept, and the rest; both sorted (row-major order reads and scatters best)."""
        if previous is not None:
            score = score.masked_fill(previous[..., 0] == 0, float("-inf"))
        keep = top_k(score, k)
        k = min(k, score.shape[1])
        return positions(keep, k), positions(~keep, score.shape[1] - k)


class SpatialRecorder(SparsityRecorder):
    """Identity on the chain's final map that remembers it for the losses (feature-map MSE distillation); called a
    second time (``final=True``) on the final-stage map the head pools, where the model has one.

    `state()` fills `SparsityState` as follows: `decisions` are each stage's [B, H*W, 1] mask (its own, or nested;
    top-k masks without gradient in eval); `final_tokens` is the chain's last block output in its own layout ([B, C,
    H, W] or [B, H, W, C]), which is what the teacher's block of the same name outputs; `final_mask` is the last
    stage's mask (the locations whose last blocks ran the slow path); `final_index` is None, because the map keeps
    its layout and location l of the student's map is location l of the teacher's; `prefix_tokens` is 0;
    `final_map` says where the final-stage map is read and `final_normed` holds it, normalised by the student's own
    final norm (docs/design.md §3.1).
    """

    _transient = SparsityRecorder._transient + ("last_map",)

    def __init__(self, chain_output: str, prefix_tokens: int = 0) -> None:
        super().__init__(chain_output, prefix_tokens)
        self.chain_local = chain_output  # `chain_output` is qualified when a part of a model is sparsified
        self.final_map: str | None = None  # the module whose output is the final-stage map (`fx/spatial.final_map`)
        self.final_map_norm: str | None = None  # the LayerNorm the head applies after pooling it, if any
        self.final_map_channel = -1
        self.last_map: torch.Tensor | None = None

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        final: bool = False,
    ) -> torch.Tensor:
        if final:
            self.last_map = x
        else:
            self.last_tokens, self.last_policy, self.last_map = x, mask, None
        return x

    def _final_map(self, root: nn.Module | None) -> tuple[DistillationPoint | None, torch.Tensor | None]:
        """The final map's point (names qualified in the whole model) and the student's normalised map."""
        name = getattr(self, "final_map", None)  # files pickled before the final map was recorded have none
        if name is None or self.last_map is None:
            return None, None
        local = DistillationPoint(name, self.final_map_norm, self.final_map_channel)
        if local.norm is not None and root is None:
            raise TokenPruneError("the sparsified model's final norm is needed: call tokenprune.sparsity_state(model).")
        prefix = self.chain_output.removesuffix(self.chain_local)
        qualified = DistillationPoint(
            prefix + name, prefix + local.norm if local.norm else None, self.final_map_channel
        )
        return qualified, local.features(root, self.last_map)

    def state(self, selectors: list[TokenSelector], root: nn.Module | None = None) -> SparsityState:
        """Assemble the state of the last forward from this recorder and the model's stages, in stage order."""
        if self.last_tokens is None:
            return super().state(selectors)  # raises the "has not run a forward pass yet" error
        decisions = [sel.last_decision for sel in selectors]
        ratios = torch.tensor([float(sel.keep_ratio) for sel in selectors])
        final_mask = decisions[-1] if decisions else None
        point, normed = self._final_map(root)
        return SparsityState(
            decisions, ratios, self.last_tokens, final_mask, None, 0, self.chain_output, None, normed, point
        )
