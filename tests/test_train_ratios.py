"""Learned keep ratios: parameterisation, compute model (exact counts), budget projection, parameter groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tokenprune.errors import ConfigError
from tokenprune.train.optim import param_groups, warmup_cosine
from tokenprune.train.ratios import ComputeModel, LearnedKeepRatios, budget_penalty


def _deit_small() -> ComputeModel:
    return ComputeModel.from_formula("token", depth=12, locations=[3, 6, 9], dim=384, patches=196, prefix=1)


def test_block_cost_exact():
    cm = ComputeModel.from_formula("token", depth=2, locations=[1], dim=4, patches=3, prefix=1)
    # Dense: 2 blocks on N = 4 tokens: 12 * 4 * 16 + 2 * 16 * 4 = 896 each.
    assert cm.dense() == 2 * 896
    # Keep 1/3: block 0 on 4 tokens, predictor on 3 patches (1.625*16 + 2)*3, block 1 on 2 tokens (384 + 64).
    expected = 896 + 3 * (1.625 * 16 + 2) + (12 * 2 * 16 + 2 * 4 * 4)
    assert cm.macs(torch.tensor([1 / 3])).item() == pytest.approx(expected)


def test_deit_small_rho07_ratio_matches_paper():
    # docs/design.md §7: DeiT-S 4.6 -> 2.9 GFLOPs at rho = 0.7 (0.63 of dense, the blocks being nearly all of it).
    ratio = _deit_small().ratio(torch.tensor([0.7, 0.49, 0.343])).item()
    assert 0.60 < ratio < 0.66


def test_ratios_monotone_floor_and_roundtrip():
    lk = LearnedKeepRatios([0.7, 0.49, 0.343], patches=49)
    assert torch.allclose(lk(), torch.tensor([0.7, 0.49, 0.343]), atol=1e-5)
    with torch.no_grad():
        lk.theta.copy_(torch.tensor([5.0, -20.0, 20.0]))
    r = lk()
    assert (r[1:] <= r[:-1] + 1e-7).all()
    assert (r >= 1 / 49).all()
    assert int(r.min() * 49 + 1e-6) >= 1  # top-k keeps at least one token


def test_budget_shift_hits_target_and_keeps_order():
    cm = _deit_small()
    lk = LearnedKeepRatios([0.9, 0.5, 0.2], patches=196)
    shift = lk.budget_shift(cm, 0.6)
    ratios = lk(shift)
    assert cm.ratio(ratios).item() == pytest.approx(0.6, abs=1e-6)
    assert (ratios[1:] < ratios[:-1]).all()
    with pytest.raises(ConfigError, match="out of reach"):
        lk.budget_shift(cm, 0.05)


def test_budget_penalty_gradient_moves_ratios_towards_budget():
    cm = _deit_small()
    lk = LearnedKeepRatios([0.9, 0.8, 0.7], patches=196)
    opt = torch.optim.Adam(lk.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        budget_penalty(cm.ratio(lk()), 0.6).backward()
        opt.step()
    assert cm.ratio(lk()).item() == pytest.approx(0.6, abs=0.01)


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
