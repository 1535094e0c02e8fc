"""`model.checkpoint` weights are read without executing pickled code."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

from tokenprune import CheckpointError
from tokenprune.train import load_weights


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_state_dict_round_trip(tmp_path):
    model, path = nn.Linear(3, 2), tmp_path / "w.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    other = load_weights(nn.Linear(3, 2), path)
    assert torch.equal(other.weight, model.weight)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Evil(str(marker))}, f)
    with pytest.raises(CheckpointError, match="could run code"):
        load_weights(nn.Linear(3, 2), path)
    assert not marker.exists()
