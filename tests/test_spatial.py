"""Spatial sparsification of ConvNeXt and Swin (docs/design.md §1.2): a table of models x properties, random weights."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import timm
import torch
import torchvision
from timm.layers.grn import GlobalResponseNorm
from torch import nn

import tokenprune
from tokenprune.errors import UnsupportedModelError
from tokenprune.measure.ablation import fixed_keep
from tokenprune.nn.asymmetric import AsymmetricPath
from tokenprune.nn.spatial_predictor import SpatialSelector

# name -> (constructor, input size used by the fast tests)
MODELS = {
    "timm_convnext_tiny": (lambda: timm.create_model("convnext_tiny"), 64),
    "tv_convnext_tiny": (lambda: torchvision.models.convnext_tiny(), 64),
    "timm_swin_tiny": (lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=64), 64),
    "tv_swin_t": (lambda: torchvision.models.swin_t(), 64),
    "timm_convnext_atto": (lambda: timm.create_model("convnext_atto"), 64),  # conv_mlp: 1x1 convs, LayerNorm2d
    # ConvNeXt V2: GRN's L2 norm over the locations inside the MLP; channels first (conv_mlp) and last
    "timm_convnextv2_atto": (lambda: _grn_filled(timm.create_model("convnextv2_atto")), 64),
    "timm_convnextv2_atto_last": (lambda: _grn_filled(timm.create_model("convnextv2_atto", conv_mlp=False)), 64),
}


def _grn_filled(model: nn.Module) -> nn.Module:
    """GRN's weight and bias start at zero (the norm is an identity): give them values so its statistics count."""
    for m in model.modules():
        if isinstance(m, GlobalResponseNorm):
            nn.init.normal_(m.weight, std=0.5)
            nn.init.normal_(m.bias, std=0.1)
    return model


_DENSE: dict[str, nn.Module] = {}
_SPARSE: dict[str, nn.Module] = {}


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    """The models are shared by this module's tests only: release them (and their graphs) when it ends."""
    yield
    _DENSE.clear()
    _SPARSE.clear()


def dense(name: str) -> nn.Module:
    if name not in _DENSE:
        torch.manual_seed(0)
        _DENSE[name] = MODELS[name][0]().eval()
    return _DENSE[name]


def images(name: str, batch: int) -> torch.Tensor:
    size = MODELS[name][1]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


def sparse(name: str) -> nn.Module:
    """The model sparsified at rho = 0.7, shared by the tests (which deep-copy it before changing it)."""
    if name not in _SPARSE:
        torch.manual_seed(1)
        _SPARSE[name] = tokenprune.sparsify(dense(name), 0.7, example_inputs=images(name, 2))
    return _SPARSE[name]


def randomize_fast_paths(model: nn.Module) -> None:
    # A fresh fast path adds ~1e-6 of a map (ConvNeXt's scale) or nothing (Swin's zero Linear, no scale); give it
    # weight so a wrongly placed fast output would show.
    for m in model.modules():
        if isinstance(m, AsymmetricPath):
            if m.fast.gamma is None:
                nn.init.normal_(m.fast.proj.weight, std=0.1)
            else:
                nn.init.constant_(m.fast.gamma, 0.5)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.slow  # over 2 s on 2 cores: the full run covers it, the inner loop (-m 'not slow') skips it
def test_api_covers_spatial_stages(name):
    model = sparse(name)
    stages = tokenprune.selectors(model)
    assert [s.stage for s in stages] == [0, 1, 2]
    assert all(isinstance(s, SpatialSelector) for s in stages)
    config = tokenprune.config_of(model)
    assert config.kind == "spatial" and config.locations == [1, 2, 3]
    assert config.keep_ratios == pytest.approx([0.7, 0.5, 0.3])
    model = copy.deepcopy(model)
    tokenprune.set_execution(model, "masked")
    assert {s.execution for s in tokenprune.selectors(model)} == {"masked"}


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("name", MODELS)
def test_everything_kept_equals_original(name, batch):
    model = copy.deepcopy(sparse(name)).eval()
    randomize_fast_paths(model)
    for stage in tokenprune.selectors(model):
        stage.keep_ratio = 1.0
    x = images(name, batch)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(name)(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("name", MODELS)
def test_masked_and_gathered_eval_agree(name, batch):
    model = copy.deepcopy(sparse(name)).eval()
    randomize_fast_paths(model)
    x = images(name, batch)
    with torch.no_grad():
        gathered = model(x)
        gathered_state = tokenprune.sparsity_state(model)
        masks = [d.clone() for d in gathered_state.decisions]
        tokenprune.set_execution(model, "masked")
        masked = model(x)
    assert gathered.shape == dense(name)(x).shape and torch.isfinite(gathered).all()
    for a, b in zip(masks, tokenprune.sparsity_state(model).decisions):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(gathered, masked, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # and the sparse result really differs from the dense one
        assert not torch.allclose(gathered, dense(name)(x), atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_state_in_eval(name):
    model = sparse(name).eval()
    x = images(name, 4)
    with torch.no_grad():
        model(x)
    state = tokenprune.sparsity_state(model)
    maps = {}
    handle = (
        dense(name)
        .get_submodule(state.chain_output)
        .register_forward_hook(lambda _m, _i, out: maps.setdefault("teacher", out))
    )
    try:
        with torch.no_grad():
            dense(name)(x)
    finally:
        handle.remove()
    # the head gets an ordinary feature map: the one the original's last chain block produces
    assert state.final_tokens.shape == maps["teacher"].shape
    locations = state.decisions[0].shape[1]
    for d, ratio in zip(state.decisions, [0.7, 0.5, 0.3], strict=True):
        assert d.shape == (4, locations, 1)
        assert torch.all(d.sum(dim=(1, 2)) == max(1, int(ratio * locations + 1e-6)))
    assert tokenprune.config_of(model).decisions == "independent"  # the official spatial default
    assert torch.equal(state.final_mask, state.decisions[-1])


@pytest.mark.parametrize("decisions", ["independent", "nested"])
def test_each_stage_chooses_among_all_locations_or_among_the_kept(decisions):
    """Independent (official AdaConvNeXt): each stage's global feature averages every location and its top k ranges
    over all H*W; nested: over the previous stage's kept locations, which then never return to the slow path."""
    x = torch.randn(4, 3, 64, 64)
    model = tokenprune.sparsify(
        timm.create_model("convnext_atto", num_classes=10).eval(), 0.7, decisions=decisions, example_inputs=x
    ).eval()
    seen = []
    hooks = [
        sel.predictor.register_forward_hook(lambda _m, args, out: seen.append((args[1], out[..., 0])))
        for sel in tokenprune.selectors(model)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    state = tokenprune.sparsity_state(model)
    for s, (d, (policy, score)) in enumerate(zip(state.decisions, seen, strict=True)):
        k = int(d[0].sum())
        if decisions == "independent" or s == 0:
            assert policy is None  # the global feature over every location
        else:
            assert torch.equal(policy, state.decisions[s - 1])
            score = score.masked_fill(policy[..., 0] == 0, float("-inf"))
        expected = torch.zeros_like(d).scatter(1, score.topk(k, dim=1).indices[..., None], 1.0)
        assert torch.equal(d, expected), s
    returned = [bool((d > prev).any()) for prev, d in zip(state.decisions, state.decisions[1:])]
    assert any(returned) == (decisions == "independent")  # random weights: some location comes back
    assert state.final_index is None and state.prefix_tokens == 0


@pytest.mark.parametrize("name", MODELS)
def test_train_forward_backward(name):
    model = copy.deepcopy(sparse(name)).train()
    x = images(name, 4)
    model(x).logsumexp(-1).mean().backward()
    state = tokenprune.sparsity_state(model)
    for d in state.decisions:  # hard samples (straight-through), each stage's own (decisions="independent")
        assert set(d.unique().tolist()) <= {0.0, 1.0} and d.requires_grad
    for stage in tokenprune.selectors(model):
        grads = [p.grad for p in stage.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
    paths = [m for m in model.modules() if isinstance(m, AsymmetricPath)]
    assert paths
    for path in paths:
        trained = path.fast.proj.weight if path.fast.gamma is None else path.fast.gamma  # what a fresh path starts on
        assert trained.grad is not None and trained.grad.abs().sum() > 0
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in path.parameters())


@pytest.mark.parametrize("name", ["timm_convnext_tiny", "tv_swin_t"])
def test_pickle_and_deepcopy(name):
    model = sparse(name).eval()
    x = images(name, 2)
    with torch.no_grad():
        expected = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)):
        with torch.no_grad():
            torch.testing.assert_close(clone(x), expected)
        assert len(tokenprune.selectors(clone)) == 3


def test_original_names_kept_and_stochastic_depth_survives():
    model = sparse("tv_convnext_tiny")
    original = dense("tv_convnext_tiny").state_dict()
    assert set(original) <= set(model.state_dict())
    block = model.features[5][4]
    called = [block.get_submodule(n.target) for n in block.graph.nodes if n.op == "call_module"]
    # torchvision's StochasticDepth must stay a module call, or fine-tuning would silently lose it
    assert any(isinstance(m, torchvision.ops.StochasticDepth) for m in called)


def test_grn_sums_the_kept_locations_in_both_executions(monkeypatch):
    """ConvNeXt V2's GRN reads every location of the MLP's hidden map. Its slow path is the whole MLP, GRN inside, and
    masked execution zeroes the dropped locations before GRN's norm so it sums the kept ones, as the gathered slow
    path does. Without that zeroing the two executions differ, and the self-check refuses the model."""
    import tokenprune.fx.spatial as spatial_pass

    name = "timm_convnextv2_atto_last"
    block = next(m for m in sparse(name).modules() if isinstance(getattr(m, "fast_path", None), AsymmetricPath))
    order = [n.name for n in block.graph.nodes]
    # both pointwise layers, and GRN between them, run on the gathered locations; the zeroing comes before GRN's norm
    path = ["gather_locations", "mlp_fc1", "mask_locations", "norm", "mlp_fc2", "fast_path"]
    assert [order.index(n) for n in path] == sorted(order.index(n) for n in path)

    monkeypatch.setattr(spatial_pass, "mask_locations", lambda x, mask, keep, spatial: x)
    with pytest.raises(UnsupportedModelError, match="self-check failed"):
        tokenprune.sparsify(dense(name), 0.7, example_inputs=images(name, 2))


@pytest.mark.parametrize("builder", [torchvision.models.resnet50, lambda: timm.create_model("resnet50")])
def test_resnet_bottleneck_is_refused(builder):
    model = builder().eval()
    with pytest.raises(UnsupportedModelError, match="3x3 conv.*bottleneck") as refused:
        tokenprune.sparsify(model, example_inputs=torch.randn(1, 3, 64, 64))
    assert str(refused.value).count("bottleneck") == 1  # the explanation once, however many runs were looked at


def test_windowed_mlp_is_refused_for_its_layout_not_as_a_bottleneck():
    """MaxViT runs its MLP on window partitions [B, windows, P*P, C]: per location, the same channels, but not the
    block's [B, C, H, W] grid. The refusal says so (and never calls it a bottleneck, which it is not)."""
    from torchvision.models.maxvit import MaxVit

    model = MaxVit(
        input_size=(64, 64), stem_channels=16, partition_size=2, block_channels=[16, 32], block_layers=[2, 2],
        head_dim=8, stochastic_depth_prob=0.0,
    ).eval()  # fmt: skip
    with pytest.raises(UnsupportedModelError, match=r"mlp_layer_0 .. .* works on \[1, 64, 4, 16\], not on the "
                       r"block's feature map \[1, 16, 16, 16\] \(its locations rearranged") as refused:  # fmt: skip
        tokenprune.sparsify(model, example_inputs=torch.randn(1, 3, 64, 64))
    assert "bottleneck" not in str(refused.value)


def test_a_hand_written_norm_is_per_location():
    """ConvNeXt zepto RMS normalises with a hand-written norm, x * rsqrt(var(x) + eps) over the channels: a diamond
    whose statistic is one value per location. The slow path takes it in (it was refused until 2026-12-07: the walk
    back stopped at the multiplication), and masked and gathered execution agree."""
    model = timm.create_model("convnext_zepto_rms").eval()
    x = torch.randn(2, 3, 64, 64)
    sparse = tokenprune.sparsify(model, 0.7, example_inputs=x)
    block = next(m for m in sparse.modules() if isinstance(getattr(m, "fast_path", None), AsymmetricPath))
    order = [n.name for n in block.graph.nodes]
    assert order.index("gather_locations") < order.index("var") < order.index("mlp_fc1")
    randomize_fast_paths(sparse)
    with torch.no_grad():
        gathered = sparse(x)
        masked = tokenprune.set_execution(sparse, "masked")(x)
    torch.testing.assert_close(gathered, masked, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "name, reason",
    [
        # the squeeze-excitation's mean over the locations mixes them: the run restarts after the diamond's join
        ("mobilenetv3_small_100", r"the per-location run conv_pwl \.\. drop_path after mul maps \[1, 240, 4, 4\]"),
        # the branch ends in a depthwise 7x7 conv; the map before it has 4C channels, whose layout is read all the same
        ("starnet_s050", r"no residual add has a branch ending in per-location Linear/1x1 conv layers"),
    ],
)
def test_where_a_run_restarts_is_read_through_diamonds_and_expanded_maps(name, reason):
    with pytest.raises(UnsupportedModelError, match=reason):
        tokenprune.sparsify(timm.create_model(name).eval(), example_inputs=torch.randn(1, 3, 64, 64))


class _ChannelsLastMaxNorm(nn.Module):
    """Depthwise conv, then x / amax(x) over the channels (an op without a rule) and a channels-last MLP."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.mix = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        t = self.mix(x).permute(0, 2, 3, 1)
        t = t / t.amax(-1, keepdim=True)
        return x + self.down(torch.relu(self.up(t))).permute(0, 3, 1, 2)


@pytest.mark.parametrize("dim", [24, 16])  # 16: C = H = W, the shape alone fits both layouts; the permutes decide
def test_a_run_that_only_reorders_axes_is_not_called_a_bottleneck(dim):
    """Where the walk back stops at an op that combines two values of the block (a norm written with an op the table
    does not know), the run left maps channels-last to channels-first: the refusal says where the walk stopped, and
    not that the channels change."""
    model = _ToyNet(_ChannelsLastMaxNorm, dim=dim).eval()
    stopped = r"inside the block's layout change.*walk back stopped at truediv"
    with pytest.raises(UnsupportedModelError, match=stopped) as no:
        tokenprune.sparsify(model, example_inputs=torch.randn(1, 3, 64, 64))
    assert "bottleneck" not in str(no.value)


def test_a_unit_with_two_mlps_gets_two_slow_paths_each_checked(monkeypatch):
    """DaViT's chain units hold a spatial and a channel block, each ending in an MLP of the same cost: both become slow
    paths under the same decisions (`fast_path`, `fast_path_1`; the channel attention's projection, 8x cheaper, stays
    dense). The self-check sees the second path: written back at the wrong locations, the model is refused."""
    import importlib

    sparsify_module = importlib.import_module("tokenprune.sparsify")  # the package rebinds the name to the function
    model = timm.create_model("davit_tiny").eval()
    sparse = tokenprune.sparsify(model, 0.7)
    units = [m for m in sparse.modules() if isinstance(getattr(m, "fast_path", None), AsymmetricPath)]
    assert units and all(isinstance(getattr(u, "fast_path_1", None), AsymmetricPath) for u in units)
    assert all(sum(isinstance(m, AsymmetricPath) for m in u.modules()) == 2 for u in units)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        pruned = sparse(x)
        tokenprune.set_execution(sparse, "masked")
        torch.testing.assert_close(sparse(x), pruned, rtol=1e-4, atol=1e-5)

    real = sparsify_module.apply_plan

    def second_path_misplaced(target, plan):
        applied = real(target, plan)
        for unit in applied.model.modules():
            path = getattr(unit, "fast_path_1", None)
            if isinstance(path, AsymmetricPath):
                forward = path.forward
                path.forward = lambda entry, slow, mask=None, keep=None, drop=None, f=forward: f(
                    entry, slow, mask, None if keep is None else keep.roll(1, dims=1), drop
                )
        return applied

    monkeypatch.setattr(sparsify_module, "apply_plan", second_path_misplaced)
    with pytest.raises(UnsupportedModelError, match="self-check failed"):
        tokenprune.sparsify(model, 0.7)


class _ToyBlock(nn.Module):
    """A MetaFormer-style block in [B, C, H, W]: depthwise conv, then a 1x1-conv MLP (no known class names)."""

    def __init__(self, dim: int, hidden: int | None = None, spatial_kernel: int = 3) -> None:
        super().__init__()
        hidden = hidden or 2 * dim
        self.mix = nn.Conv2d(dim, dim, spatial_kernel, padding=spatial_kernel // 2, groups=dim)
        self.norm = nn.BatchNorm2d(dim)
        self.up, self.act, self.down = nn.Conv2d(dim, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        return x + self.down(self.act(self.up(self.norm(self.mix(x)))))


class _ToyNet(nn.Module):
    def __init__(self, block=_ToyBlock, dim: int = 16, depth: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.Sequential(*[block(dim) for _ in range(depth)])
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_structural_rule_on_an_unknown_model():
    torch.manual_seed(0)
    model = _ToyNet().eval()
    x = torch.randn(2, 3, 32, 32)
    result = tokenprune.sparsify(model, 0.7, example_inputs=x).eval()
    assert len([m for m in result.modules() if isinstance(m, AsymmetricPath)]) == 4
    randomize_fast_paths(result)
    with torch.no_grad():
        gathered = result(x)
        tokenprune.set_execution(result, "masked")
        torch.testing.assert_close(result(x), gathered, atol=1e-5, rtol=1e-4)


class _ContextBlock(nn.Module):
    """A [B, C, H, W] block called with a second map besides its own, the stage's context (as GCViT's blocks take the
    stage's global query); `into` says where the context goes: into what mixes locations, into the MLP's input, or
    (as a gate over the MLP's hidden map) between the MLP's layers."""

    def __init__(self, dim: int, into: str) -> None:
        super().__init__()
        self.into = into
        self.mix = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.BatchNorm2d(dim)
        self.up, self.act, self.down = nn.Conv2d(dim, 2 * dim, 1), nn.GELU(), nn.Conv2d(2 * dim, dim, 1)

    def forward(self, x, context):
        x = x + self.mix(x * context if self.into == "mixer" else x)
        h = self.norm(x)
        h = self.act(self.up(h + context if self.into == "mlp" else h))
        return x + self.down(h * context.repeat(1, 2, 1, 1) if self.into == "hidden" else h)


class _ContextNet(nn.Module):
    def __init__(self, into: str, dim: int = 16, depth: int = 5) -> None:
        super().__init__()
        self.stem, self.context = nn.Conv2d(3, dim, 4, stride=4), nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.context.bias)  # filled by the self-check: its context is not the one discovery recorded
        self.blocks = nn.ModuleList(_ContextBlock(dim, into) for _ in range(depth))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.stem(x)
        context = torch.sigmoid(self.context(x))  # a map computed from the map, before the chain
        for block in self.blocks:
            x = block(x, context)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize(("into", "slow_path"), [("mixer", "norm .. down"), ("mlp", "up .. down")])
def test_a_block_input_besides_the_map_is_passed_on_and_read_where_it_lines_up(into, slow_path):
    """The block takes the context as a run-time input. The slow path runs on the kept locations only, so it starts
    after the last op that reads the context map (an operand like any other: inside a run only what broadcasts over
    the locations); exact in both executions, and with every location kept each block is the original on the context
    of its own run (the self-check's too: not the one recorded when the chain was found, from another input)."""
    torch.manual_seed(0)
    dense_model, x = _ContextNet(into).eval(), torch.randn(2, 3, 32, 32)
    assert f"slow path {slow_path} (" in tokenprune.plan(dense_model, 0.7, example_inputs=x).describe()
    model = tokenprune.sparsify(dense_model, 0.7, example_inputs=x).eval()
    randomize_fast_paths(model)
    with torch.no_grad():
        gathered = model(x)
        assert not torch.allclose(gathered, dense_model(x), atol=1e-4)
        with fixed_keep(model, 1.0):
            torch.testing.assert_close(model(x), dense_model(x), atol=1e-5, rtol=1e-5)
        tokenprune.set_execution(model, "masked")
        torch.testing.assert_close(model(x), gathered, atol=1e-5, rtol=1e-4)


def test_a_block_input_read_between_the_mlp_layers_leaves_no_slow_path():
    """The context gates the MLP's hidden map, location by location: the run after it (the last layer) changes the
    channels, so no C -> C slow path exists and the model is refused, not gathered against a whole map."""
    with pytest.raises(UnsupportedModelError, match="no slow path found"):
        tokenprune.sparsify(_ContextNet("hidden").eval(), 0.7, example_inputs=torch.randn(2, 3, 32, 32))


class _ChannelChangingBranch(nn.Module):
    """Its per-location run ends in a map of other width, then a 3x3 conv brings it back: no C -> C run at the add."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up, self.act = nn.Conv2d(dim, 2 * dim, 1), nn.GELU()
        self.mix = nn.Conv2d(2 * dim, dim, 3, padding=1)

    def forward(self, x):
        return x + self.mix(self.act(self.up(x)))


def test_branch_ending_in_spatial_op_is_refused():
    model = _ToyNet(block=_ChannelChangingBranch).eval()
    with pytest.raises(UnsupportedModelError, match="no slow path"):
        tokenprune.sparsify(model, example_inputs=torch.randn(1, 3, 32, 32))


@pytest.mark.slow  # over 2 s on 2 cores: the full run covers it, the inner loop (-m 'not slow') skips it
def test_deep_stage_uses_locations_3_6_9():
    torch.manual_seed(0)
    # convnext_small's depths (3, 3, 27, 3), narrow: the stage length decides the locations, not the width
    model = timm.create_model("convnext_small", dims=(8, 16, 32, 64)).eval()
    result = tokenprune.sparsify(model, 0.7, example_inputs=torch.randn(1, 3, 64, 64))
    assert tokenprune.config_of(result).locations == [3, 6, 9]
    with torch.no_grad():
        assert result.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


# Published figures at rho = 0.7 (docs/design.md §7), multiply-adds at 224 x 224.
FLOPS = {
    "timm_convnext_tiny": (lambda: timm.create_model("convnext_tiny"), 4.5, 3.6),
    "tv_convnext_tiny": (lambda: torchvision.models.convnext_tiny(), 4.5, 3.6),
    "timm_swin_tiny": (lambda: timm.create_model("swin_tiny_patch4_window7_224"), 4.5, 4.0),
    "tv_swin_t": (lambda: torchvision.models.swin_t(), 4.5, 4.0),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", FLOPS)
def test_flops_match_paper(name):
    from tokenprune.measure.flops import profile_flops

    builder, dense_g, sparse_g = FLOPS[name]
    model = builder().eval()
    x = torch.randn(1, 3, 224, 224)
    before = profile_flops(model, x)
    after = profile_flops(tokenprune.sparsify(model, 0.7), x)
    assert not before.uncounted_ops and not after.uncounted_ops
    assert before.gmacs == pytest.approx(dense_g, rel=0.05)
    assert after.gmacs == pytest.approx(sparse_g, rel=0.05)  # predictors and fast paths included
    assert 0.1 < after.predictor_gmacs < 0.2  # three predictors on 14 x 14 x 384 maps
