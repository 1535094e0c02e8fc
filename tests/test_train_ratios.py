"""Learned keep ratios: parameterisation, the calibrated compute model the trainer uses (against
`tokenprune.profile`), budget projection, parameter groups."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import tokenprune
from tokenprune.errors import ConfigError
from tokenprune.measure.cost import ComputeModel
from tokenprune.measure.flops import profile_flops
from tokenprune.train.optim import param_groups, warmup_cosine
from tokenprune.train.ratios import LearnedKeepRatios, budget_penalty

# 64 patches of 8 x 8 and a class token; stages before blocks 1, 2, 3 of 4.
TINY_VIT = {"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "num_classes": 4}


@pytest.fixture(scope="module")
def calibrated() -> tuple[nn.Module, torch.Tensor, ComputeModel]:
    """A tiny sparsified ViT, its example input and the cost model the trainer calibrates on it."""
    x = torch.randn(1, 3, 64, 64)
    model = tokenprune.sparsify(timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval(), 0.7, example_inputs=x)
    return model, x, ComputeModel.calibrate(model, x)


def _profiled_ratio(model: nn.Module, x: torch.Tensor, ratios) -> float:
    """Chain multiply-adds (blocks and predictors) that `tokenprune.profile` counts with the stages keeping `ratios`,
    over those of the dense chain (every block on every token), as `ComputeModel.ratio` estimates them."""
    selectors = tokenprune.selectors(model)
    before = [s.keep_ratio for s in selectors]
    try:
        for sel, r in zip(selectors, ratios, strict=True):
            sel.keep_ratio = float(r)
        sparse = profile_flops(model, x)
        for sel in selectors:
            sel.keep_ratio = 1.0
        dense = profile_flops(model, x)
    finally:
        for sel, r in zip(selectors, before, strict=True):
            sel.keep_ratio = r
    return (sum(sparse.blocks.values()) + sum(sparse.predictors.values())) / sum(dense.blocks.values())


def test_calibrated_model_and_hand_formula_count_what_profile_counts(calibrated):
    model, x, compute = calibrated
    # A plain ViT block is exactly qkv + proj + MLP = 12 n C^2 plus q k^T and attn v = 2 n^2 C: the hand formula and
    # the calibrated fit must agree, and both with fvcore's count of the real model at the same keep ratios.
    formula = ComputeModel.from_formula("token", depth=4, locations=[1, 2, 3], dim=32, patches=64, prefix=1)
    for ratios in ([1.0, 1.0, 1.0], [48 / 64, 32 / 64, 16 / 64], [40 / 64, 9 / 64, 1 / 64]):  # whole tokens: no floor
        keep = torch.tensor(ratios, dtype=torch.float64)
        assert float(compute.macs(keep)) == pytest.approx(float(formula.macs(keep)), rel=1e-9)
        assert float(compute.ratio(keep)) == pytest.approx(_profiled_ratio(model, x, ratios), rel=1e-9)


@pytest.mark.slow
def test_deit_small_rho07_ratio_matches_paper():
    # docs/design.md §7: DeiT-S 4.6 -> 2.9 GFLOPs at rho = 0.7 (0.63 of dense, the blocks being nearly all of it).
    x = torch.randn(1, 3, 224, 224)
    model = tokenprune.sparsify(timm.create_model("deit_small_patch16_224").eval(), 0.7)
    keep = [0.7, 0.49, 0.343]
    ratio = ComputeModel.calibrate(model, x).ratio(torch.tensor(keep, dtype=torch.float64)).item()
    assert 0.60 < ratio < 0.66
    assert ratio == pytest.approx(_profiled_ratio(model, x, keep), rel=0.01)  # top-k's floor(rho * 196) aside


def test_ratios_monotone_floor_and_roundtrip():
    lk = LearnedKeepRatios([0.7, 0.49, 0.343], patches=49)
    assert torch.allclose(lk(), torch.tensor([0.7, 0.49, 0.343]), atol=1e-5)
    with torch.no_grad():
        lk.theta.copy_(torch.tensor([5.0, -20.0, 20.0]))
    r = lk()
    assert (r[1:] <= r[:-1] + 1e-7).all()
    assert (r >= 1 / 49).all()
    assert int(r.min() * 49 + 1e-6) >= 1  # top-k keeps at least one token


def test_budget_shift_hits_target_and_keeps_order(calibrated):
    model, x, compute = calibrated
    lk = LearnedKeepRatios([0.9, 0.5, 0.2], patches=compute.patches)
    ratios = lk(lk.budget_shift(compute, 0.6))
    assert compute.ratio(ratios).item() == pytest.approx(0.6, abs=1e-6)
    assert (ratios[1:] < ratios[:-1]).all()
    # the model at those ratios, as fvcore counts it: top-k keeps floor(rho * 64) tokens, under one token per stage
    assert _profiled_ratio(model, x, ratios.tolist()) == pytest.approx(0.6, abs=0.02)
    with pytest.raises(ConfigError, match="out of reach"):
        lk.budget_shift(compute, 0.05)  # block 0 alone, before the first stage, is a quarter of the chain


def test_budget_penalty_gradient_moves_ratios_towards_budget(calibrated):
    model, x, compute = calibrated
    lk = LearnedKeepRatios([0.9, 0.8, 0.7], patches=compute.patches)
    opt = torch.optim.Adam(lk.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        budget_penalty(compute.ratio(lk()), 0.6).backward()
        opt.step()
    assert compute.ratio(lk()).item() == pytest.approx(0.6, abs=0.01)
    assert _profiled_ratio(model, x, lk().tolist()) == pytest.approx(0.6, abs=0.03)


def test_param_groups_split_new_and_backbone():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Linear(4, 4)
            self.tokenprune_selector_0 = nn.Linear(4, 2)

    m = M()
    groups = {
        g["name"]: g
        for g in param_groups(
            m, ["backbone.weight", "backbone.bias"], lr=1e-3, backbone_lr_scale=0.01, weight_decay=0.05
        )
    }
    assert groups["new"]["lr"] == 1e-3 and groups["new"]["params"] == [m.tokenprune_selector_0.weight]
    assert groups["backbone"]["lr"] == pytest.approx(1e-5) and groups["backbone"]["weight_decay"] == 0.05
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0


def test_warmup_cosine_schedule():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 1.0}], lr=1.0)
    sched = warmup_cosine(opt, total_steps=10, warmup_steps=2, start_factor=0.1, end_factor=0.01)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[2] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + torch.cos(torch.tensor(7 / 8 * torch.pi)).item()))
