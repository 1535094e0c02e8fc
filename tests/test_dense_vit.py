"""Plain ViTs as dense backbones (issue #12): heads that need every token get the whole token set back.

A head that reshapes tokens into a map (timm ``features_only``, ``forward_intermediates``), a model that returns its
tokens, and features taken from the middle of the chain read a *refilled* token set: kept tokens at their current
values, dropped tokens with the values they had when their stage dropped them (docs/design.md §2.7). Properties over
real configurations: every output has the original's shape; masked ≡ pruned for the same decisions; keep-all ≡ the
original; predictors get gradients through the refill; and, checked by hand, a dropped token's value in the output
is its value at the stage that dropped it.
"""

from __future__ import annotations

import pytest
import timm
import torch

import tokenprune
from tokenprune.fx.selfcheck import max_difference

# name -> (constructor keywords, locations): small, 6 blocks
MODELS = {
    "vit_small_patch16_224/features": (dict(features_only=True, img_size=64, depth=6, out_indices=(3, 5)), [2, 4]),
    "eva02_tiny_patch14_224/features": (dict(features_only=True, img_size=56, depth=6), [2, 4]),
    "deit_small_patch16_224/tokens": (dict(img_size=64, depth=6, num_classes=0, global_pool=""), [2, 4]),
    "vit_base_patch16_siglip_224/features": (
        dict(features_only=True, img_size=64, depth=6, embed_dim=96, num_heads=3, out_indices=(2, 5)),
        [2, 4],
    ),
}


def _outputs(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request):
    torch.manual_seed(0)
    kwargs, locations = MODELS[request.param]
    dense = timm.create_model(request.param.split("/")[0], **kwargs).eval()
    size = kwargs["img_size"]
    x = torch.randn(2, 3, size, size)
    return dense, tokenprune.sparsify(dense, 0.7, locations=locations, example_inputs=x[:1]).eval(), x


def test_outputs_complete_masked_equals_pruned_keep_all_equals_original(pair):
    dense, sparse, x = pair
    with torch.no_grad():
        reference, pruned = _outputs(dense(x)), _outputs(sparse(x))
        tokenprune.set_execution(sparse, "masked")
        masked = _outputs(sparse(x))
        tokenprune.set_execution(sparse, "auto")
        assert [o.shape for o in pruned] == [o.shape for o in reference]
        assert max_difference(masked, pruned) <= 1
        assert max_difference(pruned, reference) > 1  # tokens were really dropped
        saved = [s.keep_ratio for s in tokenprune.selectors(sparse)]
        for s in tokenprune.selectors(sparse):
            s.keep_ratio = 1.0
        assert max_difference(sparse(x), reference) <= 1
        for s, r in zip(tokenprune.selectors(sparse), saved):
            s.keep_ratio = r


def test_predictors_get_gradients_through_the_refill(pair):
    _, sparse, x = pair
    sparse.train()
    try:
        sum(o.float().square().mean() for o in _outputs(sparse(x))).backward()
        for s in tokenprune.selectors(sparse):
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s.predictor.parameters())
    finally:
        sparse.zero_grad(set_to_none=True)
        sparse.eval()


def test_a_dropped_token_keeps_its_value_from_the_stage_that_dropped_it():
    torch.manual_seed(0)
    dense = timm.create_model("deit_small_patch16_224", img_size=64, depth=6, num_classes=0, global_pool="").eval()
    x = torch.randn(2, 3, 64, 64)
    sparse = tokenprune.sparsify(dense, 0.7, locations=[2, 4], example_inputs=x[:1]).eval()
    seen = {}
    stage0 = tokenprune.selectors(sparse)[0]
    stage0.register_forward_pre_hook(lambda m, args: seen.__setitem__("stage0_input", args[0]))
    with torch.no_grad():
        out = sparse(x)  # [B, 17, C]: class token + 16 patches
    kept = stage0.last_index  # patch indices kept by stage 0
    dropped = [i for i in range(16) if i not in kept[0].tolist()]
    assert dropped
    with torch.no_grad():
        at_drop = sparse.norm(seen["stage0_input"])  # the head applies the final norm to every token
    for i in dropped:
        assert torch.allclose(out[0, 1 + i], at_drop[0, 1 + i], atol=1e-6)
    # and a token kept to the end is not its stage-0 value (it went through the later blocks)
    last_kept = tokenprune.sparsity_state(sparse).final_index[0, -1]
    assert not torch.allclose(out[0, last_kept], at_drop[0, last_kept], atol=1e-3)
