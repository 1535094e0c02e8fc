"""Decision ablations (tokenprune.measure.ablation): random choices keep the same counts, keep-all is the dense model,
and the model's own scorers and ratios come back afterwards."""

from __future__ import annotations

import pytest
import timm
import torch

import tokenprune
from tokenprune.measure.ablation import fixed_keep, random_decisions

MODELS = {
    "vit": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=64, depth=6, num_classes=5), 64),
    "convnext": (lambda: timm.create_model("convnext_atto", num_classes=5, conv_mlp=False, ls_init_value=1.0), 96),
}


def _pair(key: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """(dense model, its sparsified copy in eval mode, a batch of 4 inputs)."""
    build, size = MODELS[key]
    torch.manual_seed(0)
    dense = build().eval()
    x = torch.randn(4, 3, size, size)
    return dense, tokenprune.sparsify(dense, 0.7, example_inputs=x[:1]).eval(), x


def _kept(model: torch.nn.Module) -> list[torch.Tensor]:
    out = []
    for s in tokenprune.selectors(model):
        index = s.last_index if s.last_index is not None else s.last_decision
        out.append(index.detach().clone())
    return out


@pytest.mark.parametrize("key", list(MODELS))
def test_random_decisions_keep_as_many_and_restore_the_scorers(key):
    _, model, x = _pair(key)
    with torch.no_grad():
        own = model(x)
        own_kept = _kept(model)
        with random_decisions(model, seed=0):
            random = model(x)
            random_kept = _kept(model)
        again = model(x)
    assert [k.shape for k in random_kept] == [k.shape for k in own_kept]  # the same number kept at every stage
    assert any(not torch.equal(a.sort(-1).values, b.sort(-1).values) for a, b in zip(own_kept, random_kept))
    assert not torch.allclose(random, own)
    torch.testing.assert_close(again, own, rtol=0, atol=0)  # the model's own scorers are back


@pytest.mark.parametrize("key", list(MODELS))
def test_keeping_everything_is_the_dense_model(key):
    dense, model, x = _pair(key)
    with torch.no_grad():
        reference = dense(x)
        ratios = [s.keep_ratio for s in tokenprune.selectors(model)]
        with fixed_keep(model, 1.0):
            everything = model(x)
        with fixed_keep(model, 0.0):
            one_each = model(x)
    torch.testing.assert_close(everything, reference, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(one_each, reference, rtol=1e-4, atol=1e-5)
    assert [s.keep_ratio for s in tokenprune.selectors(model)] == ratios
