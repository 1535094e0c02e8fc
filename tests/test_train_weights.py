"""`model.checkpoint` weights are read without executing pickled code."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from tokenprune import CheckpointError
from tokenprune.train import load_weights


def test_state_dict_round_trip(tmp_path):
    model, path = nn.Linear(3, 2), tmp_path / "w.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    other = load_weights(nn.Linear(3, 2), path)
    assert torch.equal(other.weight, model.weight)


def test_pickle_that_would_run_code_is_refused(tmp_path, code_payload):
    payload, marker = code_payload
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": payload}, f)
    with pytest.raises(CheckpointError, match="could run code"):
        load_weights(nn.Linear(3, 2), path)
    assert not marker.exists()
