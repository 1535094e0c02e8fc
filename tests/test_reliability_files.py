"""File readers allocate no more than a file holds (#21 item 4): compressed zip entries and structures shared many
times over are refused quickly, with a `CheckpointError` naming the file."""

from __future__ import annotations

import io
import time
import zipfile

import pytest
import torch

from tokenprune.errors import CheckpointError
from tokenprune.io import read_weights
from tokenprune.train.checkpoint import load_checkpoint, save_checkpoint


def _deflated(path, payload) -> None:
    """`payload` saved by torch, then re-zipped with every entry deflated (small on disk, large when read)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))


@pytest.mark.parametrize("reader", [read_weights, load_checkpoint], ids=["read_weights", "load_checkpoint"])
def test_compressed_entries_that_expand_are_refused_before_reading(tmp_path, reader):
    path = tmp_path / "bomb.pth"
    _deflated(path, {"format": "tokenprune-train/2", "weight": torch.zeros(1 << 22)})  # 16 MiB of zeros
    assert path.stat().st_size < 1 << 20
    with pytest.raises(CheckpointError, match=rf"refused to read {path}: its zip entries declare \d+ bytes"):
        reader(path)


def test_a_plain_torch_file_still_reads(tmp_path):
    torch.save({"weight": torch.ones(3)}, tmp_path / "ok.pth")
    assert torch.equal(read_weights(tmp_path / "ok.pth")["weight"], torch.ones(3))


@pytest.mark.parametrize("reader", [read_weights, load_checkpoint], ids=["read_weights", "load_checkpoint"])
def test_structures_shared_many_times_over_are_refused_quickly(tmp_path, reader):
    shared = ["x"]
    for _ in range(40):  # 2**40 paths through a few hundred bytes
        shared = [shared, shared]
    save_checkpoint({"model": {"w": torch.ones(1)}, "recipe": {"model": {"kwargs": {"a": shared}}}}, tmp_path / "s.pt")
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"refused \S+s\.pt: it holds more than \d+ nested items"):
        reader(tmp_path / "s.pt")
    assert time.perf_counter() - start < 10
