"""The training-free attention scorer (issue #13): `sparsify(model, ratio, scorer="attention")`.

Properties over a table of real configurations: the stage keeps the top-k tokens of the attention that the block
before it computes (checked against a hand computation from the block's own queries and keys); masked ≡ pruned for
those decisions, in eval and in training (the decision is top-k in both); keep-all ≡ the original; the scoring's
cost is in the FLOP count; the file records the scorer. And the refusals: spatial models, blocks without
self-attention, nn.MultiheadAttention.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from typer.testing import CliRunner

import tokenprune
from tokenprune import ConfigError, UnsupportedModelError
from tokenprune.fx.selfcheck import max_difference
from tokenprune.measure import profile_flops

# name -> small constructor keywords (4 blocks: stages before blocks 1, 2, 3)
MODELS = {
    "deit_small_patch16_224": dict(img_size=64, depth=4),  # class token, fused attention
    "deit_tiny_distilled_patch16_224": dict(img_size=64, depth=4),  # class + distillation token
    "beit_base_patch16_224": dict(img_size=64, depth=4, embed_dim=96, num_heads=3),  # relative position bias
    "eva02_tiny_patch14_224": dict(img_size=56, depth=4),  # rotary embeddings
    "vit_relpos_small_patch16_224": dict(img_size=64, depth=4),  # explicit softmax attention
    "vit_base_patch16_siglip_224": dict(img_size=64, depth=4, embed_dim=96, num_heads=3),  # no class token
}


_PAIRS: dict[str, tuple[tuple[torch.nn.Module, torch.nn.Module], torch.Tensor]] = {}


@pytest.fixture(scope="module", autouse=True)
def _free_pairs():
    yield
    _PAIRS.clear()


def _pair(name):
    """(dense, sparse) as built from seed 0: a copy of one build per model (tests change them), with the random
    state a fresh build leaves, so what a test draws next does not depend on which test built it first."""
    if name not in _PAIRS:
        torch.manual_seed(0)
        dense = timm.create_model(name, **MODELS[name]).eval()
        _PAIRS[name] = (dense, tokenprune.sparsify(dense, 0.7, scorer="attention").eval()), torch.get_rng_state()
    pair, rng = _PAIRS[name]
    torch.set_rng_state(rng)
    return copy.deepcopy(pair)


def _x(sparse, batch=3):
    return torch.randn(batch, *tokenprune.config_of(sparse).input_size)


def _class_attention(dense, x, block: int) -> torch.Tensor:
    """What the scorer should use, computed by hand: block `block`'s attention [B, N] (class row or mean received)."""
    seen = {}
    attn = dense.blocks[block].attn
    attn.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    with torch.no_grad():
        dense(x)
    h = seen["x"]
    b, n, c = h.shape
    q, k, _ = attn.qkv(h).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    weights = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1).mean(1)  # [B, N, N]
    return weights[:, 0]


def test_first_stage_keeps_the_top_k_of_the_class_attention_of_the_block_before():
    dense, sparse = _pair("deit_small_patch16_224")
    x = _x(sparse)
    with torch.no_grad():
        sparse(x)
    stage = tokenprune.selectors(sparse)[0]
    expected = _class_attention(dense, x, 0)[:, 1:].topk(stage.keep_count(16), dim=1).indices.sort(1).values
    assert torch.equal(stage.last_index, expected)


def test_table_masked_equals_pruned_and_keep_all_equals_original_in_eval_and_training():
    for name in MODELS:
        dense, sparse = _pair(name)
        x = _x(sparse)
        with torch.no_grad():
            pruned = sparse(x)
            tokenprune.set_execution(sparse, "masked")
            masked = sparse(x)
            sparse.train()  # training decisions are top-k too: the same tokens, so the same output
            for m in sparse.modules():  # the model's own training randomness aside (vit_relpos: bias MLP dropout)
                if isinstance(m, torch.nn.Dropout):
                    m.eval()
            trained = sparse(x)
            state = tokenprune.sparsity_state(sparse)
            tokenprune.set_execution(sparse, "auto")
            sparse.eval()
        assert max_difference(masked, pruned) <= 1, name
        assert max_difference(trained, pruned) <= 1, name
        patches = x.shape[-1] // dense.patch_embed.patch_size[0]
        kept = [float(d.sum(1).mean()) for d in state.decisions]
        assert kept == [max(1, int(r * patches**2 + 1e-6)) for r in (0.7, 0.49, 0.343)], name
        for s in tokenprune.selectors(sparse):
            s.keep_ratio = 1.0
        with torch.no_grad():
            assert max_difference(sparse(x), dense(x)) <= 1, name


def test_training_sends_gradients_to_the_backbone_not_to_scores():
    _, sparse = _pair("deit_small_patch16_224")
    sparse.train()
    sparse(_x(sparse)).sum().backward()
    assert not any(True for s in tokenprune.selectors(sparse) for _ in s.parameters())
    assert sparse.blocks[3].mlp.fc1.weight.grad.abs().sum() > 0


def test_scoring_cost_is_counted_class_row_and_full_matrix():
    for name, per_stage in (("deit_small_patch16_224", lambda n, c: n * c), ("vit_base_patch16_siglip_224",
                                                                              lambda n, c: n * n * c)):  # fmt: skip
        dense, sparse = _pair(name)
        x = _x(sparse, 1)
        flops = profile_flops(sparse, x)
        scoring = {k: v for k, v in flops.predictors.items() if k.endswith("tokenprune_scores")}
        assert len(scoring) == 3
        c, counts = dense.embed_dim, [16 + dense.num_prefix_tokens, 11 + dense.num_prefix_tokens,
                                      7 + dense.num_prefix_tokens]  # fmt: skip
        # tokens entering the blocks before each stage: all, then after stages 0 and 1
        assert list(scoring.values()) == [per_stage(n, c) for n in counts], name
        assert flops.predictor_gmacs > 0


def test_saved_file_records_the_scorer_and_loads_it(tmp_path):
    dense = tokenprune.create_model("deit_small_patch16_224", img_size=64, depth=4)
    sparse = tokenprune.sparsify(dense, 0.7, scorer="attention").eval()
    path = tokenprune.save(sparse, tmp_path / "m.safetensors")
    loaded = tokenprune.load(path).eval()
    assert tokenprune.config_of(loaded).scorer == "attention"
    x = _x(sparse)
    with torch.no_grad():
        assert torch.allclose(loaded(x), sparse(x), atol=1e-5)


def test_cli_convert_scorer_attention_reports_it(tmp_path):
    from tokenprune.cli import app

    result = CliRunner().invoke(
        app,
        ["convert", "deit_tiny_patch16_224", "--out", str(tmp_path), "--scorer", "attention", "--flops-only",
         "--input-size", "64", "-k", "depth=4"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "scorer attention" in (tmp_path / "report.md").read_text()
    assert tokenprune.config_of(tokenprune.load(tmp_path / "model.safetensors")).scorer == "attention"


class _MlpBlock(torch.nn.Module):
    """A per-token MLP of a transformer's width (C -> 4C -> C): wide enough that pruning pays for the predictors."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(32)
        self.fc = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))

    def forward(self, x):
        return x + self.fc(self.norm(x))


class _MlpTokens(torch.nn.Module):
    """A token model whose blocks are per-token MLPs: sparsifiable with predictors, but it has no attention."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 32, 8, 8)
        self.blocks = torch.nn.Sequential(*(_MlpBlock() for _ in range(4)))
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x).flatten(2).transpose(1, 2)).mean(1))


def test_refusals_name_the_reason():
    tokenprune.sparsify(_MlpTokens().eval(), 0.7, example_inputs=torch.randn(1, 3, 64, 64))  # predictors: fine
    cases = [
        (timm.create_model("convnext_atto"), "spatially"),
        (_MlpTokens(), "no self-attention"),
        (torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=4, num_heads=3, hidden_dim=96,
                                              mlp_dim=192), "MultiheadAttention"),
    ]  # fmt: skip
    for model, reason in cases:
        try:
            tokenprune.sparsify(model.eval(), 0.7, scorer="attention", example_inputs=torch.randn(1, 3, 64, 64))
        except UnsupportedModelError as e:
            assert reason in str(e), str(e)
        else:
            raise AssertionError(f"{type(model).__name__} was not refused")
    try:
        tokenprune.sparsify(timm.create_model("deit_tiny_patch16_224", img_size=64, depth=4), 0.7, scorer="cls")
    except ConfigError as e:
        assert "predictor, attention" in str(e)
    else:
        raise AssertionError("a bad scorer was accepted")


@pytest.mark.slow
def test_onnx_export_of_the_attention_scorer_matches_pytorch(tmp_path):
    _, sparse = _pair("deit_small_patch16_224")
    result = tokenprune.export(sparse, tmp_path / "m.onnx", format="onnx")
    assert result["max_abs_diff"] < 1e-4
