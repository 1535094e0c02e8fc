"""`tokenprune export`: the eval graph (top-k + gather) in ONNX and torch.export reproduces PyTorch's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tokenprune
from tokenprune.cli import EXIT_ERROR, app

KWARGS = {"img_size": [32, 32], "depth": 4, "embed_dim": 48, "num_heads": 3, "num_classes": 4}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("export") / "model.safetensors"
    model = tokenprune.create_model("deit_tiny_patch16_224", **KWARGS).eval()
    sparse = tokenprune.sparsify(model, 0.7, example_inputs=torch.randn(1, 3, 32, 32))
    tokenprune.save(sparse, path)
    return path


def cli(*args) -> object:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output + result.stderr
    return result


@pytest.mark.slow
def test_onnx_round_trip_with_dynamic_batch(saved: Path, tmp_path: Path):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    result = cli("export", saved, "--format", "onnx", "--out", out, "--json", tmp_path / "e.json")
    assert result.exit_code == 0, result.stderr
    info = json.loads((tmp_path / "e.json").read_text())
    assert info["batch"] == "dynamic" and info["input_size"] == [3, 32, 32] and info["max_abs_diff"] < 1e-4
    model = tokenprune.load(saved)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        (logits,) = session.run(None, {"images": x.numpy()})
        with torch.inference_mode():
            torch.testing.assert_close(torch.from_numpy(logits), model(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime's own error type; the image size is fixed
        session.run(None, {"images": torch.randn(1, 3, 48, 48).numpy()})


@pytest.mark.slow
def test_torch_export_round_trip(saved: Path, tmp_path: Path):
    out = tmp_path / "model.pt2"
    result = cli("export", saved, "--format", "torch-export", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert "batch dynamic" in result.output
    program = torch.export.load(str(out)).module()
    model = tokenprune.load(saved)
    for batch in (1, 4):
        x = torch.randn(batch, 3, 32, 32)
        with torch.inference_mode():
            torch.testing.assert_close(program(x), model(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(Exception):  # noqa: B017 - torch.export guards raise AssertionError/RuntimeError by version
        program(torch.randn(1, 3, 48, 48))


@pytest.mark.slow  # over 2 s on 2 cores: the full run covers it, the inner loop (-m 'not slow') skips it
def test_static_batch_export_from_python(saved: Path, tmp_path: Path):
    info = tokenprune.export(
        tokenprune.load(saved), tmp_path / "m.pt2", format="torch-export", dynamic_batch=False, batch_size=3
    )
    assert info["batch"] == 3 and info["max_abs_diff"] < 1e-4
    program = torch.export.load(info["file"]).module()
    assert program(torch.randn(3, 3, 32, 32)).shape == (3, 4)
    with pytest.raises(Exception):  # noqa: B017
        program(torch.randn(2, 3, 32, 32))


def test_unknown_format_and_missing_file(saved: Path, tmp_path: Path):
    result = cli("export", saved, "--format", "tflite", "--out", tmp_path / "m")
    assert result.exit_code == EXIT_ERROR and "torch-export" in result.stderr
    result = cli("export", tmp_path / "none.safetensors", "--out", tmp_path / "m.onnx")
    assert result.exit_code == EXIT_ERROR and "does not exist" in result.stderr


def _program(model: torch.nn.Module, path: Path) -> Path:
    torch.export.save(torch.export.export(model, (torch.randn(2, 4),)), str(path))
    return path


def test_verification_counts_non_finite_outputs_as_failures(tmp_path: Path):
    from tokenprune.errors import TokenPruneError
    from tokenprune.export import verify_export

    torch.manual_seed(0)
    finite = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    poisoned = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    with torch.no_grad():
        poisoned[0].weight.fill_(float("nan"))
    x = torch.randn(2, 4)
    nan_file = _program(poisoned, tmp_path / "nan.pt2")
    assert verify_export(finite, nan_file, "torch-export", x) == float("inf")  # not 0.0
    with pytest.raises(TokenPruneError, match="differs from PyTorch by inf"):
        verify_export(finite, nan_file, "torch-export", x, raise_above_tolerance=True)
    with pytest.raises(TokenPruneError, match="PyTorch's own output .* NaN or infinite"):
        verify_export(poisoned, _program(finite, tmp_path / "ok.pt2"), "torch-export", x)
    assert verify_export(finite, _program(finite, tmp_path / "same.pt2"), "torch-export", x) < 1e-6


def test_an_unwritable_output_is_a_tokenprune_error(saved: Path, tmp_path: Path):
    from tokenprune.errors import TokenPruneError
    from tokenprune.export import export

    (tmp_path / "file").write_text("in the way")
    with pytest.raises(TokenPruneError, match=r"cannot create the folder of \S+file/m\.pt2"):
        export(tokenprune.load(saved), tmp_path / "file" / "m.pt2", format="torch-export")
