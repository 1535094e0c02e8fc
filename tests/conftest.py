"""Shared test settings: deterministic seeds, and a small thread count so parallel workers don't thrash."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class _CodeRunningPayload:
    """Unpickling this touches a marker file: proof that a loader executed pickled code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


@pytest.fixture
def code_payload(tmp_path):
    """(object whose unpickling would run code, marker file that exists afterwards iff it ran)."""
    marker = tmp_path / "pickled-code-ran"
    return _CodeRunningPayload(marker), marker
