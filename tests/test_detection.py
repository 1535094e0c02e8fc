"""Detectors (issue #22): torchvision's FCOS, RetinaNet and Faster R-CNN on timm backbones, sparsified through the
traceable backbone inside them.

Properties over small random-weight configurations (ConvNeXt and Swin spatially, a plain ViT through the refill
route), 64 px images and a fixed transform size: the pass rewrites the backbone and says so; every detection (boxes,
scores, labels) agrees between masked and pruned execution for the same decisions, after the detector's own
post-processing; keep ratios forced to 1 give the dense detector's detections; the chain's names resolve in the
dense detector (a teacher is hooked by them); train-mode losses run and reach the predictors; a sparsified detector
round-trips through save/load; torchvision's ResNet detector is refused for its bottlenecks, not for tracing.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import tokenprune
from tokenprune.detect import PyramidBackbone, collate
from tokenprune.errors import ConfigError, UnsupportedModelError
from tokenprune.models import create_model
from tokenprune.nn.asymmetric import AsymmetricPath

SIZE = 64
# ls_init_value=1: timm's 1e-6 layer scale would make every block (and so every difference) vanish.
CONVNEXT = dict(dims=[16, 32, 64, 128], depths=[1, 1, 4, 1], ls_init_value=1.0)
SWIN = dict(img_size=SIZE, embed_dim=32, depths=[1, 1, 4, 1], num_heads=[1, 2, 4, 8], window_size=4)
VIT = dict(img_size=SIZE, depth=6, embed_dim=96, num_heads=3, out_indices=[1, 3, 5])
# name -> (timm backbone, create_model keywords)
MODELS = {
    "convnext/fcos": ("convnext_atto", dict(task_head="fcos", **CONVNEXT)),
    "swin/retinanet": ("swin_tiny_patch4_window7_224", dict(task_head="retinanet", **SWIN)),
    "convnext/fasterrcnn": ("convnext_atto", dict(task_head="fasterrcnn", **CONVNEXT)),
    "vit/fcos": ("vit_small_patch16_224", dict(task_head="fcos", **VIT)),
}
COMMON = dict(num_classes=6, min_size=SIZE, fpn_channels=64, score_thresh=0.0)


def _dense(key: str) -> nn.Module:
    torch.manual_seed(0)
    name, kwargs = MODELS[key]
    model = create_model(name, **COMMON, **kwargs).eval()
    # Classifier heads start at the focal-loss prior (every score ~0.01, near-ties everywhere): spread them so that
    # the order of detections is decided by the features, not by rounding.
    for qualified, module in model.named_modules():
        if qualified.endswith(("cls_logits", "cls_score")):
            nn.init.normal_(module.weight, std=0.5)
            nn.init.zeros_(module.bias)
    return model


def _images(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request):
    dense = _dense(request.param)
    sparse = tokenprune.sparsify(dense, 0.7, example_inputs=_images()).eval()
    for m in sparse.modules():  # a fresh fast path adds ~1e-6 of a map; give it weight so its output shows
        if isinstance(m, AsymmetricPath):
            if m.fast.gamma is None:  # no layer scale (Swin): give its Linear weight
                nn.init.normal_(m.fast.proj.weight, std=0.1)
            else:
                nn.init.constant_(m.fast.gamma, 0.5)
    return request.param, dense, sparse


def _unmatched(a: list[dict], b: list[dict], box_tol: float = 1e-3, score_tol: float = 1e-4) -> int:
    """How many detections of `a` and `b` (per image: boxes, scores, labels) have no counterpart in the other with the
    same label, a score within `score_tol` and box corners within `box_tol` pixels; count differences count fully.

    Matching instead of comparing in order: two detections whose scores differ by rounding may swap places."""
    missing = 0
    for x, y in zip(a, b, strict=True):
        if len(x["boxes"]) != len(y["boxes"]):
            missing += abs(len(x["boxes"]) - len(y["boxes"])) + min(len(x["boxes"]), len(y["boxes"]))
            continue
        if not len(x["boxes"]):
            continue
        close = (
            (torch.cdist(x["boxes"], y["boxes"], p=float("inf")) <= box_tol)
            & ((x["scores"][:, None] - y["scores"][None, :]).abs() <= score_tol)
            & (x["labels"][:, None] == y["labels"][None, :])
        )
        missing += int((~close.any(1)).sum()) + int((~close.any(0)).sum())
    return missing


def test_plan_rewrites_the_backbone_and_says_why():
    model = _dense("convnext/fcos")
    described = tokenprune.plan(model, 0.7, example_inputs=_images()).describe()
    assert described.startswith("FCOS.backbone: spatial chain of 4 blocks (body.stages_2.blocks.0 ")
    assert "FCOS's own forward is not traceable" in described
    assert "sparsifies its submodule backbone (PyramidBackbone)" in described
    assert f"image batch [2, 3, {SIZE}, {SIZE}]" in described


def test_sparsified_detector_keeps_its_class_and_rewrites_only_the_backbone(pair):
    key, dense, sparse = pair
    assert type(sparse) is type(dense)
    assert isinstance(sparse.backbone, torch.fx.GraphModule) and not isinstance(dense.backbone, torch.fx.GraphModule)
    assert isinstance(dense.backbone, PyramidBackbone)
    config = tokenprune.config_of(sparse)
    assert config.kind == ("token" if key.startswith("vit") else "spatial")
    assert config.source["kwargs"]["task_head"] == key.split("/")[1]
    assert config.input_size == (3, SIZE, SIZE)
    # the chain's names are qualified in the whole detector and name the same blocks in the dense one (a teacher's
    # block is hooked by them), and the recorded chain output is the last of them
    blocks = [dense.get_submodule(block) for block in config.chain]
    assert len(blocks) >= 4 and len({type(b) for b in blocks}) == 1
    assert all(sparse.get_submodule(block) is not None for block in config.chain)
    with torch.no_grad():
        sparse(_images())
    assert tokenprune.sparsity_state(sparse).chain_output == config.chain[-1]
    # everything outside the backbone is the dense detector's, weight for weight
    outside = {k: v for k, v in dense.state_dict().items() if not k.startswith("backbone.")}
    state = sparse.state_dict()
    assert all(torch.equal(state[k], v) for k, v in outside.items())


def test_masked_equals_pruned_and_keep_all_equals_dense(pair):
    key, dense, sparse = pair
    sparse = copy.deepcopy(sparse)
    x = _images()
    with torch.no_grad():
        reference = dense(x)
        tokenprune.set_execution(sparse, "pruned")
        pruned = sparse(x)
        tokenprune.set_execution(sparse, "masked")
        masked = sparse(x)
        assert all(len(d["boxes"]) > 50 for d in pruned), "too few detections to compare"
        assert _unmatched(masked, pruned) == 0
        assert _unmatched(pruned, reference) > 0  # locations or tokens were really dropped
        for stage in tokenprune.selectors(sparse):
            stage.keep_ratio = 1.0
        for execution in ("pruned", "masked"):
            tokenprune.set_execution(sparse, execution)
            assert _unmatched(sparse(x), reference) == 0, execution


def test_train_mode_returns_losses_that_reach_the_predictors(pair):
    key, _, sparse = pair
    sparse = copy.deepcopy(sparse).train()
    images, targets = collate(
        [
            (
                img,
                {
                    "boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 20.0, 60.0, 50.0]]),
                    "labels": torch.tensor([1, 5]),
                },
            )
            for img in _images()
        ]
    )
    torch.manual_seed(0)
    losses = sparse(list(images), targets)
    assert isinstance(losses, dict) and losses
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for s in tokenprune.selectors(sparse) for p in s.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.slow  # over 1.5 s on 2 cores: the full run covers it, the inner loop (-m 'not slow') skips it
@pytest.mark.parametrize("key", list(MODELS))
def test_save_load_round_trip(tmp_path, key):
    dense = _dense(key)
    sparse = tokenprune.sparsify(dense, 0.7, example_inputs=_images()).eval()
    path = tokenprune.save(sparse, tmp_path / "fcos.safetensors")
    loaded = tokenprune.load(path)
    assert type(loaded) is type(dense)
    assert tokenprune.config_of(loaded).chain == tokenprune.config_of(sparse).chain
    with torch.no_grad():
        assert _unmatched(loaded(_images()), sparse(_images()), box_tol=0.0, score_tol=0.0) == 0
    original = tokenprune.load_original(path)
    with torch.no_grad():
        assert _unmatched(original(_images()), dense(_images()), box_tol=0.0, score_tol=0.0) == 0


@pytest.mark.slow  # over 1.5 s on 2 cores: the full run covers it, the inner loop (-m 'not slow') skips it
def test_torchvision_resnet_detector_is_refused_for_its_bottlenecks():
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=SIZE, max_size=SIZE
    ).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [id(m) for m in model.modules()]
    with pytest.raises(UnsupportedModelError, match=r"FasterRCNN\.backbone.* block layer3\.\d+: no slow path") as info:
        tokenprune.sparsify(model, 0.7, example_inputs=torch.rand(1, 3, SIZE, SIZE), inplace=True)
    assert "cannot trace" not in str(info.value)
    assert [id(m) for m in model.modules()] == modules  # refused before anything was touched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_detector_keywords_are_checked():
    with pytest.raises(ConfigError, match="task_head='yolo'"):
        create_model("convnext_atto", task_head="yolo", num_classes=3)
    with pytest.raises(ConfigError, match="levels=5.*4 feature levels"):
        create_model("convnext_atto", task_head="fcos", num_classes=3, levels=5, **CONVNEXT)
    with pytest.raises(ConfigError, match="fpn_channels=48.*GroupNorm"):
        create_model("convnext_atto", task_head="fcos", num_classes=3, fpn_channels=48, **CONVNEXT)
    with pytest.raises(ConfigError, match="needs num_classes"):
        create_model("convnext_atto", task_head="retinanet")


# -- the harness: task detection -------------------------------------------------------------------------------------
def test_detection_loss_weights_the_detector_losses_and_refuses_logit_kl():
    from tokenprune.detect.loss import DetectionLoss
    from tokenprune.train.losses import LossWeights

    losses = {"classification": torch.tensor(0.5), "bbox_regression": torch.tensor(0.25)}
    out = DetectionLoss(LossWeights.for_kind("spatial", ce=2.0, kl=0.0))(losses, None)
    assert float(out.total) == 1.5 and float(out.parts["ce"]) == 0.75
    assert float(out.parts["det_classification"]) == 0.5 and float(out.parts["det_bbox_regression"]) == 0.25
    with pytest.raises(ConfigError, match=r"loss\.kl=0\.5.*set loss\.kl: 0"):
        DetectionLoss(LossWeights.for_kind("spatial"))


def test_detection_scores_are_coco_map():
    pytest.importorskip("torchmetrics", reason="torchmetrics (and pycocotools) not installed: pip install torchmetrics")
    from tokenprune.detect.metrics import DetectionScores

    target = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 50.0]]), "labels": torch.tensor([1, 2])}
    exact = {**target, "scores": torch.tensor([0.9, 0.8])}
    scores = DetectionScores()
    scores.update([exact], [target])
    assert scores.compute() == {"map": 100.0, "map_50": 100.0}
    # the second box shifted to IoU 480/720 = 2/3 with its target: a hit at the thresholds 0.50 to 0.65 (4 of 10)
    shifted = {**exact, "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 26.0, 40.0, 56.0]])}
    scores = DetectionScores()
    scores.update([shifted], [target])
    result = scores.compute()
    assert result["map_50"] == 100.0 and result["map"] == pytest.approx(100.0 * (1 + 0.4) / 2, abs=0.01)


@pytest.mark.slow  # two tiny runs, over 1.5 s: the full run covers it, the inner loop (-m 'not slow') skips it
def test_tiny_sparse_detection_finetune(tmp_path, fashion_mnist_like):
    pytest.importorskip("torchmetrics", reason="torchmetrics (and pycocotools) not installed: pip install torchmetrics")
    import json

    from tokenprune.train import finetune

    kwargs = json.dumps({"num_classes": 11, "in_chans": 1, "fpn_channels": 64, "min_size": SIZE, **CONVNEXT})
    common = ["task=detection", "model.name=convnext_atto", "model.task_head=fcos", f"model.kwargs={kwargs}",
              "data.source=fashion_mnist_detection", f"data.img_size={SIZE}", "data.scenes=16", "data.val_scenes=8",
              "data.workers=0", "optim.batch_size=8", "optim.epochs=2", "optim.warmup_epochs=0", "run.device=cpu",
              "run.threads=1", "run.log_every=1", "loss.kl=0", f"data.root={fashion_mnist_like}"]  # fmt: skip
    teacher = finetune(None, overrides=[*common, "sparsify.enabled=false", f"run.output_dir={tmp_path / 't'}"])
    student = finetune(
        None, overrides=[*common, f"model.checkpoint={tmp_path / 't' / 'final.pt'}", f"run.output_dir={tmp_path / 's'}"]
    )
    assert tokenprune.config_of(student.model).kind == "spatial"
    m = student.metrics
    assert m["teacher_map"] == pytest.approx(teacher.metrics["map"])
    assert 0 <= m["map"] <= 100 and 0 <= m["map_50"] <= 100 and m["steps"] == 4
    lines = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in lines if r["kind"] == "eval"][0].keys() >= {"map", "map_50"}
    train = [r for r in lines if r["kind"] == "train"]
    assert all({"ce", "ratio", "distill", "det_classification", "det_bbox_regression"} <= set(r) for r in train)
    assert train[-1]["distill"] > 0 and train[-1]["ratio"] > 0


def test_task_detection_needs_a_detector(tmp_path, fashion_mnist_like):
    from tokenprune.train import finetune

    overrides = ["task=detection", "model.name=convnext_atto", "data.source=fashion_mnist_detection",
                 "data.img_size=64", "data.scenes=8", "data.val_scenes=4", "data.workers=0", "run.device=cpu",
                 "sparsify.enabled=false", "loss.kl=0", f"data.root={fashion_mnist_like}",
                 f"run.output_dir={tmp_path}"]  # fmt: skip
    with pytest.raises(ConfigError, match="task: detection trains a detector.*ConvNeXt takes only images"):
        finetune(None, overrides=[*overrides, 'model.kwargs={"num_classes": 11, "in_chans": 1}'])


@pytest.mark.slow  # over 1.5 s on 2 cores: the full run covers it, the inner loop (-m 'not slow') skips it
def test_flops_split_backbone_and_head_of_a_detector():
    from tokenprune.measure.report import build_report

    dense = _dense("convnext/fcos")
    sparse = tokenprune.sparsify(dense, 0.7, example_inputs=_images())
    report = build_report("fcos", dense, sparse, (3, SIZE, SIZE), flops_only=True)
    split = report["split"]
    assert split["backbone"] == "backbone"  # called on the batch the detector's transform makes, not on the input
    assert split["dense"]["head_gmacs"] > 0
    assert split["sparse"]["head_gmacs"] == pytest.approx(split["dense"]["head_gmacs"])  # the heads are not sparsified
    assert split["sparse"]["backbone_gmacs"] < split["dense"]["backbone_gmacs"]
    for side in ("dense", "sparse"):
        assert split[side]["backbone_gmacs"] + split[side]["head_gmacs"] == pytest.approx(report[side]["gmacs"])


# -- the rule is structural: any model whose forward does not trace, not only detectors -----------------------------
class _Gated(nn.Module):
    """A classifier behind Python control flow on tensor values: the wrapper cannot be traced, its ViT can."""

    def __init__(self) -> None:
        super().__init__()
        import timm

        self.net = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().max() > 100:  # data-dependent: torch.fx cannot trace this
            x = x / x.abs().max()
        return self.net(x)


def test_an_untraceable_wrapper_gets_its_traceable_part_sparsified():
    torch.manual_seed(0)
    model = _Gated().eval()
    x = torch.randn(2, 3, 32, 32)
    described = tokenprune.plan(model, 0.7, locations=[1, 2], example_inputs=x).describe()
    assert described.startswith("_Gated.net: token chain of 4 blocks") and "cannot trace _Gated" in described
    sparse = tokenprune.sparsify(model, 0.7, locations=[1, 2], example_inputs=x).eval()
    assert type(sparse) is _Gated and isinstance(sparse.net, torch.fx.GraphModule)
    assert tokenprune.config_of(sparse).chain == [f"net.blocks.{i}" for i in range(4)]
    with torch.no_grad():
        pruned = sparse(x)
        state = tokenprune.sparsity_state(sparse)  # names in the whole model, to hook the same modules on a teacher
        assert (state.chain_output, state.final_norm) == ("net.blocks.3", "net.norm")
        assert isinstance(model.get_submodule(state.final_norm), torch.nn.LayerNorm)
        tokenprune.set_execution(sparse, "masked")
        assert torch.allclose(sparse(x), pruned, atol=1e-5)
        assert not torch.allclose(pruned, model(x), atol=1e-3)


def test_a_traceable_model_keeps_its_own_refusal():
    import timm

    with pytest.raises(UnsupportedModelError, match="no slow path") as info:
        tokenprune.sparsify(timm.create_model("resnet18").eval(), 0.7, example_inputs=torch.randn(1, 3, 64, 64))
    assert "Nor does any submodule" not in str(info.value) and "not traceable" not in str(info.value)


@pytest.mark.slow  # several tiny runs: the full run covers it, the inner loop (-m 'not slow') skips it
def test_detection_run_interrupted_then_resumed_equals_uninterrupted(tmp_path, fashion_mnist_like, monkeypatch):
    """Resume for detection as for the other tasks: a sparse detector's run cut after a checkpoint and rerun ends
    with bitwise the weights and metrics of the uninterrupted run (Gumbel noise and data order restored)."""
    pytest.importorskip("torchmetrics", reason="torchmetrics (and pycocotools) not installed: pip install torchmetrics")
    import json

    from tokenprune.train import finetune
    from tokenprune.train.checkpoint import load_checkpoint
    from tokenprune.train.trainer import Trainer

    kwargs = json.dumps({"num_classes": 11, "in_chans": 1, "fpn_channels": 64, "min_size": SIZE, **CONVNEXT})
    common = ["task=detection", "model.name=convnext_atto", "model.task_head=fcos", f"model.kwargs={kwargs}",
              "data.source=fashion_mnist_detection", f"data.img_size={SIZE}", "data.scenes=16", "data.val_scenes=4",
              "data.workers=0", "optim.batch_size=4", "optim.epochs=1", "optim.warmup_epochs=0", "run.device=cpu",
              "run.threads=1", "run.log_every=1", "run.checkpoint_every=1", "loss.kl=0",
              f"data.root={fashion_mnist_like}"]  # fmt: skip
    finetune(
        None, overrides=[*common, "sparsify.enabled=false", "optim.max_steps=1", f"run.output_dir={tmp_path / 't'}"]
    )
    student = [*common, f"model.checkpoint={tmp_path / 't' / 'final.pt'}"]
    full = finetune(None, overrides=[*student, f"run.output_dir={tmp_path / 'full'}"])
    assert full.metrics["steps"] == 4

    original, calls = Trainer._optimizer_step, {"n": 0}

    def crash_on_third(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        original(self)

    monkeypatch.setattr(Trainer, "_optimizer_step", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(None, overrides=[*student, f"run.output_dir={tmp_path / 'cut'}"])
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 2
    steps = []

    def counted(self):
        steps.append(1)
        original(self)

    monkeypatch.setattr(Trainer, "_optimizer_step", counted)
    resumed = finetune(None, overrides=[*student, f"run.output_dir={tmp_path / 'cut'}"])
    assert len(steps) == 2  # it continued from step 2 rather than starting again
    a = load_checkpoint(tmp_path / "full" / "final.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "final.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics == full.metrics
