"""The modern zoo: rotary embeddings, attention biases, class attention, attention pooling, registers (issue #10).

A table of small real configurations x the properties that make the method correct: eval drops tokens; masked
(training) and pruned (inference) computations agree for the same decisions; keep-all equals the original; every
predictor gets a gradient. And the guards: the self-check refuses a rewrite that is wrong, a refusal leaves an
``inplace`` model exactly as it was, a sparsified model that would cost more is refused, attention dropout keeps
working in training.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import tokenprune
from tokenprune import UnsupportedModelError
from tokenprune.fx.selfcheck import max_difference
from tokenprune.measure.ablation import fixed_keep

# name -> constructor keywords that keep it small (4 blocks: stages before blocks 1, 2, 3)
MODELS = {
    "eva02_tiny_patch14_224": dict(img_size=56, depth=4),  # rotary embeddings, SwiGLU
    "vit_small_patch16_rope_224": dict(img_size=64, depth=4),  # rope ViT
    "beit_base_patch16_224": dict(img_size=64, depth=4, embed_dim=96, num_heads=3),  # relative position bias
    "beitv2_base_patch16_224": dict(img_size=64, depth=4, embed_dim=96, num_heads=3),
    "vit_relpos_small_patch16_224": dict(img_size=64, depth=4),  # relative position bias (explicit softmax path)
    "cait_xxs24_224": dict(img_size=64, depth=4),  # class-attention blocks in the head, talking heads
    "vit_base_patch16_siglip_224": dict(img_size=64, depth=4, embed_dim=96, num_heads=3),  # MAP head
    "vit_small_patch14_reg4_dinov2": dict(img_size=56, depth=4),  # register tokens
    "deit3_small_patch16_224": dict(img_size=64, depth=4),
    "flexivit_small": dict(img_size=64, depth=4),
    "vit_base_patch32_clip_224": dict(img_size=64, depth=4, embed_dim=96, num_heads=3),  # CLIP tower (norm_pre)
}


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request):
    torch.manual_seed(0)
    dense = timm.create_model(request.param, **MODELS[request.param]).eval()
    return request.param, dense, tokenprune.sparsify(dense, 0.7).eval()


def _x(sparse, batch=3):
    return torch.randn(batch, *tokenprune.config_of(sparse).input_size)


def test_eval_drops_tokens_and_masked_equals_pruned(pair):
    _, _, sparse = pair
    x = _x(sparse)
    seen = {}
    last = tokenprune.config_of(sparse).chain[-1]

    def record(module, args):
        seen.setdefault("n", args[0].shape[1])

    handle = sparse.get_submodule(last).register_forward_pre_hook(record)
    with torch.no_grad():
        pruned = tokenprune.set_execution(sparse, "pruned")(x)
        handle.remove()
        masked = tokenprune.set_execution(sparse, "masked")(x)
    tokenprune.set_execution(sparse, "auto")
    config = tokenprune.config_of(sparse)
    patches = tokenprune.selectors(sparse)[0].last_initial_patches
    assert seen["n"] == config.prefix_tokens + int(config.keep_ratios[-1] * patches + 1e-6)
    assert max_difference(masked, pruned) <= 1


def test_keep_all_equals_original(pair):
    _, dense, sparse = pair
    x = _x(sparse)
    ratios = [s.keep_ratio for s in tokenprune.selectors(sparse)]
    for s in tokenprune.selectors(sparse):
        s.keep_ratio = 1.0
    try:
        with torch.no_grad():
            assert max_difference(sparse(x), dense(x)) <= 1
    finally:
        for s, r in zip(tokenprune.selectors(sparse), ratios):
            s.keep_ratio = r


def test_every_predictor_gets_a_gradient(pair):
    _, _, sparse = pair
    model = copy.deepcopy(sparse).train()
    model(_x(model, 2)).square().mean().backward()
    for name, p in model.named_parameters():
        if name.startswith("tokenprune_stage"):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_self_check_refuses_a_wrong_rewrite(monkeypatch):
    """Sabotage the token flow (drop its edits in the head): the self-check must catch the difference."""
    from tokenprune.fx import tokenflow

    real = tokenflow.apply

    def without_edits(gm, plan, roots):
        if any("mean over tokens" in n for n in plan.notes):  # the head's average pooling
            plan.replace.clear()
        return real(gm, plan, roots)

    monkeypatch.setattr(tokenflow, "apply", without_edits)
    model = timm.create_model("vit_medium_patch16_gap_256", img_size=64, depth=4).eval()  # average-pooling head
    with pytest.raises(UnsupportedModelError, match="self-check failed: masked execution"):
        tokenprune.sparsify(model, 0.7)


REFUSED = {
    "resnet18": (dict(), "no slow path"),
    "regnetx_002": (dict(), "would not save compute"),
    "gmlp_ti16_224": (dict(img_size=64), "mixes the token axis .* Sparsified spatially, it is refused too"),
    "pvt_v2_b0": (
        dict(),
        "reshapes the token axis .* Sparsified spatially, it is refused too: .*would not save compute",
    ),
    "coat_lite_tiny": (dict(), "uses the token count"),  # asserts N == 1 + H * W, then folds tokens into a grid
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refusal_names_the_reason_and_leaves_an_inplace_model_as_it_was(name):
    kwargs, reason = REFUSED[name]
    model = timm.create_model(name, **kwargs).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    attrs = {n: set(vars(m)) for n, m in modules.items()}
    with pytest.raises(UnsupportedModelError, match=reason):
        tokenprune.sparsify(model, 0.7, inplace=True)
    assert dict(model.named_modules()) == modules
    assert {n: set(vars(m)) for n, m in model.named_modules()} == attrs
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not model.training


def test_self_check_refusal_leaves_an_inplace_model_as_it_was(monkeypatch):
    from tokenprune.fx import selfcheck

    monkeypatch.setattr(selfcheck, "max_difference", lambda a, b: 2.0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=4).eval()
    modules = dict(model.named_modules())
    with pytest.raises(UnsupportedModelError, match="self-check failed"):
        tokenprune.sparsify(model, 0.7, inplace=True)
    assert dict(model.named_modules()) == modules and not tokenprune.selectors(model)


def test_attention_dropout_stays_on_in_training():
    """Blocks are traced in eval mode; `dropout_p=p if self.training else 0.` must not freeze to 0."""
    model = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=4, attn_drop_rate=0.5).eval()
    sparse = tokenprune.sparsify(model, 0.7)
    x = torch.randn(2, 3, 64, 64)
    sparse.train()
    for sel in tokenprune.selectors(sparse):
        sel.execution = "pruned"  # same tokens every call: any difference comes from dropout
    torch.manual_seed(0)
    a = sparse(x)
    torch.manual_seed(1)
    b = sparse(x)
    assert not torch.allclose(a, b), "attention dropout is off in training"
    sparse.eval()
    with torch.no_grad():
        assert torch.equal(sparse(x), sparse(x)), "dropout must be off in eval"


class _Cached(nn.Module):
    """A module with a cache that evaluation fills and `train()` empties, as LeViT's attention has."""

    def __init__(self) -> None:
        super().__init__()
        self.cache: dict[str, object] = {}

    def train(self, mode: bool = True):
        super().train(mode)
        self.cache = {}
        return self


class _CachedScale(_Cached):
    """A learned per-channel scale that evaluation reads from a cache, as LeViT's and EfficientFormer's attention read
    their bias table: both modes compute the same value, on different paths."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.randn(dim) * 0.1)

    def forward(self, x):
        if self.training:
            return x * self.log_scale.exp()
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.log_scale.exp()
        return x * self.cache[key]


class _Chooser(_Cached):
    """Calls one submodule in training and another in evaluation: the traces part at a call of a module torch.fx
    keeps as a call anyway (a Linear), so it is this module's forward that branches."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.a.load_state_dict(self.b.state_dict())

    def forward(self, x):
        if self.training:
            return self.a(x)
        self.cache["cpu"] = 1  # marks the evaluation path, as `_CachedScale`'s cache does
        return self.b(x)


class _CachedViT(nn.Module):
    """A tiny ViT whose embedding goes through a module that branches on the training flag before the blocks (or,
    with `own`, whose own forward branches on it)."""

    def __init__(self, embed: type[nn.Module] = _CachedScale, own: bool = False) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, 32))
        self.blocks = nn.Sequential(*[timm.models.vision_transformer.Block(32, 2) for _ in range(4)])
        self.fc = nn.Linear(32, 5)
        self.own, self.embed_scale = own, embed(32)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = self.embed_scale(x) if not self.own else x * 2.0 if self.training else x + 0.0
        x = self.blocks(torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1))
        return self.fc(x[:, 0])


@pytest.mark.parametrize("embed", [_CachedScale, _Chooser], ids=lambda c: c.__name__)
def test_a_module_branching_on_the_training_flag_is_kept_as_one_call(embed):
    """Its two traces part, so tracing through it would freeze one mode; kept as a call, each mode runs its own path
    (evaluation fills the cache) and with every token kept the rewritten model is the original."""
    torch.manual_seed(0)
    dense, x = _CachedViT(embed).eval(), torch.randn(2, 3, 64, 64)
    said = "kept as calls, their forward branching on self.training (each mode runs its own path): "
    assert f"{said}embed_scale ({embed.__name__})" in tokenprune.plan(dense, 0.7, example_inputs=x).describe()
    sparse = tokenprune.sparsify(dense, 0.7, example_inputs=x)
    assert [n.target for n in sparse.graph.nodes if n.target == "embed_scale"] == ["embed_scale"]
    with torch.no_grad(), fixed_keep(sparse, 1.0):
        sparse.eval().embed_scale.cache.clear()
        torch.testing.assert_close(sparse(x), dense(x), atol=1e-5, rtol=1e-5)
        assert list(sparse.embed_scale.cache) == ["cpu"]  # the evaluation path ran, at run time
        sparse.train()(x)
        assert not sparse.embed_scale.cache  # train() emptied it, and the training path did not fill it


def test_a_model_branching_on_the_training_flag_in_its_own_forward_is_refused():
    with pytest.raises(UnsupportedModelError, match=r"different path in training than in eval.*_CachedViT's own"):
        tokenprune.sparsify(_CachedViT(own=True).eval(), 0.7, example_inputs=torch.randn(2, 3, 64, 64))


def test_plan_describes_without_changing_the_model():
    model = timm.create_model("beit_base_patch16_224", img_size=64, depth=4, embed_dim=96, num_heads=3).eval()
    text = tokenprune.plan(model, 0.7).describe()
    assert "stages before blocks blocks.1" in text and "with its bias" in text
    assert not tokenprune.selectors(model) and isinstance(model.blocks[1], nn.Module)
    assert type(model.blocks[1]).__name__ == "Block"


class _ConcatViT(nn.Module):
    """A tiny ViT whose class token is joined with `torch.concatenate` and whose head returns the tokens or a mean."""

    def __init__(self, cat=torch.concatenate, head="token"):
        super().__init__()
        self.cat, self.head = cat, head
        self.patch = nn.Conv2d(3, 32, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, 32))
        self.blocks = nn.Sequential(*[timm.models.vision_transformer.Block(32, 2) for _ in range(4)])
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = self.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.blocks(x)
        return x if self.head == "tokens" else self.fc(x[:, 0])


@pytest.mark.parametrize("cat", [torch.cat, torch.concat, torch.concatenate], ids=lambda f: f.__name__)
def test_every_concatenation_finds_the_prefix_token(cat):
    sparse = tokenprune.sparsify(_ConcatViT(cat).eval(), 0.7, example_inputs=torch.randn(2, 3, 64, 64))
    assert tokenprune.config_of(sparse).prefix_tokens == 1


def test_a_model_returning_its_tokens_gets_the_whole_token_set_back():
    dense = _ConcatViT(head="tokens").eval()
    x = torch.randn(2, 3, 64, 64)
    sparse = tokenprune.sparsify(dense, 0.7, example_inputs=x[:1]).eval()
    with torch.no_grad():
        assert sparse(x).shape == dense(x).shape  # refilled (tests/test_dense_vit.py checks the values)
