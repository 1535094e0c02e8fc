"""The CLI's file handling: export takes what convert wrote, finetune --save records the recipe's library."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
from tiny_runs import ONE_EPOCH, SYNTHETIC, TINY_VIT
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


# ---- a finetune run's final.pt, taken by report, export and visualize as it is ----------------------------------

TINY_RUN = [*TINY_VIT, *SYNTHETIC, *ONE_EPOCH]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, dict]:
    """A sparse run whose keep ratios were learned (so they are not the defaults a rebuild could fall back to)."""
    out = tmp_path_factory.mktemp("runs") / "student"
    learned = ["learned_ratios.enabled=true", "learned_ratios.target_flops=0.6"]
    result = tokenprune.train.finetune(None, overrides=[*TINY_RUN, *learned, f"run.output_dir={out}"])
    return out, result.metrics


@pytest.mark.parametrize("given", ["folder", "file"])
def test_report_reads_a_runs_final_pt(finished_run, tmp_path: Path, given: str):
    folder, metrics = finished_run
    target = folder if given == "folder" else folder / "final.pt"
    result = run("report", target, "--flops-only", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert [s["keep_ratio"] for s in report["stages"]] == pytest.approx(metrics["keep_ratios"])
    assert report["input_size"] == [1, 16, 16]
    assert 0 < report["sparse"]["gmacs"] < report["dense"]["gmacs"]


def test_a_runs_dense_side_is_its_trained_backbone_without_stages(finished_run):
    from tokenprune.loaders import load_pair
    from tokenprune.nn.recorder import find_config
    from tokenprune.train.checkpoint import load_checkpoint

    folder, _ = finished_run
    name, dense, sparse = load_pair(folder)
    assert name == "vit_tiny_patch16_224"
    assert find_config(dense) is None and find_config(sparse) is not None
    trained = load_checkpoint(folder / "final.pt")["model"]
    weights = dense.state_dict()
    assert weights and all(torch.equal(v, trained[k]) for k, v in weights.items())
    # the backbone the sparse model runs is the same one: same outputs once every token is kept
    with torch.no_grad():
        x = torch.randn(2, 1, 16, 16)
        for selector in tokenprune.selectors(sparse):
            selector.keep_ratio = 1.0
        assert torch.allclose(sparse(x), dense(x), atol=1e-5)


@pytest.mark.slow  # torch.export of the run's model: about 5 s on 2 cores
def test_export_takes_a_run_folder_and_writes_beside_its_final_pt(finished_run, tmp_path: Path):
    folder = shutil.copytree(finished_run[0], tmp_path / "run")
    result = run("export", folder, "--format", "torch-export")
    assert result.exit_code == 0, result.stderr
    assert (folder / "final.pt2").is_file() and "max |difference| from PyTorch" in result.output


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory) -> Path:
    """A dense run of the same architecture: another set of weights for the student's dense side."""
    out = tmp_path_factory.mktemp("runs") / "dense"
    tokenprune.train.finetune(None, overrides=[*TINY_RUN, "sparsify.enabled=false", f"run.output_dir={out}"])
    return out


def test_a_dense_run_has_nothing_to_report(dense_run: Path):
    result = run("report", dense_run / "final.pt", "--flops-only")
    assert result.exit_code != 0
    assert "dense run" in result.stderr and str(dense_run / "final.pt") in result.stderr


def test_the_dense_side_takes_the_weights_it_is_given(finished_run, dense_run: Path, tmp_path: Path):
    """--dense-checkpoint: the model the student is compared with is that file's, loaded strictly; the report says
    which file it was."""
    from tokenprune.loaders import load_pair
    from tokenprune.train.checkpoint import load_checkpoint

    folder, _ = finished_run
    _, dense, _ = load_pair(folder, dense_weights=dense_run / "final.pt")
    given = load_checkpoint(dense_run / "final.pt")["model"]
    own = load_checkpoint(folder / "final.pt")["model"]
    weights = dense.state_dict()
    assert all(torch.equal(v, given[k]) for k, v in weights.items())
    assert not all(torch.equal(v, own[k]) for k, v in weights.items())  # the two runs' weights differ: a real check
    result = run(
        "report", folder, "--dense-checkpoint", dense_run / "final.pt", "--flops-only", "--json", tmp_path / "r.json"
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "r.json").read_text())["dense_weights"] == str(dense_run / "final.pt")
    # the student's own checkpoint holds predictors too: not dense weights of this architecture
    result = run("report", folder, "--dense-checkpoint", folder / "final.pt", "--flops-only")
    assert result.exit_code != 0 and "tokenprune_stage" in result.stderr
    result = run("report", MODEL, "--dense-checkpoint", dense_run / "final.pt", "--flops-only")
    assert result.exit_code != 0 and "--checkpoint" in result.stderr


def test_a_folder_without_a_model_is_named_in_the_error(tmp_path: Path):
    result = run("export", tmp_path)
    assert result.exit_code != 0
    assert "model.safetensors" in result.stderr and "final.pt" in result.stderr and str(tmp_path) in result.stderr


def test_visualize_draws_what_a_runs_model_keeps(finished_run, tmp_path: Path):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((16, 16), dtype=np.uint8), mode="L").save(tmp_path / "grey.png")
    result = run("visualize", finished_run[0] / "final.pt", tmp_path / "grey.png", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "o" / "grey_kept.png").is_file()


def test_plain_weights_given_as_a_model_file_say_how_to_load_them(tmp_path: Path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "weights.pt")
    result = run("report", tmp_path / "weights.pt", "--flops-only")
    assert result.exit_code != 0
    assert "not a tokenprune training checkpoint" in result.stderr and "--checkpoint PATH" in result.stderr
