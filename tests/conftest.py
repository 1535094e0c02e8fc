"""Shared test settings: deterministic seeds, one torch thread per parallel worker, a cheaper garbage collector, and
the one place that decides whether tests of the installed Fashion-MNIST files run (the rest make their own data)."""

import gc
import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenprune.train import data as _data

# Under pytest-xdist each worker is one process of `-n N`: with torch's default of one intra-op thread per core, N
# workers would run N x cores threads on the cores and thrash (on a busy 2-core machine two OpenMP threads per process
# made a sparsify 5-10x slower than one). One thread per worker; the workers give the parallelism.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


_FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def pytest_collection_modifyitems(config, items):
    """Markers that follow from others: tests that start several processes are `slow`; tests marked `fashion_mnist`
    (they read the installed dataset) are skipped, with the reason, when its files are absent.

    `.ci/run` installs the Debian package `dataset-fashion-mnist`; a fresh machine without it still passes the suite.
    The root is read from `tokenprune.train.data` at collection, so a run can point it elsewhere.
    """
    root = Path(_data.FASHION_MNIST_ROOT)
    missing = [name for name in _FASHION_MNIST_FILES if not (root / name).is_file()]
    skip = None
    if missing:
        reason = f"Fashion-MNIST is not installed ({root / missing[0]} is missing; install dataset-fashion-mnist)"
        skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("distributed"):
            item.add_marker(pytest.mark.slow)
        if skip and item.get_closest_marker("fashion_mnist"):
            item.add_marker(skip)


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def fashion_mnist_like(tmp_path_factory) -> Path:
    """A folder of Fashion-MNIST-format IDX files (40 train, 20 test items) for tests not about the real data.

    Each item is an ink rectangle on a black background whose size and place depend on its class, so scenes built
    from them have background, ink and several labels, as with the real items.
    """
    root = tmp_path_factory.mktemp("fashion-mnist-like")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        labels = np.arange(n) % 10
        images = np.zeros((n, 28, 28), np.uint8)
        for i, label in enumerate(labels):
            top, left = 2 + label % 5, 2 + label // 2
            images[i, top : top + 12 + label, left : left + 8 + label] = rng.integers(120, 256)
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images, 0x803)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels, 0x801)
    return root


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


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_setup(fixturedef, request):
    """Seed before every module- or session-wide fixture too: they are set up before `_seed` runs, after whichever
    tests the worker ran before (under pytest-xdist that order differs from run to run), so a random model they build
    would otherwise differ between runs."""
    if fixturedef.scope != "function":
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
