"""The one cost model (`tokenprune/measure/cost.py`): measured with fvcore, it agrees with `tokenprune.profile`, and
it decides both the learned-ratio budget and `sparsify`'s refusal of a model that pruning would not make cheaper."""

from __future__ import annotations

import re

import pytest
import timm
import torch

import tokenprune
from tokenprune import UnsupportedModelError
from tokenprune.measure.cost import ComputeModel, CostCurve, refuse_costlier
from tokenprune.measure.flops import profile_flops

TINY = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}),
    "convnext": ("convnext_tiny", {"depths": (1, 1, 4, 1), "dims": (8, 16, 32, 64)}),
    "swin": (
        "swin_tiny_patch4_window7_224",
        {"depths": (1, 1, 4, 1), "embed_dim": 16, "num_heads": (1, 1, 2, 2), "window_size": 2, "img_size": 64},
    ),
}


def _chain_macs(model: torch.nn.Module, ratios: list[float], x: torch.Tensor) -> int:
    """What `tokenprune.profile` counts for the chain (blocks and predictors) at these keep ratios."""
    for sel, r in zip(tokenprune.selectors(model), ratios, strict=True):
        sel.keep_ratio = r
    report = profile_flops(model, x)
    return sum(report.blocks.values()) + sum(report.predictors.values())


def test_cost_curve_fit_is_exact_on_a_quadratic():
    curve = CostCurve.fit([(n, 7 + 3 * n + 2 * n * n) for n in (4, 9, 17)])
    assert curve(30) == pytest.approx(7 + 90 + 1800)
    assert CostCurve.fit([(5, 11)]) == CostCurve(11.0)


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.slow  # over 2 s on 2 cores: the full run covers it, the inner loop (-m 'not slow') skips it
def test_calibrated_estimate_equals_profile_on_tiny_models(name):
    arch, kwargs = TINY[name]
    size = kwargs.get("img_size", 64)
    x = torch.randn(1, 3, size, size)
    model = tokenprune.sparsify(timm.create_model(arch, num_classes=4, **kwargs).eval(), 0.7, example_inputs=x)
    before = [s.keep_ratio for s in tokenprune.selectors(model)]
    compute = ComputeModel.calibrate(model, x)
    assert [s.keep_ratio for s in tokenprune.selectors(model)] == before  # calibration leaves the model as it was
    # Keep ratios that are whole multiples of 1/patches: no rounding, so the fit must be exact.
    assert compute.patches == 16
    for ratios in ([12 / 16, 8 / 16, 4 / 16], [1.0, 8 / 16, 2 / 16]):
        estimate = float(compute.macs(torch.tensor(ratios, dtype=torch.float64)))
        assert estimate == pytest.approx(_chain_macs(model, ratios, x), rel=1e-9)
    for sel in tokenprune.selectors(model):
        sel.keep_ratio = 1.0
    assert compute.dense() == pytest.approx(sum(profile_flops(model, x).blocks.values()), rel=1e-9)


def test_calibration_needs_a_sparsified_model():
    with pytest.raises(tokenprune.errors.ConfigError, match="not a tokenprune.sparsify result"):
        ComputeModel.calibrate(torch.nn.Linear(2, 2), torch.randn(1, 2))


# Measured at the commit that added this test (estimate vs tokenprune.profile, chain blocks + predictors):
#   DeiT-S     0.09% / 0.33% / 0.15%;  ConvNeXt-T 0.13% / 0.46% / 0.41%;  Swin-T 0.06% / 0.20% / 0.13%.
# What is left is top-k's floor(rho * N), which the continuous estimate does not round.
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["deit_small_patch16_224", "convnext_tiny", "swin_tiny_patch4_window7_224"])
def test_budget_estimate_within_2_percent_of_profile(arch):
    x = torch.randn(1, 3, 224, 224)
    model = tokenprune.sparsify(timm.create_model(arch).eval(), 0.7)
    compute = ComputeModel.calibrate(model, x)
    for ratios in ([0.7, 0.49, 0.343], [0.9, 0.6, 0.3], [0.5, 0.25, 0.1]):
        estimate = float(compute.macs(torch.tensor(ratios, dtype=torch.float64)))
        assert estimate == pytest.approx(_chain_macs(model, ratios, x), rel=0.02), ratios


def _totals(message: str) -> tuple[float, float]:
    """The sparse and dense chain totals (multiply-adds per image) a costlier-than-dense refusal states."""
    found = re.search(r"would cost ([\d,]+) multiply-adds .* against ([\d,]+) for", message)
    assert found, message
    return float(found[1].replace(",", "")), float(found[2].replace(",", ""))


VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "num_classes": 4}


@pytest.mark.parametrize(
    ("options", "figures"),
    [
        (dict(ratio=1.0), "keep ratios [1, 1, 1]"),  # every token kept: the predictors are pure overhead
        (dict(locations=[3], keep_ratios=[15 / 16]), "keep ratios [0.9375]"),  # one late stage saves less than it costs
    ],
)
def test_sparsify_refuses_a_chain_that_costs_more_than_dense(options, figures):
    model = timm.create_model("vit_tiny_patch16_224", **VIT).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match=rf"{re.escape(figures)} .* would not save compute") as raised:
        tokenprune.sparsify(model, inplace=True, **options)
    sparse_macs, dense_macs = _totals(str(raised.value))
    assert sparse_macs >= dense_macs > 0
    assert not tokenprune.selectors(model) and model.state_dict().keys() == before.keys()


def test_refusal_figures_are_what_profile_counts():
    """The chain totals the refusal compares come from the calibrated model; check them against fvcore directly on
    the sparsified model (stages forced to keep everything after sparsify accepted 0.5)."""
    x = torch.randn(1, 3, 32, 32)
    model = tokenprune.sparsify(timm.create_model("vit_tiny_patch16_224", **VIT).eval(), 0.5, example_inputs=x)
    compute = ComputeModel.calibrate(model, x)
    config = tokenprune.config_of(model)
    with pytest.raises(UnsupportedModelError, match="would not save compute") as raised:
        refuse_costlier(compute, [1.0, 1.0, 1.0], config.chain, "tiny")
    sparse_macs, dense_macs = _totals(str(raised.value))
    assert sparse_macs == pytest.approx(_chain_macs(model, [1.0, 1.0, 1.0], x), abs=1)
    for sel in tokenprune.selectors(model):
        sel.keep_ratio = 1.0
    assert dense_macs == pytest.approx(sum(profile_flops(model, x).blocks.values()), abs=1)
    refuse_costlier(compute, [0.5, 0.25, 0.125], config.chain, "tiny")  # the accepted ratios pass


class _PointwiseTail(torch.nn.Module):
    """A block whose residual branch is a depthwise conv then one C -> C 1x1 conv: the fast path (LayerNorm + C -> C
    Linear) that would replace the 1x1 conv costs what it costs, so pruning locations saves nothing."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dw = torch.nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.pw = torch.nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pw(self.dw(x))


class _WideTail(_PointwiseTail):
    """The same block with a 4x-wide pointwise MLP (ConvNeXt's shape): pruning saves 8 C^2 - C^2 per location."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        wide = 4 * dim
        self.pw = torch.nn.Sequential(torch.nn.Conv2d(dim, wide, 1), torch.nn.GELU(), torch.nn.Conv2d(wide, dim, 1))


class _Net(torch.nn.Module):
    def __init__(self, block: type, dim: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = torch.nn.Sequential(*(block(dim) for _ in range(depth)))
        self.head = torch.nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_spatial_block_that_saves_nothing_is_refused_by_the_measured_cost(monkeypatch):
    """Refused by the plan's structural count first (C^2 per location, as much as the fast path), and with that count
    out of the way, by the cost measured on the rewritten model."""
    from tokenprune.fx import spatial

    x = torch.randn(1, 3, 32, 32)
    counted = r"_Net block blocks\.1: no slow path found \(the per-location run pw .. pw costs 256 multiply-adds .*"
    with pytest.raises(UnsupportedModelError, match=counted + "would not save compute"):
        tokenprune.sparsify(_Net(_PointwiseTail).eval(), 0.7, example_inputs=x)
    monkeypatch.setattr(spatial, "_saves_compute", lambda block, path: True)
    refused = r"_Net: block blocks\.1 costs .* pruning it would not save compute"
    with pytest.raises(UnsupportedModelError, match=refused):
        tokenprune.sparsify(_Net(_PointwiseTail).eval(), 0.7, example_inputs=x)
    sparse = tokenprune.sparsify(_Net(_WideTail).eval(), 0.7, example_inputs=x)  # the control: same chain, wide MLP
    compute = ComputeModel.calibrate(sparse, x)
    assert all(curve.c1 > 0 for curve in compute.blocks[1:])  # each kept location costs more than a dropped one
