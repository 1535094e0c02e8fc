"""The CLI's file handling: export takes what convert wrote, finetune --save records the recipe's library."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
from typer.testing import CliRunner

import tokenprune
import tokenprune.train
from tokenprune.cli import app
from tokenprune.io import read_metadata

MODEL = "test_vit"  # timm's 0.4M-parameter ViT for tests


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output + result.stderr, result.output + result.stderr
    return result


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("convert") / "out"
    result = run("convert", MODEL, "--out", out, "--input-size", "32", "--flops-only")
    assert result.exit_code == 0, result.stderr
    return out


@pytest.mark.parametrize("given", ["folder", "file"])
@pytest.mark.slow  # over 2 s on 2 cores: the full run covers it, the inner loop (-m 'not slow') skips it
def test_export_takes_what_convert_wrote_and_writes_beside_it(converted: Path, tmp_path: Path, given: str):
    folder = shutil.copytree(converted, tmp_path / "out")
    target = folder if given == "folder" else folder / "model.safetensors"
    result = run("export", target, "--format", "torch-export", "--no-verify")
    assert result.exit_code == 0, result.stderr
    assert (folder / "model.pt2").is_file()
    assert str(folder / "model.pt2") in result.output


def test_finetune_save_records_a_torchvision_recipes_library(tmp_path: Path, monkeypatch):
    # A small model of torchvision's ViT class stands in for the fine-tuned vit_b_16: the point is the header.
    dense = torchvision.models.VisionTransformer(32, 16, num_layers=4, num_heads=3, hidden_dim=48, mlp_dim=96).eval()
    sparse = tokenprune.sparsify(dense, 0.7, example_inputs=torch.randn(1, 3, 32, 32))
    recipe = SimpleNamespace(model=SimpleNamespace(name="vit_b_16", kwargs={"image_size": 32}))
    fake = SimpleNamespace(model=sparse, recipe=recipe, metrics={"steps": 0})
    monkeypatch.setattr(tokenprune.train, "finetune", lambda recipe, overrides: fake)
    result = run("finetune", "--save", tmp_path / "m.safetensors")
    assert result.exit_code == 0, result.stderr
    source = json.loads(read_metadata(tmp_path / "m.safetensors")["source"])
    assert source == {"library": "torchvision", "name": "vit_b_16", "kwargs": {"image_size": 32}}
