"""Batches of detection samples: images stacked, targets (different box counts) kept as a list."""

from __future__ import annotations

import torch

__all__ = ["collate", "targets_to"]


def collate(batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> tuple[torch.Tensor, list[dict]]:
    """Batch detection samples with different box counts: images stacked [B, C, H, W] (same size), targets kept as
    a list of dicts (``boxes`` [K_i, 4], ``labels`` [K_i]), as torchvision's detectors take them."""
    images, targets = zip(*batch)
    return torch.stack(list(images)), list(targets)


def targets_to(targets: list[dict[str, torch.Tensor]], device: torch.device | str) -> list[dict[str, torch.Tensor]]:
    """The targets with every tensor on `device`."""
    return [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
