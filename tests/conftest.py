"""Shared test settings: deterministic seeds, one torch thread per parallel worker, and a cheaper garbage collector."""

import gc
import os

import pytest
import torch

# Under pytest-xdist each worker is one process of `-n N`: with torch's default of one intra-op thread per core, N
# workers would run N x cores threads on the cores and thrash (on a busy 2-core machine two OpenMP threads per process
# made a sparsify 5-10x slower than one). One thread per worker; the workers give the parallelism.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


_module: list[object] = [None]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """At the first test of each module, exempt what is alive from every later garbage collection (`gc.freeze`).

    By then the previous module's fixtures and model caches are released, so what is left lives for the whole
    session: imported modules (torch, timm, and what the tests import lazily: torch._dynamo, torch._inductor, the
    ONNX exporter; ~400k objects before the first test, ~600k by the end). Every full collection scanned all of
    them, and the model-building tests trigger hundreds: about half of the suite's time went to the garbage
    collector. The tests' own objects are collected as before.
    """
    if item.module is not _module[0]:
        _module[0] = item.module
        gc.collect()
        gc.freeze()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _threads():
    """Give back torch's thread count: `finetune` sets it from `run.threads` for the rest of the process."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


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
