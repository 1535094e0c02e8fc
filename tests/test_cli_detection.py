"""Detectors through the command line (issue #22): `convert`/`report --task-head` build a torchvision detector on a
timm backbone, sparsify its backbone, split the FLOPs into backbone and head with the head's workload stated, time
the backbone; the file convert writes loads back to the same detections; `export --backbone` writes the sparsified
backbone, whose ONNX outputs equal PyTorch's, and the whole detector is refused with that advice.

Tiny random-weight ConvNeXt backbones at 64 px, a one-stage (FCOS) and a two-stage (Faster R-CNN) head.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import tokenprune
from tokenprune.cli import EXIT_ERROR, EXIT_GATE, app
from tokenprune.cli.pipeline import build
from tokenprune.measure import build_report, profile_flops
from tokenprune.measure.backbone import detector_workload

SIZE = 64
MODEL = "convnext_atto"
# ls_init_value=1: timm's 1e-6 layer scale would make the sparsified blocks' effect vanish; score_thresh=0: random
# classifiers score ~0.01, below every default threshold, and an empty detection list compares equal to anything.
KWARGS = {
    "num_classes": 6,
    "dims": [16, 32, 64, 128],
    "depths": [1, 1, 4, 1],
    "ls_init_value": 1.0,
    "score_thresh": 0.0,
}
TINY = ["--input-size", str(SIZE)] + [a for k, v in KWARGS.items() for a in ("-k", f"{k}={json.dumps(v)}")]
FAST = ["--repeats", "1", "--warmup", "0", "--batch-size", "2"]


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "Traceback" not in text, text
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return result


def _built(head: str):
    """The (dense, sparse) pair `convert --task-head head` builds in memory (same seed, same construction)."""
    return build(MODEL, input_size=(3, SIZE, SIZE), model_kwargs=dict(KWARGS), task_head=head)


def _images(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _per_roi_macs(model: nn.Module) -> int:
    """Multiply-adds a Faster R-CNN spends per proposal in its box head and predictor: its linear layers."""
    heads = (model.roi_heads.box_head, model.roi_heads.box_predictor)
    return sum(m.in_features * m.out_features for h in heads for m in h.modules() if isinstance(m, nn.Linear))


@pytest.fixture(scope="module", params=["fcos", "fasterrcnn"])
def converted(request, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(request.param) / "out"
    result = run("convert", MODEL, "--task-head", request.param, "--out", out, *TINY, *FAST)
    assert result.exit_code == 0, result.output + result.stderr
    return request.param, out


def test_convert_splits_backbone_and_head_and_states_the_heads_workload(converted):
    head, out = converted
    report = json.loads((out / "report.json").read_text())
    split = report["split"]
    assert split["backbone"] == "backbone" and split["backbone_input"] == [3, SIZE, SIZE]
    for side in ("dense", "sparse"):
        assert split[side]["backbone_gmacs"] + split[side]["head_gmacs"] == pytest.approx(report[side]["gmacs"])
        assert split[side]["head_gmacs"] > 0
    assert split["sparse"]["backbone_gmacs"] < split["dense"]["backbone_gmacs"]
    detector = split["detector"]
    assert (detector["min_size"], detector["max_size"]) == (SIZE, SIZE)  # the transform keeps --input-size
    loaded = tokenprune.load(out / "model.safetensors")
    limit = loaded.roi_heads.detections_per_img if head == "fasterrcnn" else loaded.detections_per_img
    assert detector["detection_limit"] == limit
    counts = {side: detector[side]["proposals"] for side in ("dense", "sparse")}
    head_gmacs = {side: split[side]["head_gmacs"] for side in ("dense", "sparse")}
    if head == "fcos":  # one stage: the head runs on every location, whatever it detects
        assert detector["proposal_limit"] is None and counts == {"dense": None, "sparse": None}
        assert head_gmacs["sparse"] == pytest.approx(head_gmacs["dense"])
    else:  # two stages: the box head's cost follows the proposals, whose count the report states
        assert detector["proposal_limit"] == loaded.rpn._post_nms_top_n["testing"]
        assert all(0 < n <= detector["proposal_limit"] for n in counts.values())
        per_roi = _per_roi_macs(loaded) / 1e9
        difference = (counts["dense"] - counts["sparse"]) * per_roi
        assert head_gmacs["dense"] - head_gmacs["sparse"] == pytest.approx(difference, abs=1e-9)
    assert all(0 < detector[side]["detections"] <= limit for side in ("dense", "sparse"))
    # the speed-up is the backbone's, on the batch the transform makes
    assert split["timed"] == "backbone" and report["speedup"] is not None
    assert report["speedup"] == pytest.approx(report["sparse"]["throughput"] / report["dense"]["throughput"])
    text = (out / "report.md").read_text()
    assert f"of backbone alone, at 3x{SIZE}x{SIZE}" in text and f"{SIZE}/{SIZE} px" in text
    assert ("proposals per image" in text) == (head == "fasterrcnn")


def test_converted_detector_loads_back_with_equal_detections(converted):
    head, out = converted
    loaded = tokenprune.load(out / "model.safetensors")
    _, sparse = _built(head)
    assert type(loaded) is type(sparse) and tokenprune.config_of(loaded).source["kwargs"]["task_head"] == head
    with torch.no_grad():
        got, expected = loaded.eval()(_images()), sparse(_images())
    assert all(len(d["boxes"]) > 10 for d in expected), "too few detections to compare"
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_report_on_the_saved_detector_and_the_speedup_gate(converted, tmp_path):
    head, out = converted
    result = run("report", out / "model.safetensors", "--flops-only", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    again, first = json.loads((tmp_path / "r.json").read_text()), json.loads((out / "report.json").read_text())
    assert again["split"]["backbone"] == "backbone" and again["split"]["detector"]["min_size"] == SIZE
    assert again["split"]["sparse"]["backbone_gmacs"] == pytest.approx(first["split"]["sparse"]["backbone_gmacs"])
    result = run("report", out, *FAST, "--min-speedup", "1000")
    assert result.exit_code == EXIT_GATE and "speed-up" in result.stderr
    result = run("report", out / "model.safetensors", "--task-head", head)
    assert result.exit_code == EXIT_ERROR and "--task-head" in result.stderr  # a file keeps its configuration


def test_the_backbone_is_what_is_timed():
    dense, sparse = _built("fcos")
    calls: dict[str, list[int]] = {"detector": [], "backbone": []}
    for model in (dense, sparse):
        model.register_forward_pre_hook(lambda _m, args: calls["detector"].append(len(args[0])))
        model.backbone.register_forward_pre_hook(lambda _m, args: calls["backbone"].append(len(args[0])))
    report = build_report("fcos", dense, sparse, (3, SIZE, SIZE), batch_size=3, warmup=0, repeats=2)
    assert report["split"]["timed"] == "backbone"
    # throughput at batch 3 and latency at batch 1, dense and sparse interleaved: 2 x 2 runs of each batch
    assert calls["backbone"].count(3) == 4 and 3 not in calls["detector"]


def test_proposal_count_is_the_one_the_box_head_was_costed_at():
    dense, _ = _built("fasterrcnn")
    x = _images(1)
    workload = detector_workload(dense, x)
    flops = profile_flops(dense, x, backbone=None)
    box_head = flops.by_module["roi_heads.box_head"] + flops.by_module["roi_heads.box_predictor"]
    assert workload["proposals"] > 0 and box_head == workload["proposals"] * _per_roi_macs(dense)
    assert detector_workload(tokenprune.create_model("test_vit").eval(), torch.rand(1, 3, 160, 160)) is None


@pytest.mark.slow  # two ONNX exports, ~20 s on 2 cores
def test_export_the_backbone_to_onnx_and_refuse_the_whole_detector(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "out"
    # the transform upsamples 64 px images to 96: the backbone's input is the transform's batch, not the image
    resize = ["-k", "min_size=96", "-k", "max_size=96"]
    result = run("convert", MODEL, "--task-head", "fcos", "--out", out, *TINY, *resize, "--flops-only")
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "report.json").read_text())["split"]["backbone_input"] == [3, 96, 96]
    result = run("export", out)
    assert result.exit_code == EXIT_ERROR and "export FILE --backbone" in result.stderr
    assert list(out.glob("*.onnx")) == []  # refused before anything was written
    result = run("export", out, "--backbone", "--json", tmp_path / "e.json")
    assert result.exit_code == 0, result.stderr
    info = json.loads((tmp_path / "e.json").read_text())
    assert info["module"] == "backbone" and info["input_size"] == [3, 96, 96] and info["batch"] == "dynamic"
    model = tokenprune.load(out / "model.safetensors").eval()
    session = ort.InferenceSession(info["file"], providers=["CPUExecutionProvider"])
    assert Path(info["file"]) == out / "model.backbone.onnx"
    for batch in (1, 3):
        images = model.transform(list(_images(batch)))[0].tensors  # the batch the detector's transform makes
        assert images.shape[-2:] == (96, 96)
        with torch.no_grad():
            expected = model.backbone(images)
        got = session.run(None, {"images": images.numpy()})
        assert [o.name for o in session.get_outputs()] == list(expected)
        for value, (name, reference) in zip(got, expected.items()):
            torch.testing.assert_close(torch.from_numpy(value), reference, atol=1e-4, rtol=1e-4, msg=name)
    # a model that traces whole has no separate backbone to export
    plain = tokenprune.sparsify(
        tokenprune.create_model("test_vit").eval(), 0.7, example_inputs=torch.randn(1, 3, 32, 32)
    )
    tokenprune.save(plain, tmp_path / "vit.safetensors")
    result = run("export", tmp_path / "vit.safetensors", "--backbone")
    assert result.exit_code == EXIT_ERROR and "drop --backbone" in result.stderr


def test_task_head_options_are_checked():
    result = run("convert", MODEL, "--task-head", "fcos", "--out", "unused", "--input-size", str(SIZE))
    assert result.exit_code == EXIT_ERROR and "-k num_classes=N" in result.stderr
    result = run("report", MODEL, "--task-head", "fcos", "--features-only", *TINY, "--flops-only")
    assert result.exit_code == EXIT_ERROR and "drop --features-only" in result.stderr
    result = run("report", "vit_b_16", "--task-head", "retinanet", "-k", "num_classes=3", "--flops-only")
    assert result.exit_code == EXIT_ERROR and "needs a timm backbone" in result.stderr
    result = run("report", MODEL, "--task-head", "yolo", *TINY, "--flops-only")
    assert result.exit_code == EXIT_ERROR and "task_head='yolo' is unknown" in result.stderr
