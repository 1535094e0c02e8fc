"""DDP through torchrun on CPU (gloo): two processes fine-tune a tiny sparsified ViT, and a sparsified detector, for a
few steps, and two processes with batch b end with the weights of one process with batch 2b."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

from tokenprune.train import finetune
from tokenprune.train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]

RECIPE = {
    "model": {
        "name": "vit_tiny_patch16_224",
        "kwargs": {
            "img_size": 16,
            "patch_size": 4,
            "embed_dim": 32,
            "depth": 4,
            "num_heads": 2,
            "num_classes": 4,
            "in_chans": 1,
        },
    },
    "sparsify": {"locations": [1, 2, 3]},
    "learned_ratios": {"enabled": True, "target_flops": 0.7},
    "data": {"source": "synthetic", "num_classes": 4, "synthetic_size": 40, "workers": 0},
    "optim": {"batch_size": 4, "global_batch_size": 8, "epochs": 2, "warmup_epochs": 0},
    "run": {"threads": 1, "log_every": 1, "checkpoint_every": 2, "device": "cpu"},
}


@pytest.mark.distributed
def test_torchrun_two_processes_gloo(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "tokenprune.train",
        "--recipe",
        str(recipe),
        f"run.output_dir={out}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    # 40 images, 2 ranks x 4 per batch, accumulation 8 / (4 x 2) = 1: 5 steps per epoch, 2 epochs.
    assert metrics["steps"] == 10 and metrics["learned"]
    assert metrics["flops_estimate"] == pytest.approx(0.7, abs=1e-4)
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["world"] == 2 and len(ckpt["rng"]) == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "final" for r in records) == 1  # rank 0 alone writes


DENSE = {
    **RECIPE,
    "sparsify": {"enabled": False},  # no Gumbel noise: the weights depend on the data and the arithmetic only
    "learned_ratios": {"enabled": False},
    "optim": {"batch_size": 4, "epochs": 1, "warmup_epochs": 0, "lr": 1e-2, "max_steps": 3},
    "run": {"threads": 1, "log_every": 1, "device": "cpu", "eval_every": 0},
}


@pytest.mark.distributed
def test_two_processes_equal_one_with_twice_the_batch(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(DENSE))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    worker = ROOT / "tests" / "_ddp_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    proc = subprocess.run(
        [*cmd, str(recipe), str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Rank r takes positions r, r + 2, ... of the epoch's order, so a step of the two ranks (b = 4 each) sees the
    # same 8 images as a step of one process with batch 8.
    one = finetune(recipe, overrides=["optim.batch_size=8", f"run.output_dir={tmp_path / 'one'}"])
    assert one.metrics["steps"] == 3
    reference = load_checkpoint(tmp_path / "one" / "final.pt")["model"]
    synced = load_checkpoint(tmp_path / "synced" / "final.pt")["model"]
    unsynced = load_checkpoint(tmp_path / "unsynced" / "final.pt")["model"]

    torch.manual_seed(DENSE["run"].get("seed", 0))  # the initial weights, as finetune builds them
    init = timm.create_model(DENSE["model"]["name"], **DENSE["model"]["kwargs"]).state_dict()

    def gap(weights):
        """Distance to the one-process weights, relative to how far those moved in training."""
        return (sum((weights[k] - v).square().sum() for k, v in reference.items()) / moved).sqrt().item()

    moved = sum((v - init[k]).square().sum() for k, v in reference.items())
    # Equal up to float reduction order (which Adam turns into relative noise on the keys' zero-gradient biases).
    assert gap(synced) < 1e-3
    assert gap(unsynced) > 0.1  # negative control: without DDP each rank follows its own half of the data


DETECTION = {
    "task": "detection",
    "model": {
        "name": "convnext_atto",
        "task_head": "fcos",
        "kwargs": {
            "num_classes": 11,
            "in_chans": 1,
            "fpn_channels": 64,
            "min_size": 64,
            "score_thresh": 0.05,
            "dims": [16, 32, 64, 128],
            "depths": [1, 1, 4, 1],
            "ls_init_value": 1.0,
        },
    },  # fmt: skip
    "loss": {"kl": 0.0},
    "data": {"source": "fashion_mnist_detection", "img_size": 64, "scenes": 16, "val_scenes": 6, "workers": 0},
    "optim": {"batch_size": 2, "global_batch_size": 4, "epochs": 1, "warmup_epochs": 0},
    "run": {"threads": 1, "log_every": 1, "device": "cpu"},
}


@pytest.mark.distributed
def test_torchrun_two_processes_detection(tmp_path, fashion_mnist_like):
    """A sparsified detector under DDP trains with the detector's losses and the ratio loss (DDP raises if a
    parameter such as a predictor or fast path gets no gradient on a rank) and evaluates its mAP."""
    pytest.importorskip("torchmetrics", reason="torchmetrics (and pycocotools) not installed: pip install torchmetrics")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**DETECTION, "data": {**DETECTION["data"], "root": str(fashion_mnist_like)}}))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "tokenprune.train", "--recipe", str(recipe), f"run.output_dir={out}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["steps"] == 4  # 16 scenes, 2 ranks x 2 per batch, 1 epoch
    assert metrics["keep_ratios"] == [0.7, 0.5, 0.3] and 0 <= metrics["map"] <= 100
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert all(r["ratio"] > 0 and "det_bbox_regression" in r for r in train)
