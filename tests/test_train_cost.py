"""The learned-ratio budget's cost model is measured with fvcore and agrees with `tokenprune.profile`."""

from __future__ import annotations

import pytest
import timm
import torch

import tokenprune
from tokenprune.measure.flops import profile_flops
from tokenprune.train.cost import ComputeModel, CostCurve

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
