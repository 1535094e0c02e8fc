"""FLOP (multiply-add) counting: exact counts on small modules, published figures on real models."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import fx, nn

import tokenprune
from tokenprune.measure.flops import FlopReport, count_params, profile_flops


class TinyAttention(nn.Module):
    """timm-style attention through F.scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class SelfMHA(nn.Module):
    def __init__(self, dim: int, heads: int, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.batch_first else x.transpose(0, 1)
        return self.attn(x, x, x, need_weights=False)[0]


class CrossMHA(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return self.attn(q, kv, kv, need_weights=False)[0]


class Negligible(nn.Module):
    """One linear layer surrounded by ops that are deliberately counted as zero."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.fc(self.norm(x))).softmax(-1) * 2.0 + 1.0
        idx = y[..., 0].topk(3, dim=1).indices
        return torch.gather(y, 1, idx.unsqueeze(-1).expand(-1, -1, 4)).mean(1)


class Unknown(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x, x)


def test_linear_exact() -> None:
    report = profile_flops(nn.Linear(16, 32), torch.randn(4, 10, 16))
    assert report.total_macs == 4 * 10 * 16 * 32
    assert report.params == 16 * 32 + 32
    assert report.uncounted_ops == {}


def test_conv_exact() -> None:
    report = profile_flops(nn.Conv2d(3, 8, 3, padding=1), torch.randn(2, 3, 8, 8))
    # every output position of every output channel: a 3x3x3 dot product
    assert report.total_macs == 2 * 8 * 8 * 8 * (3 * 3 * 3)


def test_sdpa_attention_exact() -> None:
    b, n, c, h = 2, 10, 32, 4
    report = profile_flops(TinyAttention(c, h), torch.randn(b, n, c))
    qkv, scores, weighted, proj = b * n * c * 3 * c, b * h * n * n * (c // h), b * h * n * n * (c // h), b * n * c * c
    assert report.total_macs == qkv + scores + weighted + proj
    assert report.by_operator["scaled_dot_product_attention"] == scores + weighted
    assert report.uncounted_ops == {}


@pytest.mark.parametrize("batch_first", [True, False], ids=["fused-native-mha", "decomposed-mha"])
def test_multihead_attention_exact(batch_first: bool) -> None:
    # batch_first=True takes the fused aten::_native_multi_head_attention path under no_grad; False the Python path
    b, n, e, h = 2, 9, 24, 3
    report = profile_flops(SelfMHA(e, h, batch_first), torch.randn(b, n, e))
    expected = b * n * e * 3 * e + 2 * b * n * n * e + b * n * e * e
    assert report.total_macs == expected
    assert report.uncounted_ops == {}


def test_cross_attention_exact() -> None:
    b, lq, s, e = 2, 5, 7, 16
    report = profile_flops(CrossMHA(e, 2), (torch.randn(b, lq, e), torch.randn(b, s, e)))
    expected = b * lq * e * e + 2 * b * s * e * e + 2 * b * lq * s * e + b * lq * e * e
    assert report.total_macs == expected


def test_broadcast_matmul_exact() -> None:
    class M(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a @ b

    report = profile_flops(M(), (torch.randn(6, 5), torch.randn(3, 5, 4)))
    assert report.total_macs == 3 * 6 * 5 * 4


def test_negligible_ops_are_zero_and_not_reported() -> None:
    report = profile_flops(Negligible(), torch.randn(2, 6, 8))
    assert report.total_macs == 2 * 6 * 8 * 4
    assert report.uncounted_ops == {}
    assert {"aten::layer_norm", "aten::gelu", "aten::softmax", "aten::topk"} <= set(report.negligible_ops)


def test_unknown_op_is_reported_not_silently_zero() -> None:
    report = profile_flops(Unknown(), torch.randn(1, 4, 3))
    assert any("cdist" in op for op in report.uncounted_ops), report.uncounted_ops


def test_training_mode_restored() -> None:
    model = TinyAttention(8, 2).train()
    profile_flops(model, torch.randn(1, 3, 8))
    assert all(m.training for m in model.modules())


def test_graph_module_ops_attributed_to_their_blocks() -> None:
    # An FX GraphModule inlines the blocks: their SDPA calls must still be charged to the right block.
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2).eval()
    graph_module = fx.symbolic_trace(model)
    x = torch.randn(1, 3, 64, 64)
    eager, traced = profile_flops(model, x), profile_flops(graph_module, x)
    assert traced.total_macs == eager.total_macs
    for name in ("blocks.0", "blocks.1", "blocks.1.attn"):
        assert traced.by_module[name] == eager.by_module[name] > 0


def test_report_fields() -> None:
    report = profile_flops(nn.Linear(10, 10), torch.randn(4, 10))
    assert isinstance(report, FlopReport)
    assert report.gmacs == pytest.approx(100 / 1e9)  # per image
    assert report.predictor_gmacs == 0.0 and report.predictors == {}
    assert count_params(nn.Linear(10, 10)) == 110


# Published figures (DESIGN.md 1.3): GFLOPs = GMACs at 224x224.
DENSE = [("deit_small_patch16_224", 4.6), ("deit_base_patch16_224", 17.6)]


@pytest.mark.parametrize("name,published", DENSE)
def test_dense_timm_matches_published(name: str, published: float) -> None:
    report = profile_flops(timm.create_model(name, pretrained=False), torch.randn(1, 3, 224, 224))
    assert report.uncounted_ops == {}
    assert report.gmacs == pytest.approx(published, rel=0.02)


def test_torchvision_vit_b_16() -> None:
    torchvision = pytest.importorskip("torchvision")
    report = profile_flops(torchvision.models.vit_b_16(), torch.randn(1, 3, 224, 224))
    assert report.uncounted_ops == {}
    assert report.gmacs == pytest.approx(17.6, rel=0.02)


def _sparse(name: str, ratio: float) -> nn.Module:
    if not hasattr(tokenprune, "sparsify"):
        pytest.skip("tokenprune.sparsify is not available yet")
    return tokenprune.sparsify(timm.create_model(name, pretrained=False).eval(), ratio=ratio)


# Published sparse figures at rho=0.7 and the predictors' cost that we count on top of the backbone.
# DeiT-S: backbone ~2.88 G (published 2.9), predictors ~0.10 G -> total ~2.98 G, +2.8%: inside 4% anyway.
# DeiT-B: backbone ~11.06 G, predictors ~0.41 G -> total ~11.47 G (published 11.4 seems to include them).
SPARSE = [("deit_small_patch16_224", 2.9), ("deit_base_patch16_224", 11.4)]


@pytest.mark.parametrize("name,published", SPARSE)
def test_sparse_timm_matches_published(name: str, published: float) -> None:
    model = _sparse(name, 0.7)
    report = profile_flops(model, torch.randn(1, 3, 224, 224))
    assert report.uncounted_ops == {}
    assert report.gmacs == pytest.approx(published, rel=0.04)
    # the predictors are counted and reported separately, and they are a small share
    assert len(report.predictors) == 3
    assert 0.0 < report.predictor_gmacs < 0.05 * report.gmacs
    # later blocks run on fewer tokens: the per-block breakdown falls stage by stage
    blocks = list(report.blocks.values())
    assert len(blocks) == 12 and all(v > 0 for v in blocks)
    assert blocks[0] > blocks[3] > blocks[6] > blocks[9]
