"""Core properties of `tokenprune.sparsify` on real model configurations (random weights).

The table of models x properties follows timm's tests/test_models.py: each test checks a property that makes the
method correct, not just that code runs.
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import timm
import torch
import torchvision
from torch import nn

import tokenprune

# name -> (constructor, prefix tokens it has: class, distillation and register tokens)
MODELS = {
    "deit_small_patch16_224": (lambda: timm.create_model("deit_small_patch16_224"), 1),
    "deit_tiny_distilled_patch16_224": (lambda: timm.create_model("deit_tiny_distilled_patch16_224"), 2),
    "vit_base_patch16_224": (lambda: timm.create_model("vit_base_patch16_224"), 1),
    "vit_medium_patch16_gap_256": (lambda: timm.create_model("vit_medium_patch16_gap_256"), 0),
    "torchvision_vit_b_16": (lambda: torchvision.models.vit_b_16(), 1),
}


def _randomize_head(model: nn.Module) -> nn.Module:
    # torchvision zero-initialises its classifier, which would make every gradient test vacuous.
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.out_features == 1000:
            nn.init.normal_(module.weight, std=0.02)
    return model


# ViT-B sized models (86M parameters): the full run checks them; `-m "not slow"` keeps the smaller three.
BASE_SIZED = {"vit_base_patch16_224", "torchvision_vit_b_16"}


@pytest.fixture(
    scope="module", params=[pytest.param(n, marks=pytest.mark.slow) if n in BASE_SIZED else n for n in MODELS]
)
def pair(request):
    """(name, dense model, sparse model at rho = 0.7), both in eval mode."""
    make, _ = MODELS[request.param]
    torch.manual_seed(0)
    dense = _randomize_head(make()).eval()
    return request.param, dense, tokenprune.sparsify(dense, 0.7).eval()


def _inputs(sparse: nn.Module, batch: int) -> torch.Tensor:
    return torch.randn(batch, *tokenprune.config_of(sparse).input_size)


def _run_recording_tokens(model: nn.Module, names: list[str], x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Output of one forward, and the token count entering each named block."""
    seen: dict[str, int] = {}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].shape[1]))
        for n in names
    ]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, [seen[n] for n in names]


def test_prefix_tokens_and_defaults(pair):
    name, dense, sparse = pair
    config = tokenprune.config_of(sparse)
    assert config.prefix_tokens == MODELS[name][1]
    assert config.locations == [3, 6, 9] and len(config.chain) == 12
    assert config.keep_ratios == pytest.approx([0.7, 0.49, 0.343])


@pytest.mark.parametrize("batch", [1, 4])
def test_eval_forward_drops_tokens(pair, batch):
    _, _, sparse = pair
    config = tokenprune.config_of(sparse)
    x = _inputs(sparse, batch)
    names = [config.chain[0]] + [config.chain[loc] for loc in config.locations]
    out, (initial, *entering) = _run_recording_tokens(sparse, names, x)
    assert out.shape == (batch, 1000) and torch.isfinite(out).all()
    patches = initial - config.prefix_tokens
    expected = [config.prefix_tokens + math.floor(r * patches + 1e-6) for r in config.keep_ratios]
    assert entering == expected
    assert tokenprune.sparsity_state(sparse).final_tokens.shape[1] == expected[-1]
    if batch == 1:  # eval is deterministic
        with torch.no_grad():
            assert torch.equal(sparse(x), out)


def test_keep_everything_equals_original(pair):
    _, dense, sparse = pair
    full = copy.deepcopy(sparse).eval()  # sparsify refuses keep ratios of 1 (costlier than dense); set them after
    for sel in tokenprune.selectors(full):
        sel.keep_ratio = 1.0
    x = torch.randn(2, *tokenprune.config_of(full).input_size)
    with torch.no_grad():
        torch.testing.assert_close(full(x), dense(x), atol=1e-5, rtol=1e-5)


def test_masked_and_pruned_agree(pair):
    """For the same hard decisions, masked attention (training) and gathered tokens (inference) compute the same."""
    _, _, sparse = pair
    x = _inputs(sparse, 2)
    with torch.no_grad():
        pruned_logits = sparse(x)
        pruned = tokenprune.sparsity_state(sparse)
        tokenprune.set_execution(sparse, "masked")
        try:
            masked_logits = sparse(x)
            masked = tokenprune.sparsity_state(sparse)
        finally:
            tokenprune.set_execution(sparse, "auto")
    for a, b in zip(pruned.decisions, masked.decisions, strict=True):
        assert torch.equal(a, b)
    assert masked.final_tokens.shape[1] > pruned.final_tokens.shape[1]
    channels = masked.final_tokens.shape[-1]
    kept = masked.final_tokens.gather(1, pruned.final_index.unsqueeze(-1).expand(-1, -1, channels))
    torch.testing.assert_close(pruned.final_tokens, kept, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pruned_logits, masked_logits, atol=1e-4, rtol=1e-4)
    # The masked run's final mask marks exactly the tokens the pruned run kept.
    assert masked.final_mask.sum().item() == pruned.final_index.numel()


def test_train_step_reaches_every_predictor_parameter(pair):
    _, _, sparse = pair
    model = copy.deepcopy(sparse).train()
    x = _inputs(model, 2)
    out = model(x)
    assert out.shape[-1] == 1000  # the original's output form
    state = tokenprune.sparsity_state(model)
    # Masked execution: no token removed; the final mask says which ones still count.
    assert state.final_tokens.shape[1] == state.final_mask.shape[1]
    assert 0 < state.final_mask.sum() < state.final_mask.numel()
    assert all(d.requires_grad for d in state.decisions)
    for earlier, later in zip(state.decisions, state.decisions[1:]):
        assert (later <= earlier).all()  # a dropped token never returns: D_s <= D_{s-1} (docs/design.md §1.1)
    out.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "tokenprune_stage" in n}
    assert grads, "no predictor parameters found"
    for n, g in grads.items():
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, n


def test_original_untouched_and_weights_keep_their_names(pair):
    _, dense, sparse = pair
    assert not tokenprune.selectors(dense)
    dense_state, sparse_state = dense.state_dict(), sparse.state_dict()
    for key, value in dense_state.items():
        assert key in sparse_state and torch.equal(sparse_state[key], value), key
    extra = set(sparse_state) - set(dense_state)
    assert extra and all(k.startswith("tokenprune_stage") for k in extra)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(dense.parameters(), sparse.parameters()))


def test_deepcopy_and_pickle_round_trip(pair):
    _, _, sparse = pair
    x = _inputs(sparse, 1)
    with torch.no_grad():
        expected = sparse(x)
        for clone in (copy.deepcopy(sparse), pickle.loads(pickle.dumps(sparse))):
            clone.eval()
            torch.testing.assert_close(clone(x), expected)
            assert tokenprune.config_of(clone).keep_ratios == tokenprune.config_of(sparse).keep_ratios


def test_masked_softmax_matches_softmax_over_kept_tokens_with_bounded_gate_gradient():
    """Forward: the softmax over kept keys (diagonal always open). Backward: a dropped key that out-scores every kept
    one (an attention sink) must not get an exploding gate gradient; its tangent is capped at 1/Z."""
    from tokenprune.nn.masked import masked_softmax

    torch.manual_seed(0)
    scores = torch.randn(2, 3, 5, 5)
    scores[..., 1] += 40.0  # key 1 dominates every row
    policy = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]).repeat(2, 1).unsqueeze(-1).requires_grad_(True)
    attn = masked_softmax(scores, policy)
    gate = policy.detach().reshape(2, 1, 1, 5) + (1 - policy.detach().reshape(2, 1, 1, 5)) * torch.eye(5)
    expected = (scores.masked_fill(gate == 0, float("-inf"))).softmax(-1)
    torch.testing.assert_close(attn, expected)
    (attn * torch.randn_like(attn)).sum().backward()
    assert torch.isfinite(policy.grad).all()
    # Unbounded, the tangent of key 1 would be about exp(40); capped, each row contributes at most |upstream| / Z.
    assert policy.grad.abs().max() < 2 * 3 * 5 * 5
    # Kept keys and the scores still get their ordinary gradients.
    assert policy.grad[:, [0, 2, 3]].abs().sum() > 0


@pytest.mark.parametrize("build", [
    lambda: timm.create_model("vit_base_patch16_clip_224.openai", depth=4, embed_dim=64, num_heads=2),
    lambda: timm.create_model("convnext_atto", num_classes=7),
    lambda: torchvision.models.VisionTransformer(224, 16, num_layers=4, num_heads=2, hidden_dim=64, mlp_dim=128,
                                                 num_classes=7),
])  # fmt: skip
def test_sparse_model_carries_the_originals_data_attributes(build):
    """A timm pipeline reads the model's `pretrained_cfg` (`resolve_model_data_config`): a sparse CLIP model without it
    was fed ImageNet's mean and std. The plain-data attributes come along, through deepcopy and pickle; methods do not
    (they would run the dense code)."""
    dense = build().eval()
    sparse = tokenprune.sparsify(dense, example_inputs=torch.randn(2, 3, 224, 224))
    public = {k: v for k, v in vars(dense).items() if not k.startswith("_") and k != "training"}
    assert public and {"num_classes"} <= set(public)
    for model in (sparse, copy.deepcopy(sparse), pickle.loads(pickle.dumps(sparse))):
        for key, value in public.items():
            if isinstance(value, (int, float, str, dict, tuple, list)):
                assert getattr(model, key) == value, key
        if hasattr(dense, "pretrained_cfg"):
            assert timm.data.resolve_model_data_config(model) == timm.data.resolve_model_data_config(dense)
        assert not hasattr(model, "forward_features") and not hasattr(model, "reset_classifier")
