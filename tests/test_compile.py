"""`torch.compile` of sparsified models: one graph, no break, in pruned (eval) and masked (train) execution, for a
token model and a spatial one (issue #14 item 1). `torch._dynamo.explain` traces without compiling kernels, so these
run in seconds on CPU; the compiled outputs are checked with the `aot_eager` backend (no C++ compiler needed)."""

from __future__ import annotations

import pytest
import timm
import torch

import tokenprune
from tokenprune.nn.masked import fused_masked_attention

MODELS = {"deit_tiny_patch16_224": {"img_size": 64}, "convnext_atto": {}}  # a token chain, a spatial chain


@pytest.fixture(scope="module", params=list(MODELS))
def sparse(request) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model = timm.create_model(request.param, **MODELS[request.param])
    return tokenprune.sparsify(model, 0.7, example_inputs=x), x


def _explain(model: torch.nn.Module, x: torch.Tensor):
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(x)


@pytest.mark.parametrize("train", [False, True], ids=["pruned", "masked"])
@pytest.mark.slow  # over 2 s on 2 cores: the full run covers it, the inner loop (-m 'not slow') skips it
def test_sparsified_model_traces_as_one_graph(sparse, train):
    model, x = sparse
    model.train(train)
    explanation = _explain(model, x)
    reasons = [f"{r.reason} at {r.user_stack[-1] if r.user_stack else '?'}" for r in explanation.break_reasons]
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, reasons


@pytest.mark.slow  # over 2 s on 2 cores: the full run covers it, the inner loop (-m 'not slow') skips it
def test_compiled_pruned_model_matches_eager_and_records_its_state(sparse):
    """fullgraph compile (aot_eager): the same logits, and the stages' recorded decisions survive (the losses and
    `sparsity_state` read them)."""
    model, x = sparse
    model.eval()
    with torch.no_grad():
        eager = model(x)
        eager_state = tokenprune.sparsity_state(model)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    state = tokenprune.sparsity_state(model)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(state.decisions, eager_state.decisions, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.slow  # 45-70 s on a loaded 2-core CPU: two traces with autograd (aot_eager) per model
def test_compiled_masked_training_step_matches_eager(sparse):
    """Masked execution through the fused attention's autograd.Function: compiled gradients equal eager ones."""
    model, x = sparse
    model.train()
    grads = []
    for run in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        torch._dynamo.reset()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same Gumbel noise
        run(x).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_fused_masked_attention_traces_as_one_graph():
    q, k, v = (torch.randn(2, 3, 5, 4, requires_grad=True) for _ in range(3))
    policy = torch.tensor([[1.0, 0, 1, 1, 0]] * 2).unsqueeze(-1)
    bias = torch.randn(1, 3, 5, 5)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda *a: fused_masked_attention(*a, attn_mask=bias).sum())(q, k, v, policy)
    assert explanation.graph_break_count == 0
