"""Blocks whose forward branches on their input's shape (TinyViT's window attention): traced as the example input takes
the branch, and guarded, so that an input taking the other branch stops with `InputError` instead of running a branch
the model was not traced with. A branch on a tensor's values is still refused, and so is one on the token count of a
token chain (it differs between masked and pruned execution).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import tokenprune
from tokenprune import InputError, UnsupportedModelError
from tokenprune.fx import tracing
from tokenprune.measure.ablation import fixed_keep
from tokenprune.nn.asymmetric import AsymmetricPath


class _Cache(nn.Module):
    """A per-channel bias, zero at initialisation, that evaluation reads from a cache which `train(True)` empties, as
    timm's attention bias table (TinyViT, LeViT): the self-check gives zero parameters values of its own, so a cache
    filled during the check and kept would show as a wrong model."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim, 1, 1))
        self.cache: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self.cache = {}
        return self

    def forward(self, x):
        if self.training or torch.jit.is_tracing():  # as timm's: a jit trace would freeze the cache as a constant
            return x + self.bias
        if "bias" not in self.cache:
            self.cache["bias"] = self.bias.clone()  # as timm's (a gathered copy): with a grad_fn when autograd is on
        return x + self.cache["bias"]


class _WindowBlock(nn.Module):
    """A ConvNeXt-style block whose token mixer branches on the map's size, as TinyViT's does: one path when the map
    is the window's size, another otherwise (here a different one, so a wrongly frozen branch shows). Layer scale 1."""

    def __init__(self, dim: int, window: int, on: str = "shape") -> None:
        super().__init__()
        self.window, self.on = window, on
        self.dw, self.cache = nn.Conv2d(dim, dim, 3, padding=1, groups=dim), _Cache(dim)
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = self.cache(self.dw(x))
        _, _, h, w = y.shape  # of a module's output: to take the branch, the tracer runs the modules before it
        fits = x.mean() > 0 if self.on == "values" else h == self.window and w == self.window
        y = y if fits else y - x.mean((2, 3), keepdim=True)
        y = self.fc2(F.gelu(self.fc1(self.norm(y.permute(0, 2, 3, 1)))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class _WindowNet(nn.Module):
    def __init__(self, on: str = "shape", dim: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.Sequential(*[_WindowBlock(dim, 8, on) for _ in range(4)])
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _sparse(on: str = "shape") -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    dense, x = _WindowNet(on).eval(), torch.randn(2, 3, 32, 32)  # an 8 x 8 map: the window's size
    return dense, tokenprune.sparsify(dense, 0.7, example_inputs=x), x


def test_a_block_branching_on_its_map_size_is_traced_as_the_example_takes_it():
    dense, sparse, x = _sparse()
    described = tokenprune.plan(dense, 0.7, example_inputs=x).describe()
    assert "shape branch taken as the example input took it" in described
    assert "`fits = x.mean() > 0 if self.on ==" in described and "in blocks.1, blocks.2, blocks.3" in described
    for m in sparse.modules():  # the fast paths start near zero; give them weight so a misplaced one would show
        if isinstance(m, AsymmetricPath):
            nn.init.constant_(m.fast.gamma, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(tokenprune.set_execution(sparse, "masked")(x), sparse.eval()(x))
        tokenprune.set_execution(sparse, "auto")
        with fixed_keep(sparse, 1.0):
            for m in sparse.modules():
                if isinstance(m, AsymmetricPath):
                    nn.init.zeros_(m.fast.gamma)
            torch.testing.assert_close(sparse(x), dense(x), atol=1e-5, rtol=1e-5)


def test_an_input_taking_the_other_branch_stops_with_input_error():
    dense, sparse, _ = _sparse()
    other = torch.randn(2, 3, 48, 48)  # a 12 x 12 map: the original takes the other branch
    with torch.no_grad():
        dense(other)
        with pytest.raises(InputError, match=r"_WindowNet block blocks\.1 \(traced with input \[2, 32, 8, 8\]\): "):
            sparse.eval()(other)
        with pytest.raises(InputError, match=r"`fits = .*` \(test_shape_branches\.py:\d+\) was True when the model"):
            sparse.train()(other)


def test_the_guard_survives_pickling():
    """Unpickling a GraphModule traces its code again: the guard stays one call (`nn.leaf.one_call`), still guarding."""
    _, sparse, x = _sparse()
    again = pickle.loads(pickle.dumps(sparse)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), sparse.eval()(x), rtol=0, atol=0)
        with pytest.raises(InputError, match=r"blocks\.1 .* and is False for this input"):
            again(torch.randn(1, 3, 48, 48))


def test_without_the_guard_the_self_check_refuses_the_frozen_branch(monkeypatch):
    """The guard's test: a tracer that took the branch without guarding it leaves a model that runs the wrong branch
    at another size; the self-check's second input size sees it and refuses."""

    def unguarded(self, proxy):
        return bool(self._value(proxy.node)) if self._from_shapes(proxy.node) else None

    monkeypatch.setattr(tracing._ShapeBranches, "resolve", unguarded)
    with pytest.raises(
        UnsupportedModelError,
        match=r"self-check failed: .* does not reproduce the original .* at input size \[3, 64, 64\]",
    ):
        _sparse()


def _cache_effect() -> tuple[float, float]:
    """How far the user's model and the sparsified one (every location kept) are, after `sparsify`, from a copy of the
    user's model taken before it."""
    torch.manual_seed(0)
    dense, x = _WindowNet().eval(), torch.randn(2, 3, 32, 32)
    twin = copy.deepcopy(dense)
    sparse = tokenprune.sparsify(dense, 0.7, example_inputs=x).eval()
    with torch.no_grad(), fixed_keep(sparse, 1.0):
        expected = twin(x)
        return (dense(x) - expected).abs().max().item(), (sparse(x) - expected).abs().max().item()


def test_weight_caches_filled_during_the_self_check_are_dropped(monkeypatch):
    """The self-check gives zero parameters values of its own, and `_Cache` fills in evaluation: the user's model is
    first run in evaluation by the check (at its second input size), and the sparsified model's caches may have been
    emptied by the training-mode trace (TinyViT's were: it was refused). Kept afterwards, a cache holds the check's
    values."""
    assert _cache_effect() == (0.0, pytest.approx(0.0, abs=1e-5))
    from tokenprune.fx import selfcheck

    monkeypatch.setattr(
        selfcheck, "_drop_caches", lambda module: None
    )  # the test's test: the user's model is left wrong
    user, _ = _cache_effect()
    assert user > 1e-3


def test_a_model_holding_a_cache_computed_with_autograd_is_copied():
    """Run in evaluation without `torch.no_grad()`, the cache holds a tensor with a grad_fn, which `copy.deepcopy`
    refuses (a raw RuntimeError from `sparsify` for LeViT, EfficientFormer and TinyViT until 2026-12-07)."""
    torch.manual_seed(0)
    dense, x = _WindowNet().eval(), torch.randn(2, 3, 32, 32)
    dense(x)
    with pytest.raises(RuntimeError, match="deepcopy"):
        copy.deepcopy(dense)
    sparse = tokenprune.sparsify(dense, 0.7, example_inputs=x)
    with torch.no_grad(), fixed_keep(sparse.eval(), 1.0):
        torch.testing.assert_close(sparse(x), dense(x), atol=1e-5, rtol=1e-5)


def test_a_branch_on_tensor_values_is_still_refused():
    with pytest.raises(UnsupportedModelError, match=r"block blocks\.1: torch\.fx cannot trace _WindowBlock"):
        _sparse(on="values")


class _CountingBlock(timm.models.vision_transformer.Block):
    """A ViT block that branches on its token count (or on its channel count)."""

    def __init__(self, dim: int, on: str) -> None:
        super().__init__(dim, 2)
        self.on = on

    def forward(self, x):
        if x.shape[1 if self.on == "tokens" else 2] % 2 == 1:
            x = x * 1.0
        return super().forward(x)


class _CountingViT(nn.Module):
    def __init__(self, on: str) -> None:
        super().__init__()
        self.patch, self.cls = nn.Conv2d(3, 32, 8, 8), nn.Parameter(torch.randn(1, 1, 32))
        self.blocks = nn.Sequential(*[_CountingBlock(32, on) for _ in range(4)])
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        return self.fc(self.blocks(torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1))[:, 0])


def test_a_token_chain_block_may_branch_on_channels_not_on_the_token_count():
    x = torch.randn(2, 3, 64, 64)
    sparse = tokenprune.sparsify(_CountingViT("channels").eval(), 0.7, example_inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(tokenprune.set_execution(sparse, "masked")(x), sparse.eval()(x))
    with pytest.raises(UnsupportedModelError, match=r"block blocks\.1: .* uses the token count .* as a value"):
        tokenprune.sparsify(_CountingViT("tokens").eval(), 0.7, example_inputs=x)


class _SizedBlock(nn.Module):
    """A Twins-style block: the caller passes the map's (H, W) as a tuple, which the block unpacks (`h, w = size`)
    and splats (`view(b, c, *size)`). Layer scale 1."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x, size):
        h, w = size
        b, c = x.shape[:2]
        flat = x.flatten(2)
        y = (self.dw(flat.view(b, c, h, w)) + flat.view(b, c, *size)).permute(0, 2, 3, 1)
        return x + self.fc2(F.gelu(self.fc1(self.norm(y)))).permute(0, 3, 1, 2)


class _SizedNet(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.ModuleList([_SizedBlock(dim) for _ in range(4)])
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.stem(x)
        size = (x.shape[2], x.shape[3])
        for block in self.blocks:
            x = block(x, size)
        return self.head(x.mean((2, 3)))


def test_a_block_taking_its_map_size_as_a_tuple_is_traced(monkeypatch):
    """The size reaches the traced block as a run-time tuple of numbers: unpacked and splatted element by element, it
    follows the input's size (no guard, any size runs). Without that, torch.fx cannot iterate the argument."""
    torch.manual_seed(0)
    dense, x = _SizedNet().eval(), torch.randn(2, 3, 32, 32)
    sparse = tokenprune.sparsify(dense, 0.7, example_inputs=x)
    with torch.no_grad():
        for size in (32, 48):
            y = torch.randn(2, 3, size, size)
            torch.testing.assert_close(tokenprune.set_execution(sparse, "masked")(y), sparse.eval()(y))
            tokenprune.set_execution(sparse, "auto")
            with fixed_keep(sparse, 1.0):
                torch.testing.assert_close(sparse(y), dense(y), atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(tracing._Tracer, "create_proxy", fx.Tracer.create_proxy)
    with pytest.raises(UnsupportedModelError, match=r"cannot trace _SizedBlock .*Proxy object cannot be iterated"):
        tokenprune.sparsify(dense, 0.7, example_inputs=x)
