"""examples/gpu_check.py runs end to end on a CPU: the script a lent GPU gets has to work the first time."""

import json
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "gpu_check.py"


@pytest.mark.slow
def test_eager_and_profile_stages_run_and_save(tmp_path, monkeypatch):
    argv = ["eager", "profile", "--device", "cpu", "--models", "deit_tiny_patch16_224", "--precisions", "fp32", "bf16"]
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *argv, "--batch", "2", "--repeats", "1", "--warmup", "0"])
    monkeypatch.setenv("OUT", str(tmp_path))
    runpy.run_path(str(SCRIPT), run_name="__main__")
    results = json.loads((tmp_path / "gpu_results.json").read_text())
    rows = results["eager"]
    assert [(r["precision"], r["batch"]) for r in rows] == [("fp32", 2), ("fp32", 1), ("bf16", 2), ("bf16", 1)]
    assert all(r["pairs"] == 1 and r["paired_speedup"] > 0 for r in rows)
    (profiled,) = results["profile"][:1]
    # the sparse model runs more, smaller operations than the dense one: the selectors' cost that batch 1 exposes
    assert profiled["sparse"]["launches"] > profiled["dense"]["launches"] > 0
    assert (tmp_path / "profile_deit_tiny_patch16_224_sparse_b2.txt").read_text().strip()
