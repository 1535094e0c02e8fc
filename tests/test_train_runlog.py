"""Progress lines, JSON-lines metrics, and atomic checkpoints with clear errors."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch

from tokenprune.errors import CheckpointError
from tokenprune.train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from tokenprune.train.runlog import MetricsWriter, ProgressReporter


def test_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    reporter = ProgressReporter(10, stream=stream)
    assert not reporter.use_rich
    reporter.step(3, {"loss": 1.23456, "keep1": 0.7})
    reporter.message("epoch 0: top-1 50.00%")
    reporter.close()
    assert stream.getvalue().splitlines() == ["step 3 loss=1.235 keep1=0.7", "epoch 0: top-1 50.00%"]
    silent = io.StringIO()
    ProgressReporter(10, enabled=False, stream=silent).step(1, {"loss": 1.0})
    assert silent.getvalue() == ""


def test_metrics_jsonl(tmp_path):
    writer = MetricsWriter(tmp_path / "m" / "metrics.jsonl")
    writer.write("train", step=1, loss=torch.tensor(0.5).item())
    writer.write("eval", step=1, top1=80.0)
    records = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["train", "eval"] and records[1]["top1"] == 80.0


def test_checkpoint_atomic_and_errors(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1, "w": torch.ones(2)}, path)
    save_checkpoint({"step": 2, "w": torch.zeros(2)}, path)
    assert load_checkpoint(path)["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary files left behind
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_checkpoint(truncated)
    torch.save({"x": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a tokenprune training checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_rng_roundtrip_through_a_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    save_checkpoint({"rng": [capture_rng()]}, tmp_path / "last.pt")
    a, b, c = torch.rand(3), random.random(), np.random.rand(2)
    restore_rng(load_checkpoint(tmp_path / "last.pt")["rng"][0])  # read with weights_only=True
    assert torch.equal(torch.rand(3), a) and random.random() == b and np.array_equal(np.random.rand(2), c)


def test_checkpoint_with_pickled_code_is_refused(tmp_path, code_payload):
    payload, marker = code_payload
    save_checkpoint({"step": 1, "rng": [payload]}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="refused to read checkpoint .*last.pt"):
        load_checkpoint(tmp_path / "last.pt")
    assert not marker.exists()


def test_an_unwritable_metrics_file_is_a_training_error_naming_it(tmp_path):
    from tokenprune.errors import TrainingError

    (tmp_path / "file").write_text("in the way")
    with pytest.raises(TrainingError, match=r"cannot create \S+file"):
        MetricsWriter(tmp_path / "file" / "metrics.jsonl")
    writer = MetricsWriter(tmp_path / "m.jsonl")
    (tmp_path / "m.jsonl").mkdir()  # a folder where the file should be
    with pytest.raises(TrainingError, match=r"cannot append to \S+m\.jsonl"):
        writer.write("train", step=1)


def test_a_run_starts_by_saying_what_it_trains(tmp_path, capsys):
    """One line: the model and its stages, the data and the input size (with a note when the size is the model's
    default rather than the recipe's: images are resized to it), the steps and the device."""
    from tiny_runs import ONE_EPOCH, SYNTHETIC, TINY_VIT

    from tokenprune.train import finetune

    finetune(overrides=[*TINY_VIT, *SYNTHETIC, *ONE_EPOCH, f"run.output_dir={tmp_path / 'sparse'}"])
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(f"{tmp_path / 'sparse'}: vit_tiny_patch16_224, 3 token stages keeping 0.7/0.49/0.343")
    assert "16 training and 16 evaluation images (synthetic), input 1x16x16;" in line
    assert line.endswith("2 steps of 8 images (1 epoch) on cpu")

    dense = ["model.name=resnet10t", "model.kwargs={num_classes: 4, in_chans: 1}", "sparsify.enabled=false"]
    finetune(overrides=[*SYNTHETIC, *ONE_EPOCH, *dense, f"run.output_dir={tmp_path / 'dense'}"])
    line = capsys.readouterr().out.splitlines()[0]
    assert ": resnet10t, dense;" in line and "input 1x176x176 (the model's default size; data.img_size sets it)" in line

    from tokenprune.train import build_datasets, load_recipe

    recipe = load_recipe(None, [*TINY_VIT, *SYNTHETIC, *ONE_EPOCH])
    data = build_datasets(recipe.data, img_size=16, in_chans=1, seed=0)
    finetune(recipe, data=data, overrides=[f"run.output_dir={tmp_path / 'given'}"])
    assert "images (datasets passed to finetune), input 1x16x16;" in capsys.readouterr().out.splitlines()[0]
