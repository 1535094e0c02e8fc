"""What the analysis keeps in memory: `sparsify` runs the model without autograd, and chain discovery lets go of the
outputs of the calls it does not need once they outgrow `discovery.KEEP_BYTES`, recording the chain's calls again
in a second forward (MobileNetV5 at 768²: `sparsify` peaked at 18 GB, now 4.4 GB; docs/results.md)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import tokenprune
from tokenprune.fx import discovery

MODELS = {
    "vit": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, depth=4), (2, 3, 32, 32)),
    # blocks called with a keyword tensor (rope)
    "eva": (lambda: timm.create_model("eva02_tiny_patch14_224", img_size=28, depth=4), (2, 3, 28, 28)),
    "convnext": (lambda: timm.create_model("convnext_atto"), (2, 3, 64, 64)),
    "swin": (
        lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=56, depths=(1, 1, 2, 1)),
        (2, 3, 56, 56),
    ),
}


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("name", MODELS)
def test_chain_calls_recorded_again_equal_the_kept_ones(name, monkeypatch):
    """Over the budget the first forward keeps no tensor at all, and the second forward records the same chain calls:
    the same modules, inputs, keyword inputs and outputs as the calls kept within the budget."""
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(shape)
    kept = discovery.find_chain(model, x)
    assert all(c.call is not None for c in discovery._same_shape_calls(model, x)[0])  # within the budget
    monkeypatch.setattr(discovery, "KEEP_BYTES", 0)
    seen, _ = discovery._same_shape_calls(model, x)
    assert seen and all(c.call is None for c in seen)
    again = discovery.find_chain(model, x)
    assert again.names == kept.names and again.layout == kept.layout and again.shape == kept.shape
    assert _same(again.reference, kept.reference)
    for a, b in zip(again.calls, kept.calls):
        assert a.module is b.module and a.order == b.order
        assert _same(a.args, b.args) and _same(a.kwargs, b.kwargs) and _same(a.output, b.output)


class _Shared(nn.Module):
    """The same block module runs twice on other values before the chain: the second forward must pick the chain's
    call of it (its n-th call), not the first."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.GELU()) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        side = self.blocks[1](x * 2.0) + self.blocks[1](x * 3.0)  # two calls of blocks.1 outside the chain
        for block in self.blocks:
            x = block(x)
        return x + side


def test_the_second_forward_picks_the_chain_call_of_a_module_called_several_times(monkeypatch):
    model, x = _Shared().eval(), torch.randn(2, 3, 32, 32)
    kept = discovery.find_chain(model, x)
    monkeypatch.setattr(discovery, "KEEP_BYTES", 0)
    again = discovery.find_chain(model, x)
    assert again.names == kept.names == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(_same(a.args, b.args) and _same(a.output, b.output) for a, b in zip(again.calls, kept.calls))


@pytest.mark.parametrize("name", ["vit", "convnext"])
def test_sparsify_runs_the_model_without_autograd(name):
    """Shape propagation included: with autograd on, a forward keeps every intermediate value for a backward that
    never comes (MobileNetV5 at 768²: 16.8 GB)."""
    make, shape = MODELS[name]
    model = make().eval()
    grad = []
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.register_forward_hook(lambda *_: grad.append(torch.is_grad_enabled()))
    tokenprune.sparsify(model, 0.7, example_inputs=torch.randn(shape))
    assert grad and not any(grad)


class _Fickle(_Shared):
    """Skips its last block on every second forward."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = self.embed(x)
        for block in self.blocks[: 3 if self.calls % 2 else 2]:
            x = block(x)
        return x


def test_a_forward_that_changes_between_runs_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(discovery, "KEEP_BYTES", 0)
    with pytest.raises(tokenprune.UnsupportedModelError, match=r"^fickle: .* called blocks\.2 the first time"):
        discovery.find_chain(_Fickle().eval(), torch.randn(2, 3, 32, 32), "fickle")
