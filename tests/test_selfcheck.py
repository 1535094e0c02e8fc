"""The self-check's own parts: the weights it checks with, its comparisons, its refusals, its second input size.

The mutation suite (tests/test_selfcheck_mutations.py) measures what it catches; these tests pin how.
"""

from __future__ import annotations

import importlib
import math

import pytest
import timm
import torch
import torchvision
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

import tokenprune
from tokenprune.errors import UnsupportedModelError
from tokenprune.fx.selfcheck import branch_scales, check_values, check_weights, max_difference, tolerances
from tokenprune.nn import masked

# reason: the package exports the function `sparsify` under the module's name
sparsify_module = importlib.import_module("tokenprune.sparsify")


def _deit3(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("deit3_small_patch16_224", img_size=64, depth=4, **kwargs).eval()


def _scale_names(sparse) -> set[str]:
    ids = {id(p) for p in branch_scales(sparse)}
    return {n for n, p in sparse.named_parameters() if id(p) in ids}


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: timm.create_model("cait_xxs24_224", img_size=64, depth=4), "gamma_1"),
        (lambda: timm.create_model("deit3_small_patch16_224", img_size=64, depth=4), "ls1.gamma"),
        (lambda: timm.create_model("convnext_atto"), "gamma"),
        (lambda: ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 4)], num_classes=10), "layer_scale"),
    ],
    ids=["cait", "deit3", "convnext", "torchvision_convnext"],
)
def test_branch_scales_are_found_by_structure(make, expected):
    """Layer scales of every rewritten block, and the fast paths' scales; no norm weight, no linear weight."""
    torch.manual_seed(0)
    sparse = tokenprune.sparsify(make().eval(), 0.7, example_inputs=torch.randn(2, 3, 64, 64))
    names = _scale_names(sparse)
    config = tokenprune.config_of(sparse)
    later = config.chain[config.locations[0] :]
    assert all(any(n.startswith(block + ".") and expected in n for n in names) for block in later), names
    if config.kind == "spatial":
        assert all(any(n.startswith(block + ".") and "fast.gamma" in n for n in names) for block in later), names
    params = dict(sparse.named_parameters())
    assert all(sum(s > 1 for s in params[n].shape) <= 1 for n in names)
    assert not any(n.endswith(("norm.weight", "fc1.weight", "qkv.weight", "cls_token", "q_bias")) for n in names)


def test_check_weights_fill_zero_tables_and_restore_bitwise():
    torch.manual_seed(0)
    dense = timm.create_model("beit_base_patch16_224", img_size=64, depth=4, embed_dim=96, num_heads=3).eval()
    sparse = tokenprune.sparsify(dense, 0.7)
    weights = check_weights(sparse)
    tables = [n for n in weights if "relative_position_bias_table" in n]
    assert tables and all(weights[n].any() for n in tables)  # zero at init: filled for the check
    assert all(torch.equal(weights[n], torch.ones_like(weights[n])) for n in _scale_names(sparse))
    before = {k: v.clone() for k, v in sparse.state_dict().items()}
    with pytest.raises(RuntimeError, match="inside"), check_values(sparse, weights):
        assert sparse.get_parameter(tables[0]).any()
        raise RuntimeError("inside")
    after = sparse.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # the original model has the same names: it gets the same values
    with check_values(dense, weights):
        assert torch.equal(dense.get_parameter(tables[0]), weights[tables[0]])
    assert not dense.get_parameter(tables[0]).any()


def test_tolerances_follow_the_dtype():
    rtol32, atol32, _ = tolerances(torch.float32)
    assert math.isclose(rtol32, 1e-3, rel_tol=0.05) and math.isclose(atol32, 1e-4, rel_tol=0.05)
    rtol16, atol16, _ = tolerances(torch.bfloat16)
    assert rtol16 > 50 * rtol32 and atol16 > 50 * atol32
    y = torch.randn(64, 64)
    off = y * (1 + 8 * torch.finfo(torch.bfloat16).eps)  # a few bf16 roundings
    assert max_difference(off.bfloat16(), y.bfloat16()) <= 1
    assert max_difference(off, y) > 1  # the same difference is far too large for fp32


def test_non_finite_values_never_compare_equal():
    nan = torch.tensor([1.0, float("nan")])
    assert max_difference(nan, nan) == math.inf
    assert max_difference(torch.tensor([float("inf")]), torch.tensor([float("inf")])) == math.inf
    assert max_difference(torch.zeros(3), torch.zeros(3)) == 0.0
    assert max_difference(torch.zeros(3), torch.zeros(4)) is None


@pytest.mark.parametrize(
    "example, reason",
    [
        (torch.randn(0, 3, 64, 64), "has no images"),
        (torch.full((2, 3, 64, 64), float("nan")), "NaN or infinite"),
        (torch.randn(2, 3, 64, 64).index_fill_(0, torch.tensor([1]), float("inf")), "NaN or infinite"),
    ],
    ids=["batch0", "nan", "inf"],
)
def test_an_example_that_cannot_show_anything_is_refused(example, reason):
    with pytest.raises(UnsupportedModelError, match=f"deit3_small_patch16_224: the example input .*{reason}"):
        tokenprune.sparsify(_deit3(), 0.7, example_inputs=example)


def _corrupt(monkeypatch, edit):
    real = sparsify_module.apply_plan

    def corrupted(target, plan):
        applied = real(target, plan)
        edit(applied.model)
        return applied

    monkeypatch.setattr(sparsify_module, "apply_plan", corrupted)


def test_the_first_diverging_block_is_named(monkeypatch):
    """Attention masks removed from the last block only: the message names that block, not an earlier one."""

    def unmask_last(model):
        block = model.get_submodule("blocks.3")
        for node in block.graph.nodes:
            if node.target is masked.masked_sdpa:
                node.target = lambda q, k, v, policy, *a, **kw: masked.masked_sdpa(q, k, v, None, *a, **kw)
        block.recompile()

    _corrupt(monkeypatch, unmask_last)
    with pytest.raises(UnsupportedModelError, match=r"self-check failed: masked execution .* first in block blocks\.3"):
        tokenprune.sparsify(_deit3(), 0.7, locations=[1, 2, 3])


def _sizes_seen(monkeypatch) -> list:
    seen = []
    _corrupt(monkeypatch, lambda m: m.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape))))
    return seen


@pytest.mark.parametrize(
    "make, second",
    [
        (lambda: _deit3(dynamic_img_size=True), (1, 3, 96, 96)),
        (lambda: timm.create_model("convnext_atto", num_classes=10).eval(), (1, 3, 96, 96)),
    ],
    ids=["vit_dynamic_img_size", "convnext"],
)
def test_a_second_input_size_is_checked_when_the_original_accepts_it(make, second, monkeypatch):
    seen = _sizes_seen(monkeypatch)
    tokenprune.sparsify(make(), 0.7, example_inputs=torch.randn(2, 3, 64, 64))
    assert seen.count(second) == 3  # pruned, masked, keep-all


def test_no_second_size_for_a_model_fixed_to_one(monkeypatch):
    seen = _sizes_seen(monkeypatch)
    tokenprune.sparsify(_deit3(), 0.7)
    assert {shape[2:] for shape in seen} == {(64, 64)}  # the cost model's forwards take one image of the example


def test_a_model_that_breaks_at_another_size_is_refused(monkeypatch):
    """The original runs at 1.5x; a sparsified model that cannot (a frozen shape) is refused, not returned."""

    def frozen(model):
        def hook(module, args):
            if args[0].shape[-1] != 64:
                raise RuntimeError("shape '[2, 16, 384]' is invalid for input of size 1")

        model.register_forward_pre_hook(hook)

    _corrupt(monkeypatch, frozen)
    with pytest.raises(UnsupportedModelError, match=r"original model runs at input size \[3, 96, 96\]"):
        tokenprune.sparsify(_deit3(dynamic_img_size=True), 0.7)


def test_the_original_model_is_unchanged_bitwise():
    """The second-size check runs the caller's model with the check's weights; they are put back bit for bit."""
    dense = timm.create_model("convnext_atto", num_classes=10).eval()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    tokenprune.sparsify(dense, 0.7, example_inputs=torch.randn(2, 3, 64, 64))
    after = dense.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()) and not dense.training


def test_torchvision_zero_head_is_filled_for_the_check():
    """torchvision zero-initialises some heads; a zero head makes every output comparison vacuous."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(64, 16, num_layers=4, num_heads=3, hidden_dim=96, mlp_dim=384).eval()
    assert not model.heads.head.weight.any()
    sparse = tokenprune.sparsify(model, 0.7)
    assert check_weights(sparse)["heads.head.weight"].any()


def test_a_near_tie_decided_either_way_is_not_a_failure(monkeypatch):
    """Scores that nearly tie, and a rounding-sized difference in the masked execution's scores (as a bf16 model
    gets): top-k ranks some tokens the other way. That is not a wrong rewrite; the masked run continues with the pruned
    run's decisions and the check passes. A difference far beyond rounding is refused (the mutation suite)."""
    seen = []
    generator = torch.Generator().manual_seed(0)

    def tied(model):
        for sel in tokenprune.selectors(model):
            real = sel.predictor.forward

            def noisy(x, policy=None, sel=sel, real=real):
                # Scores squeezed around log(1/2) with a spread of ~1e-5 (the check gives the predictors unit-gain
                # weights, so this happens after them), and rounding-sized noise in the masked execution.
                out = real(x, policy)
                out = math.log(0.5) + (out - out.mean()) * 1e-5
                if sel.execution != "masked":
                    return out
                return out + torch.randn(out.shape, generator=generator) * 1e-6

            sel.predictor.forward = noisy
        check = sparsify_module.self_check.__globals__
        real_differ = check["_decisions_differ"]

        def spy(pruned, masked, dtype):
            seen.append(any(not torch.equal(a, b) for a, b in zip(pruned, masked.decision)))
            return real_differ(pruned, masked, dtype)

        monkeypatch.setitem(check, "_decisions_differ", spy)

    _corrupt(monkeypatch, tied)
    tokenprune.sparsify(_deit3(), 0.7)
    assert seen and seen[0], "the near-tie did not make the executions decide differently; the test shows nothing"
