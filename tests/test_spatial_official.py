"""The spatial variant against the official AdaConvNeXt/AdaSwin code (raoyongming/DynamicViT, issue #25 item 2):
distillation on the normalised final-stage map, stochastic depth on the fast path, Swin's fast path without a layer
scale (docs/design.md §1.2, §3.1)."""

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision

import tokenprune
from tokenprune.measure.ablation import fixed_keep
from tokenprune.nn.asymmetric import AsymmetricPath, FastPath
from tokenprune.train.losses import LossWeights, hook_teacher, sparsity_terms

torch.manual_seed(0)

SIZE = 64


def _convnext(**kw):
    return timm.create_model("convnext_tiny", dims=(8, 16, 32, 64), num_classes=10, **kw)


def _swin(**kw):
    return timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=SIZE, embed_dim=16, num_heads=(1, 1, 2, 2), window_size=2,
        num_classes=10, **kw,
    )  # fmt: skip


def _images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE)


def _layer_norm_channels_first(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """The official featmap: the final norm applied per location of the unpooled [B, C, H, W] map, written out."""
    x = x.permute(0, 2, 3, 1)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _distill_term(teacher, student, x, point="auto"):
    """The library's distillation term for one training forward of `student`, the teacher hooked as the trainer does."""
    weights = LossWeights.for_kind("spatial", distill_point=point)
    student(x)
    state = tokenprune.sparsity_state(student)
    seen = {}
    handle = hook_teacher(teacher, state, point, lambda out: seen.setdefault("features", out))
    with torch.no_grad():
        teacher(x)
    handle.remove()
    return sparsity_terms(weights, state, seen["features"], None)["distill"], state


@pytest.mark.parametrize("family", ["convnext", "swin"])
def test_final_map_distillation_matches_a_plain_pytorch_reference(family):
    teacher = (_convnext if family == "convnext" else _swin)().eval()
    x = _images()
    student = tokenprune.sparsify(teacher, 0.7, example_inputs=x)
    norm = student.head.norm if family == "convnext" else student.norm
    with torch.no_grad():  # each model normalises with its own norm: make the student's differ from the teacher's
        norm.weight.mul_(torch.rand_like(norm.weight) + 0.5)
        norm.bias.add_(torch.randn_like(norm.bias))
    student.train()
    maps = {}
    # Reference taps, independent of the library's analysis: the map the head's pooling reads (ConvNeXt), the final
    # norm's output (Swin, whose norm is applied before pooling).
    if family == "convnext":
        tap = student.head.global_pool.pool.register_forward_pre_hook(lambda _m, args: maps.setdefault("s", args[0]))
    else:
        tap = student.norm.register_forward_hook(lambda _m, _i, out: maps.setdefault("s", out))
    torch.manual_seed(1)
    got, state = _distill_term(teacher, student, x)
    tap.remove()

    with torch.no_grad():
        teacher_map = teacher.forward_features(x)  # the final stage's output (Swin: after its final norm)
    if family == "convnext":
        t = _layer_norm_channels_first(teacher_map, teacher.head.norm)
        s = _layer_norm_channels_first(maps["s"], student.head.norm)
        assert tuple(t.shape[1:3]) == (SIZE // 32, SIZE // 32)  # the final stage's map, not stage 3's
    else:
        t, s = teacher_map, maps["s"]
    expected = ((s - t) ** 2).mean()
    assert state.final_map is not None
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-9)
    assert got.item() > 0
    got.backward()  # the term trains the student's own final norm, as the official featmap does
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0


def test_last_block_option_reads_the_chain_output():
    teacher = _convnext().eval()
    x = _images()
    student = tokenprune.sparsify(teacher, 0.7, example_inputs=x).train()
    maps = {}
    last = tokenprune.config_of(student).chain[-1]
    tap = teacher.get_submodule(last).register_forward_hook(lambda _m, _i, out: maps.setdefault("t", out))
    torch.manual_seed(1)
    got, state = _distill_term(teacher, student, x, point="last_block")
    tap.remove()
    assert state.final_tokens.shape == maps["t"].shape
    assert got.item() == pytest.approx(F.mse_loss(state.final_tokens, maps["t"]).item(), rel=1e-5)


def test_features_only_backbone_distils_the_chain_output():
    backbone = timm.create_model("convnext_atto", features_only=True).eval()
    x = _images(2)
    student = tokenprune.sparsify(backbone, 0.7, example_inputs=x).train()
    student(x)
    state = tokenprune.sparsity_state(student)
    assert state.final_map is None and state.final_normed is None
    with pytest.raises(tokenprune.ConfigError, match="distill_point='final'"):
        sparsity_terms(LossWeights.for_kind("spatial", distill_point="final"), state, state.final_tokens, None)
    terms = sparsity_terms(LossWeights.for_kind("spatial"), state, state.final_tokens.detach(), None)
    assert terms["distill"].item() == 0.0


def _with_fast_paths_at_one(model):
    """Fast-path layer scales at 1 (1e-6 at init would make the fast path's contribution vanish in comparisons)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FastPath) and module.gamma is not None:
                module.gamma.fill_(1.0)
    return model


@pytest.mark.parametrize("family", ["convnext", "swin"])
def test_stochastic_depth_drops_the_fast_path_with_the_slow_path(family):
    """Official AdaConvNeXt: `x2 = input_x[1] + self.drop_path(x2)`; here one draw per sample scales the mixed branch,
    so a sample whose slow path is dropped loses its fast path's contribution too, and only then."""
    p = 0.5
    dense = (_convnext if family == "convnext" else _swin)(drop_path_rate=p).eval()
    x = _images(8)
    model = _with_fast_paths_at_one(tokenprune.sparsify(dense, 0.7, example_inputs=x)).train()
    block = model.get_submodule(tokenprune.config_of(model).chain[-1])
    drop = block.drop_path if family == "convnext" else block.drop_path2
    assert drop.drop_prob > 0
    drop.drop_prob = p  # this block's share of the linear schedule, raised so that a batch of 8 shows both outcomes
    seen = {}
    hooks = [
        block.fast_path.register_forward_hook(lambda _m, _i, out: seen.setdefault("mixed", out)),
        drop.register_forward_hook(lambda _m, _i, out: seen.setdefault("dropped", out)),
    ]
    torch.manual_seed(3)
    model(x)
    for h in hooks:
        h.remove()
    mask = tokenprune.sparsity_state(model).final_mask  # [B, H*W, 1]: 1 where the last blocks ran the slow path
    mixed, dropped = seen["mixed"], seen["dropped"]
    assert mixed.shape == dropped.shape  # the drop acts on the mixed branch, after the fast path joined it
    per_sample = [None] * x.shape[0]
    for i in range(x.shape[0]):
        kept = (mask[i, :, 0] > 0.5).any() and (mask[i, :, 0] < 0.5).any()
        assert kept, "the test needs both paths in every sample"
        scale = dropped[i] / mixed[i]
        finite = scale[mixed[i].abs() > 1e-6]
        assert torch.allclose(finite, finite[0].expand_as(finite), rtol=1e-4), "one value per sample, both paths"
        kept_scale = 1 / (1 - drop.drop_prob)
        assert finite[0].item() == pytest.approx(0.0, abs=1e-6) or finite[0].item() == pytest.approx(kept_scale)
        per_sample[i] = finite[0].item() == 0.0
    assert any(per_sample) and not all(per_sample)  # some samples dropped, some kept (seeded)

    model.eval()  # evaluation: no drop at all
    seen.clear()
    hooks = [
        block.fast_path.register_forward_hook(lambda _m, _i, out: seen.setdefault("mixed", out)),
        drop.register_forward_hook(lambda _m, _i, out: seen.setdefault("dropped", out)),
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert torch.equal(seen["mixed"], seen["dropped"])


@pytest.mark.parametrize(
    "make, scaled, eps",
    [
        (_convnext, True, 1e-6),
        (_swin, False, 1e-5),
        (lambda: torchvision.models.convnext_tiny(num_classes=10), True, 1e-6),
        (lambda: torchvision.models.swin_t(num_classes=10), False, 1e-5),
    ],
    ids=["timm_convnext", "timm_swin", "tv_convnext", "tv_swin"],
)
def test_fast_path_has_a_layer_scale_only_where_the_block_has_one(make, scaled, eps):
    """Official AdaConvNeXt: fast_path + fast_path_gamma, LayerNorm eps 1e-6; AdaSwin: fastMlp = LayerNorm (eps 1e-5)
    + Linear, no scale. Decided from the block's own graph, and either way a fresh fast path is (almost) harmless."""
    x = _images(2)
    model = tokenprune.sparsify(make().eval(), 0.7, example_inputs=x)
    paths = [m for m in model.modules() if isinstance(m, AsymmetricPath)]
    assert paths
    rows = torch.randn(2, 5, paths[0].fast.proj.in_features)
    for path in paths:
        assert (path.fast.gamma is not None) == scaled
        assert path.fast.norm.eps == eps
        out = path.fast(rows)
        assert 0 < out.abs().max() < 1e-4 * rows.abs().max()  # harmless, yet the decision's gradient is not zero
        if not scaled:
            assert not any(name.endswith("gamma") for name, _ in path.named_parameters())


TINY_CONVNEXT = [
    "model.name=convnext_tiny",
    "model.kwargs={dims: [8, 16, 32, 64], num_classes: 4, in_chans: 1, drop_path_rate: 0.2}",
    "data.source=synthetic",
    "data.img_size=64",
    "data.num_classes=4",
    "data.synthetic_size=4",
    "data.workers=0",
    "optim.batch_size=4",
    "optim.epochs=1",
    "optim.warmup_epochs=0",
    "run.threads=1",
]


def test_harness_distils_the_normalised_final_map(tmp_path, monkeypatch):
    """One training step of the real harness (`finetune`, recipe defaults): its distillation part is the MSE between
    the student's and the teacher's final-stage maps, each after its own head norm, recomputed here by hand."""
    from tokenprune.train import finetune
    from tokenprune.train.trainer import Trainer

    seen = []
    original = Trainer._forward_loss

    def capture(self, x, y):
        maps = {}
        taps = [
            self.student.head.global_pool.pool.register_forward_pre_hook(lambda _m, a: maps.setdefault("s", a[0])),
            self.teacher.head.global_pool.register_forward_pre_hook(lambda _m, a: maps.setdefault("t", a[0])),
        ]
        try:
            out, kept = original(self, x, y)
        finally:
            for tap in taps:
                tap.remove()
        if not seen:
            s = _layer_norm_channels_first(maps["s"], self.student.head.norm)
            t = _layer_norm_channels_first(maps["t"], self.teacher.head.norm)
            seen.append((float(out.parts["distill"].detach()), float(((s - t) ** 2).mean()), tuple(t.shape)))
        return out, kept

    monkeypatch.setattr(Trainer, "_forward_loss", capture)
    finetune(None, overrides=[*TINY_CONVNEXT, f"run.output_dir={tmp_path / 'run'}"])
    got, reference, shape = seen[0]
    assert shape == (4, 2, 2, 64)  # the final stage's map at 64x64 input, channels last after the norm
    assert reference > 0
    assert got == pytest.approx(reference, rel=1e-4, abs=1e-9)


class _Gated(torch.nn.Module):
    """A ConvNeXt classifier behind Python control flow on tensor values: only its `net` is sparsified."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _convnext()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().max() > 100:  # data-dependent: torch.fx cannot trace this
            x = x / x.abs().max()
        return self.net(x)


def test_final_map_names_are_qualified_in_the_whole_model():
    """A sparsified part's final-map point names the teacher's modules in the whole (dense) model."""
    torch.manual_seed(0)
    teacher = _Gated().eval()
    x = _images(2)
    student = tokenprune.sparsify(teacher, 0.7, example_inputs=x).train()
    assert isinstance(student.net, torch.fx.GraphModule)
    torch.manual_seed(1)
    got, state = _distill_term(teacher, student, x)
    assert (state.final_map.module, state.final_map.norm) == ("net.norm_pre", "net.head.norm")
    with torch.no_grad():
        t = _layer_norm_channels_first(teacher.net.forward_features(x), teacher.net.head.norm)
    assert got.item() == pytest.approx(((state.final_normed.permute(0, 2, 3, 1) - t) ** 2).mean().item(), rel=1e-5)


@pytest.mark.parametrize(
    ("name", "kwargs", "size"),
    [("maxvit_rmlp_pico_rw_256", {"img_size": 128}, 128), ("fastvit_t8", {}, 128)],
    ids=["maxvit", "fastvit"],
)
def test_final_map_is_the_one_the_head_pools_not_a_squeeze_excitations(name, kwargs, size):
    """After the chain, MaxViT's last MBConv and FastViT's final conv pool the map in a squeeze-and-excitation to gate
    it, before the head pools it: the final map is the one the head pools (what `forward_features` returns)."""
    teacher = timm.create_model(name, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    student = tokenprune.sparsify(teacher, 0.7, example_inputs=x).eval()
    with torch.no_grad(), fixed_keep(student, 1.0):
        student(x)
        expected = teacher.forward_features(x)
    state = tokenprune.sparsity_state(student)
    assert state.final_normed is not None, state.final_map
    torch.testing.assert_close(state.final_normed, expected)
