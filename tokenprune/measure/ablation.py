"""Ablations of a sparsified model's decisions: random tokens or locations, and fixed keep fractions.

They answer "what is the choice worth?": the same model with each stage keeping as many tokens (or locations) chosen
at random, and with every stage keeping everything or almost nothing — the bounds between which any choice lies.
Used by the proofs (`examples/*_proof.py`) and usable on any model `tokenprune.sparsify` returned.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..nn.recorder import selectors

__all__ = ["RandomScores", "use_random_scores", "random_decisions", "fixed_keep"]


class RandomScores(nn.Module):
    """Stands in for a stage's scorer: uniform random keep scores, so the stage's top-k keeps a random subset of the
    size its keep ratio asks for (among the tokens or locations still kept: the stage masks the others).

    It takes what the stage passes its scorer: tokens [B, N, C], a map whose channel dim is `channel` (spatial
    stages), or scores [B, N] (the attention scorer).

    Args:
        channel: the channel dim of the maps or tokens it reads (-1: channels last).
        seed: seeds its own generator; None draws from the global one (which the trainer seeds and checkpoints).
    """

    def __init__(self, channel: int = -1, seed: int | None = None) -> None:
        super().__init__()
        self.channel = channel
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor, *_: object) -> torch.Tensor:
        count = x.shape[1] if x.dim() == 2 else x.numel() // (x.shape[0] * x.shape[self.channel])
        keep = torch.rand(x.shape[0], count, generator=self.generator).to(x.device).clamp(1e-6, 1 - 1e-6)
        return torch.stack([keep, 1 - keep], dim=-1).log()


def use_random_scores(model: nn.Module, seed: int | None = None) -> list[nn.Module]:
    """Replace every stage's scorer of `model` by `RandomScores` (seeded `seed` + stage index, or the global
    generator); returns the scorers it replaced, in stage order."""
    replaced = []
    for i, stage in enumerate(selectors(model)):
        replaced.append(stage.predictor)
        stage.predictor = RandomScores(getattr(stage.predictor, "channel", -1), None if seed is None else seed + i)
    return replaced


@contextmanager
def random_decisions(model: nn.Module, seed: int | None = 0) -> Iterator[nn.Module]:
    """Within the block, `model`'s stages keep as many tokens or locations as before, chosen at random."""
    stages = selectors(model)
    replaced = use_random_scores(model, seed)
    try:
        yield model
    finally:
        for stage, scorer in zip(stages, replaced, strict=True):
            stage.predictor = scorer


@contextmanager
def fixed_keep(model: nn.Module, keep: float) -> Iterator[nn.Module]:
    """Within the block, every stage of `model` keeps the fraction `keep` (at least one token or location): 1.0 runs
    every block on everything, 0.0 keeps one per stage."""
    stages = selectors(model)
    ratios = [s.keep_ratio for s in stages]
    try:
        for s in stages:
            s.keep_ratio = keep
        yield model
    finally:
        for s, r in zip(stages, ratios, strict=True):
            s.keep_ratio = r
