"""Models that return feature maps (dense prediction backbones): a table of models x properties, random weights.

timm ``features_only=True`` (a list), torchvision ``create_feature_extractor`` (a dict) and a user's backbone + FPN
+ classifier wrapper (one full-size map) must keep every output complete and of the original's shape, masked and
pruned must agree on the same decisions, and state, FLOPs (with the backbone/head split), compare, save/load,
export and the losses must take their outputs (README, "Dense prediction backbones"; docs/design.md §5.5).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.convnext import CNBlock
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops import FeaturePyramidNetwork

import tokenprune
from tokenprune.errors import ConfigError, UnsupportedModelError
from tokenprune.io import SourceWarning
from tokenprune.measure import compare, profile_flops
from tokenprune.measure.report import build_report
from tokenprune.nn.asymmetric import AsymmetricPath
from tokenprune.outputs import max_abs_diff, named_outputs
from tokenprune.train.losses import LossWeights, SparsificationLoss

SIZE = 64


class SegmentationNet(nn.Module):
    """A user's model: timm feature backbone, torchvision FPN, 1x1-conv classifier upsampled to the input size."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.backbone = timm.create_model("convnext_atto", features_only=True)
        self.fpn = FeaturePyramidNetwork(self.backbone.feature_info.channels(), 32)
        self.classifier = nn.Conv2d(32, classes, 1)

    def forward(self, x):
        maps = self.fpn({str(i): f for i, f in enumerate(self.backbone(x))})
        return F.interpolate(self.classifier(maps["0"]), size=x.shape[-2:], mode="bilinear", align_corners=False)


class DictFeatures(nn.Module):
    """A user's wrapper that names two of the backbone's maps."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = timm.create_model("convnext_atto", features_only=True, out_indices=(2, 3))

    def forward(self, x):
        c4, c5 = self.backbone(x)
        return {"c4": c4, "c5": c5}


def tv_extractor() -> nn.Module:
    # reason: torchvision's tracer inlines CNBlock unless it is a leaf; without it there is no chain (see below).
    return create_feature_extractor(
        torchvision.models.convnext_tiny(),
        {"features.3": "c3", "features.5": "c4", "features.7": "c5"},
        tracer_kwargs={"leaf_modules": [CNBlock]},
    )


MODELS = {
    "timm_convnext_atto_features": lambda: timm.create_model("convnext_atto", features_only=True),
    "timm_swin_tiny_features": lambda: timm.create_model(
        "swin_tiny_patch4_window7_224", features_only=True, img_size=SIZE
    ),
    "tv_convnext_extractor": tv_extractor,
    "fpn_segmentation": SegmentationNet,
    "dict_wrapper": DictFeatures,
}

OUTPUTS = {"timm_convnext_atto_features": 4, "timm_swin_tiny_features": 4, "tv_convnext_extractor": 3,
           "fpn_segmentation": 1, "dict_wrapper": 2}  # fmt: skip

_DENSE: dict[str, nn.Module] = {}
_SPARSE: dict[str, nn.Module] = {}


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    """The models are shared by this module's tests only: release them (and their graphs) when it ends."""
    yield
    _DENSE.clear()
    _SPARSE.clear()


def images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))


def dense(name: str) -> nn.Module:
    if name not in _DENSE:
        torch.manual_seed(0)
        _DENSE[name] = MODELS[name]().eval()
    return _DENSE[name]


def teacher_map(name: str, state, x: torch.Tensor) -> torch.Tensor:
    """The dense model's output of the block the sparse model's state names as its chain output (what is distilled)."""
    maps = {}
    block = dense(name).get_submodule(state.chain_output)
    handle = block.register_forward_hook(lambda _m, _i, out: maps.setdefault("map", out))
    try:
        with torch.no_grad():
            dense(name)(x)
    finally:
        handle.remove()
    return maps["map"]


def sparse(name: str) -> nn.Module:
    if name not in _SPARSE:
        torch.manual_seed(1)
        _SPARSE[name] = tokenprune.sparsify(dense(name), 0.7, example_inputs=images(2))
    return _SPARSE[name]


def randomize_fast_paths(model: nn.Module) -> None:
    # a fresh fast path adds ~1e-6 of a map; give it weight so a misplaced fast output would show
    for m in model.modules():
        if isinstance(m, AsymmetricPath):
            if m.fast.gamma is None:  # no layer scale (Swin): give its Linear weight
                nn.init.normal_(m.fast.proj.weight, std=0.1)
            else:
                nn.init.constant_(m.fast.gamma, 0.5)


def shapes(output) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(t.shape)) for n, t in named_outputs(output)]


# ---- every output complete, masked == pruned -------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.slow  # over 1.5 s on 2 cores: the full run covers it, the inner loop (-m 'not slow') skips it
def test_pruned_outputs_are_complete_and_differ_from_dense(name):
    model = copy.deepcopy(sparse(name)).eval()
    randomize_fast_paths(model)
    x = images(3)
    with torch.no_grad():
        got, expected = model(x), dense(name)(x)
    assert type(got) is type(expected)
    assert shapes(got) == shapes(expected)
    assert len(named_outputs(got)) == OUTPUTS[name]
    assert all(torch.isfinite(t).all() for _, t in named_outputs(got))
    # the last map comes after the sparsified stage: the sparse model really computes something else
    assert not torch.allclose(named_outputs(got)[-1][1], named_outputs(expected)[-1][1], atol=1e-4)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("name", MODELS)
def test_masked_and_pruned_agree_on_every_output(name, batch):
    model = copy.deepcopy(sparse(name)).eval()
    randomize_fast_paths(model)
    x = images(batch)
    with torch.no_grad():
        pruned = model(x)
        masks = [d.clone() for d in tokenprune.sparsity_state(model).decisions]
        tokenprune.set_execution(model, "masked")
        masked = model(x)
    for a, b in zip(masks, tokenprune.sparsity_state(model).decisions):
        torch.testing.assert_close(a, b)
    assert shapes(pruned) == shapes(masked) == shapes(dense(name)(x))
    for (n, p), (_, m) in zip(named_outputs(pruned), named_outputs(masked)):
        torch.testing.assert_close(p, m, atol=1e-5, rtol=1e-4, msg=lambda msg, n=n: f"output {n}: {msg}")


@pytest.mark.parametrize("name", MODELS)
def test_everything_kept_equals_original(name):
    model = copy.deepcopy(sparse(name)).eval()
    randomize_fast_paths(model)
    for stage in tokenprune.selectors(model):
        stage.keep_ratio = 1.0
    x = images(2)
    with torch.no_grad():
        assert max_abs_diff(model(x), dense(name)(x)) < 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_train_masked_outputs_complete_and_gradients_reach_predictors(name):
    model = copy.deepcopy(sparse(name)).train()
    out = model(images(2))
    assert shapes(out) == shapes(dense(name)(images(2)))
    sum(t.float().square().mean() for _, t in named_outputs(out)).backward()
    for stage in tokenprune.selectors(model):
        grads = [p.grad for p in stage.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", MODELS)
def test_sparsity_state(name):
    model = sparse(name).eval()
    x = images(2)
    with torch.no_grad():
        model(x)
    state = tokenprune.sparsity_state(model)
    assert state.final_tokens.shape == teacher_map(name, state, x).shape
    assert len(state.decisions) == 3 and all(d.shape[0] == 2 for d in state.decisions)
    locations = state.decisions[0].shape[1]  # each stage its own top k of every location (decisions="independent")
    kept = [max(1, int(r * locations + 1e-6)) for r in tokenprune.config_of(model).keep_ratios]
    assert [int(d[0].sum()) for d in state.decisions] == kept


def test_torchvision_extractor_without_leaf_blocks_is_refused():
    # torchvision's tracer inlines CNBlock, so no chain of calls to one module type exists; refused, never wrong
    model = create_feature_extractor(torchvision.models.convnext_tiny(), {"features.5": "c4", "features.7": "c5"})
    with pytest.raises(UnsupportedModelError, match="no chain"):
        tokenprune.sparsify(model.eval(), example_inputs=images(2))


# ---- FLOPs: several outputs, backbone/head split ---------------------------------------------------------------


def test_backbone_and_head_flops_are_split_for_a_wrapper():
    name = "fpn_segmentation"
    x = images(1)
    report = build_report(name, dense(name), sparse(name), (3, SIZE, SIZE), flops_only=True)
    split = report["split"]
    assert split["backbone"] == "backbone"  # the submodule that holds the chain and is called on the image
    flops = profile_flops(dense(name), x, backbone="backbone")
    head = flops.by_module["fpn"] + flops.by_module["classifier"]  # exact: nothing else runs outside the backbone
    assert flops.head_macs == head
    assert split["dense"]["head_gmacs"] == pytest.approx(head / 1e9)
    assert split["sparse"]["head_gmacs"] == pytest.approx(split["dense"]["head_gmacs"])  # the head is not sparsified
    for side in ("dense", "sparse"):
        total = report[side]["gmacs"]
        assert split[side]["backbone_gmacs"] + split[side]["head_gmacs"] == pytest.approx(total)
    assert split["sparse"]["backbone_gmacs"] < split["dense"]["backbone_gmacs"]
    # predictors count with the backbone
    sparse_flops = tokenprune.profile(sparse(name))
    assert sparse_flops.backbone_module == "backbone"
    assert sparse_flops.trunk_gmacs == pytest.approx(
        sparse_flops.module_gmacs("backbone") + sparse_flops.predictor_gmacs
    )
    assert report["outputs"] == ["logits"]


@pytest.mark.parametrize("name", ["timm_convnext_atto_features", "tv_convnext_extractor", "dict_wrapper"])
def test_flops_of_multi_output_models(name):
    report = build_report(name, dense(name), sparse(name), (3, SIZE, SIZE), flops_only=True)
    assert 0 < report["sparse"]["gmacs"] < report["dense"]["gmacs"]
    assert report["uncounted_ops"] == []
    assert report["outputs"] == [n for n, _ in named_outputs(dense(name)(images(1)))]
    # a feature extractor is all backbone; the dict wrapper's backbone does everything, so its head costs nothing
    if name == "dict_wrapper":
        assert report["split"]["backbone"] == "backbone" and report["split"]["dense"]["head_gmacs"] == 0
    else:
        assert report["split"] is None


@pytest.mark.parametrize("name", ["timm_convnext_atto_features", "tv_convnext_extractor"])
def test_compare_with_multi_output_models(name):
    result = compare(dense(name), sparse(name), (3, SIZE, SIZE), 2, warmup=0, repeats=1, latency=False)
    assert result["speedup"] > 0 and result["dense"]["images_per_s"] > 0


# ---- save / load ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["timm_convnext_atto_features", pytest.param("timm_swin_tiny_features", marks=pytest.mark.slow)]
)
def test_features_only_round_trip_records_features_only(name, tmp_path):
    path = tmp_path / "m.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("error", SourceWarning)
        tokenprune.save(sparse(name), path)
    loaded, x = tokenprune.load(path), images(2)
    source = tokenprune.config_of(loaded).source
    assert source["kwargs"]["features_only"] is True and source["kwargs"]["out_indices"] == [0, 1, 2, 3]
    with torch.no_grad():
        assert max_abs_diff(loaded(x), sparse(name).eval()(x)) == 0.0
        original = tokenprune.load_original(path)
        assert max_abs_diff(original(x), dense(name)(x)) == 0.0


@pytest.mark.slow  # over 1.5 s on 2 cores: the full run covers it, the inner loop (-m 'not slow') skips it
def test_out_indices_are_recorded(tmp_path):
    model = timm.create_model("convnext_atto", features_only=True, out_indices=(1, 3)).eval()
    path = tokenprune.save(tokenprune.sparsify(model, example_inputs=images(2)), tmp_path / "m.safetensors")
    loaded = tokenprune.load(path)
    assert tokenprune.config_of(loaded).source["kwargs"]["out_indices"] == [1, 3]
    assert len(loaded(images(1))) == 2


def test_wrapper_round_trip_with_model(tmp_path):
    name = "fpn_segmentation"
    path = tmp_path / "seg.safetensors"
    with pytest.warns(SourceWarning):
        tokenprune.save(sparse(name), path)
    loaded = tokenprune.load(path, model=SegmentationNet())
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sparse(name).eval()(x))


# ---- export --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["timm_convnext_atto_features", "dict_wrapper"])
def test_onnx_export_names_and_checks_every_output(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from tokenprune.export import export

    model = sparse(name).eval()
    path = tmp_path / "m.onnx"
    export(model, path, dynamic_batch=False, batch_size=2)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images(2)
    with torch.no_grad():
        expected = named_outputs(model(x))
    assert [o.name for o in session.get_outputs()] == [n for n, _ in expected]
    assert [n for n, _ in expected] == (
        ["output0", "output1", "output2", "output3"] if "atto" in name else ["c4", "c5"]
    )
    for (n, reference), value in zip(expected, session.run(None, {"images": x.numpy()})):
        torch.testing.assert_close(torch.from_numpy(value), reference, atol=1e-4, rtol=1e-3, msg=f"output {n}")


@pytest.mark.slow
def test_torch_export_multi_output(tmp_path):
    from tokenprune.export import export

    result = export(sparse("dict_wrapper"), tmp_path / "m.pt2", format="torch-export", dynamic_batch=False)
    assert result["max_abs_diff"] < 1e-4
    program = torch.export.load(str(tmp_path / "m.pt2"))
    with torch.no_grad():
        assert set(program.module()(images(2))) == {"c4", "c5"}


# ---- losses ---------------------------------------------------------------------------------------------------


def test_loss_accepts_feature_maps_without_logits():
    name = "timm_convnext_atto_features"
    model = copy.deepcopy(sparse(name)).train()
    out = model(images(2))
    state = tokenprune.sparsity_state(model)
    teacher = {"map": teacher_map(name, state, images(2))}
    loss = SparsificationLoss(LossWeights.for_kind("spatial", ce=0.0, kl=0.0))
    result = loss(out, None, state, teacher_features=teacher["map"])
    assert torch.isfinite(result.total) and result.parts["ce"] == 0 and result.parts["distill"] > 0
    result.total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tokenprune.selectors(model)[0].parameters())
    with pytest.raises(ConfigError, match="loss.ce=0 and loss.kl=0"):
        SparsificationLoss(LossWeights.for_kind("spatial"))(out, None, state, teacher_features=teacher["map"])


@pytest.mark.parametrize("name", ["fpn_segmentation", "timm_convnext_atto_features"])
def test_top1_gate_refuses_models_without_logits(name):
    from torch.utils.data import TensorDataset

    from tokenprune.cli.gates import evaluate_accuracy

    data = TensorDataset(images(2), torch.zeros(2, dtype=torch.long))
    # a [B, K, H, W] segmentation map would give a silently wrong argmax(-1); a list has none
    with pytest.raises(ConfigError, match=r"logits \[B, K\]"):
        evaluate_accuracy(sparse(name), data, batch_size=2)


def test_max_abs_diff_is_infinite_for_non_finite_outputs():
    a = {"x": torch.zeros(2, 3), "y": torch.ones(4)}
    assert max_abs_diff(a, {"x": torch.zeros(2, 3), "y": torch.ones(4) * 1.5}) == 0.5
    assert max_abs_diff(a, {"x": torch.full((2, 3), float("nan")), "y": torch.ones(4)}) == float("inf")
    assert max_abs_diff({"x": torch.full((2, 3), float("inf")), "y": torch.ones(4)}, a) == float("inf")
