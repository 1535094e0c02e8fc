"""Shared test settings: deterministic seeds, and a small thread count so parallel workers don't thrash."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
