"""The fine-tuning objective (docs/design.md §3.1): exact values on hand-made states."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tokenprune.errors import ConfigError
from tokenprune.state import SparsityState
from tokenprune.train.losses import (
    LossWeights,
    SparsificationLoss,
    feature_distillation,
    logit_distillation,
    ratio_loss,
    token_distillation,
)


def _state(tokens, mask, index, prefix=1, decisions=None, ratios=(0.5,)):
    decisions = decisions if decisions is not None else [mask[:, prefix:]]
    return SparsityState(decisions, torch.tensor(ratios), tokens, mask, index, prefix, "blocks.3")


def test_ratio_loss_exact():
    # Stage 1 keeps 2/4 and 4/4 tokens in two images; stage 2 keeps 1/4 and 2/4. Targets 0.5 and 0.25.
    d1 = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)[..., None]
    d2 = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.float32)[..., None]
    expected = (((0.5 - 0.5) ** 2 + (1.0 - 0.5) ** 2) / 2 + ((0.25 - 0.25) ** 2 + (0.5 - 0.25) ** 2) / 2) / 2
    assert ratio_loss([d1, d2], [0.5, 0.25]).item() == pytest.approx(expected)


def test_ratio_loss_gradient_reaches_learned_ratios():
    rho = torch.tensor([0.7, 0.4], requires_grad=True)
    d = torch.ones(3, 10, 1)
    ratio_loss([d, d], rho).backward()
    # d/d rho_s of (1/S) (1 - rho_s)^2 = -(1 - rho_s) for S = 2.
    assert torch.allclose(rho.grad, torch.tensor([-0.3, -0.6]))


def test_ratio_loss_stage_count_must_match():
    with pytest.raises(ConfigError, match="2 pruning stages but 1"):
        ratio_loss([torch.ones(1, 4, 1)] * 2, [0.5])


def test_logit_kl_is_zero_for_equal_and_matches_definition():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    assert logit_distillation(t, t).item() == pytest.approx(0.0, abs=1e-6)
    p_t = F.softmax(t, -1)
    manual = (p_t * (p_t.log() - F.log_softmax(s, -1))).sum(-1).mean()
    assert logit_distillation(s, t).item() == pytest.approx(manual.item(), rel=1e-5)


def test_token_distillation_masked_uses_kept_patch_tokens_only():
    torch.manual_seed(0)
    b, n, c = 2, 5, 6
    student, teacher = torch.randn(b, n, c), torch.randn(b, n, c)
    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 1]], dtype=torch.float32)[..., None]
    index = torch.arange(n).expand(b, n)
    got = token_distillation(_state(student, mask, index), teacher)
    rows = [(0, 1), (0, 3), (1, 4)]  # kept, not prefix (position 0 is the class token)
    kl = [
        F.kl_div(F.log_softmax(student[i, j], -1), F.log_softmax(teacher[i, j], -1), reduction="sum", log_target=True)
        for i, j in rows
    ]
    assert got.item() == pytest.approx(sum(k.item() for k in kl) / len(rows), rel=1e-5)


def test_token_distillation_pruned_equals_masked_at_same_positions():
    torch.manual_seed(1)
    b, n, c = 2, 5, 6
    full, teacher = torch.randn(b, n, c), torch.randn(b, n, c)
    kept = torch.tensor([[0, 1, 3], [0, 2, 4]])  # class token + two patches per image
    pruned = torch.gather(full, 1, kept[..., None].expand(-1, -1, c))
    mask = torch.zeros(b, n, 1).scatter(1, kept[..., None], 1.0)
    masked_loss = token_distillation(_state(full, mask, torch.arange(n).expand(b, n)), teacher)
    pruned_loss = token_distillation(_state(pruned, torch.ones(b, 3, 1), kept), teacher)
    assert pruned_loss.item() == pytest.approx(masked_loss.item(), rel=1e-6)


def test_token_distillation_mse_and_empty_mask():
    x = torch.randn(1, 3, 4)
    index = torch.arange(3).expand(1, 3)
    assert token_distillation(_state(x, torch.ones(1, 3, 1), index), x + 1, kind="mse").item() == pytest.approx(1.0)
    empty = torch.tensor([[1.0, 0.0, 0.0]])[..., None]
    assert token_distillation(_state(x, empty, index), x + 1).item() == 0.0


def test_weights_defaults_per_kind_and_validation():
    token, spatial = LossWeights.for_kind("token"), LossWeights.for_kind("spatial")
    assert (token.ce, token.ratio, token.kl, token.distill, token.distill_type) == (1.0, 2.0, 0.5, 0.5, "mse")
    assert (spatial.ce, spatial.ratio, spatial.kl, spatial.distill_type) == (1.0, 10.0, 0.5, "mse")
    assert LossWeights.for_kind("token", ratio=5.0).ratio == 5.0
    with pytest.raises(ConfigError, match="kind"):
        LossWeights.for_kind("graph")
    with pytest.raises(ConfigError, match="loss.kl"):
        LossWeights.for_kind("token", kl=-1.0)
    assert token.distill_point == spatial.distill_point == "auto"
    with pytest.raises(ConfigError, match="loss.distill_point='middle'"):
        LossWeights.for_kind("spatial", distill_point="middle")


def test_total_is_weighted_sum_of_parts():
    torch.manual_seed(2)
    b, n, c, k = 3, 5, 8, 7
    tokens, t_tokens = torch.randn(b, n, c), torch.randn(b, n, c)
    mask = (torch.rand(b, n, 1) > 0.3).float()
    mask[:, :2] = 1
    state = _state(tokens, mask, torch.arange(n).expand(b, n))
    logits, t_logits, y = torch.randn(b, k), torch.randn(b, k), torch.randint(0, k, (b,))
    w = LossWeights.for_kind("token", ce=1.5, ratio=3.0, kl=0.25, distill=0.75)
    out = SparsificationLoss(w)(logits, y, state, t_logits, t_tokens)
    p = out.parts
    assert p["ce"].item() == pytest.approx(F.cross_entropy(logits, y).item())
    assert out.total.item() == pytest.approx(1.5 * p["ce"] + 3.0 * p["ratio"] + 0.25 * p["kl"] + 0.75 * p["distill"])
    assert all(math.isfinite(v.item()) and v.item() > 0 for v in p.values())


def test_spatial_variant_uses_feature_mse():
    fmap, t_map = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    state = SparsityState([torch.ones(2, 9, 1)], torch.tensor([0.7]), fmap, None, None, 0, "stages.2")
    out = SparsificationLoss(LossWeights.for_kind("spatial"))(
        torch.randn(2, 5), torch.tensor([0, 1]), state, torch.randn(2, 5), t_map
    )
    assert out.parts["distill"].item() == pytest.approx(feature_distillation(fmap, t_map).item())
    assert out.parts["ratio"].item() == pytest.approx(0.3**2)


def test_missing_teacher_is_a_config_error():
    with pytest.raises(ConfigError, match="teacher"):
        SparsificationLoss(LossWeights.for_kind("token"))(torch.randn(2, 3), torch.tensor([0, 1]), None)


def test_soft_targets():
    logits = torch.randn(2, 3)
    soft = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    out = SparsificationLoss(LossWeights.for_kind("token", kl=0, distill=0))(logits, soft, None)
    expected = -(soft * F.log_softmax(logits, -1)).sum(-1).mean()
    assert out.parts["ce"].item() == pytest.approx(expected.item(), rel=1e-6)
