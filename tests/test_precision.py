"""Any precision (issue #20 item 6): bf16/fp16 models sparsify, and masked and pruned execution choose the same tokens
under autocast and with low-precision weights (fp32 scores, ties to the lower position)."""

from __future__ import annotations

import contextlib

import pytest
import timm
import torch
from torch import nn

import tokenprune
from tokenprune.nn.predictor import TokenPredictor
from tokenprune.nn.select import TokenSelector, positions, top_k
from tokenprune.nn.spatial_predictor import SpatialSelector

MODELS = {
    "deit": lambda: timm.create_model(
        "deit_tiny_patch16_224", depth=6, embed_dim=96, num_heads=3, img_size=96, num_classes=10
    ),
    "convnext": lambda: timm.create_model("convnext_tiny", depths=(1, 1, 6, 1), dims=(16, 32, 64, 128), num_classes=10),
}


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request):
    torch.manual_seed(0)
    dense = MODELS[request.param]().eval()
    return dense, tokenprune.sparsify(dense, 0.7, example_inputs=torch.randn(2, 3, 96, 96)).eval()


def _decisions(model: nn.Module, x: torch.Tensor, execution: str, context) -> list[torch.Tensor]:
    tokenprune.set_execution(model, execution)
    with torch.no_grad(), context():
        model(x)
    return [d[..., 0].bool() for d in tokenprune.sparsity_state(model).decisions]


def _assert_same_decisions(model: nn.Module, x: torch.Tensor, context=contextlib.nullcontext) -> None:
    pruned, masked = _decisions(model, x, "pruned", context), _decisions(model, x, "masked", context)
    for s, (p, m) in enumerate(zip(pruned, masked)):
        assert torch.equal(p, m), f"stage {s}: {int((p != m).sum())} of {p.numel()} decisions differ"
    assert all(0 < int(p.sum()) < p.numel() for p in pruned)  # stages really choose


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_same_decisions_under_autocast(pair, dtype):
    _, sparse = pair
    x = torch.randn(16, 3, 96, 96)
    _assert_same_decisions(sparse, x, lambda: torch.autocast("cpu", dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_same_decisions_with_low_precision_weights(pair, dtype):
    _, sparse = pair
    cast = sparse.to(dtype)
    try:
        x = torch.randn(16, 3, 96, 96, dtype=dtype)
        _assert_same_decisions(cast, x)
        for execution in ("masked", "pruned"):  # masked execution is not promoted to fp32 by its keep policy
            tokenprune.set_execution(cast, execution)
            with torch.no_grad():
                assert cast(x).dtype == dtype, execution
    finally:
        sparse.float()


def test_low_precision_model_sparsifies_with_fp32_stages():
    """A bf16 model is analysed with a bf16 example; its stages score in fp32."""
    dense = MODELS["convnext"]().eval().to(torch.bfloat16)
    sparse = tokenprune.sparsify(dense, 0.7, example_inputs=torch.randn(2, 3, 96, 96)).eval()
    stages = tokenprune.selectors(sparse)
    assert stages and all(p.dtype == torch.float32 for s in stages for p in s.parameters())
    assert all(p.dtype == torch.bfloat16 for n, p in sparse.named_parameters() if "tokenprune" not in n)
    _assert_same_decisions(sparse, torch.randn(8, 3, 96, 96, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_token_model_sparsifies(dtype):
    """A bf16/fp16 ViT is analysed with an example in its dtype and passes the self-check (run on widened values)."""
    dense = MODELS["deit"]().eval().to(dtype)
    sparse = tokenprune.sparsify(dense, 0.7).eval()
    assert all(p.dtype == dtype for n, p in sparse.named_parameters() if "tokenprune" not in n)
    assert all(p.dtype == torch.float32 for s in tokenprune.selectors(sparse) for p in s.parameters())
    _assert_same_decisions(sparse, torch.randn(8, 3, 96, 96, dtype=dtype))


def test_predictor_scores_in_fp32_whatever_the_weights_and_autocast():
    torch.manual_seed(0)
    predictor = TokenPredictor(32)
    x = torch.randn(2, 50, 32)
    reference, rounded_input = predictor(x), predictor(x.bfloat16().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = predictor(x.bfloat16())
    assert torch.equal(under_autocast, rounded_input)  # autocast changes nothing: all of it ran in fp32
    low = predictor.to(torch.bfloat16)(x.bfloat16())
    assert reference.dtype == under_autocast.dtype == low.dtype == torch.float32
    # bf16 weights: only their rounding (and the input's) remains, not bf16 arithmetic.
    assert (low - reference).abs().max() < 1e-2


def test_ties_go_to_the_lower_position_in_both_executions():
    """All scores equal: both executions keep the first k patch tokens (topk alone returns ties in any order)."""
    scores = torch.tensor([[0.0, 2.0, 1.0, 1.0, 1.0, -1.0, float("-inf")], [float("-inf")] * 4 + [1.0] * 3])
    assert positions(top_k(scores, 3), 3).tolist() == [[1, 2, 3], [4, 5, 6]]
    assert positions(top_k(scores, 6), 6).tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 4, 5, 6]]
    assert positions(~top_k(scores, 3), 4).tolist() == [[0, 4, 5, 6], [0, 1, 2, 3]]
    selector = TokenSelector(16, 0.3, prefix_tokens=1, stage=0).eval()
    nn.init.zeros_(selector.predictor.score[-2].weight)
    nn.init.zeros_(selector.predictor.score[-2].bias)
    x = torch.randn(2, 11, 16)
    _, _, index = selector(x, None, None, 11)
    assert index.tolist() == [[0, 1, 2, 3]] * 2  # the prefix token, then patches 0, 1, 2
    selector.execution = "masked"
    _, policy, _ = selector(x, None, None, 11)
    assert policy[..., 0].tolist() == [[1.0] * 4 + [0.0] * 7] * 2


def test_spatial_ties_go_to_the_lower_location():
    selector = SpatialSelector(16, 0.25, stage=0, channel=1).eval()
    nn.init.zeros_(selector.predictor.score[-2].weight)
    nn.init.zeros_(selector.predictor.score[-2].bias)
    _, keep, drop = selector(torch.randn(2, 16, 4, 4), None, None)
    assert keep.tolist() == [[0, 1, 2, 3]] * 2 and drop.tolist() == [list(range(4, 16))] * 2
