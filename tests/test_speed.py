"""Timing helpers return sane structures and the times of what they run, checked against timing done here, on models
whose forward sleeps a known time (machine load hardly changes a sleep; no assertion on the speed of real models)."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from tokenprune.errors import TokenPruneError
from tokenprune.measure import speed
from tokenprune.measure.speed import (
    compare,
    contention_warnings,
    describe_device,
    measure_latency,
    measure_throughput,
    time_interleaved,
)

INPUT = (3, 8, 8)


def tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def test_throughput_structure_and_restores_mode() -> None:
    model = tiny().train()
    result = measure_throughput(model, INPUT, 4, warmup=1, repeats=3)
    assert result["images_per_s"] > 0 and result["latency_ms"] > 0
    assert len(result["runs_ms"]) == 3 and all(t > 0 for t in result["runs_ms"])
    assert result["batch_size"] == 4 and result["threads"] == torch.get_num_threads()
    assert result["device"] == "cpu" and result["compile"] is False
    assert model.training  # measured in eval mode, mode given back


def test_latency_is_batch_one() -> None:
    model = Sleeper(3.0)
    result = measure_latency(model, INPUT, warmup=0, repeats=3)
    assert result["batch_size"] == 1 and [b for b, _ in model.calls] == [1, 1, 1]
    assert result["runs_ms"] == pytest.approx([t * 1e3 for _, t in model.calls], rel=0.25)


def test_compare_interleaves_and_reports_speedup() -> None:
    calls: list[str] = []

    class Tagged(nn.Module):
        def __init__(self, tag: str) -> None:
            super().__init__()
            self.tag, self.inner = tag, tiny()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(self.tag)
            return self.inner(x)

    result = compare(Tagged("d"), Tagged("s"), INPUT, 2, warmup=1, repeats=2, latency=False)
    assert calls == ["d", "s"] * 3  # warm-up and timed runs alternate dense, sparse
    assert result["latency_speedup"] is None and result["dense"]["batch1_latency_ms"] is None


class Sleeper(nn.Module):
    """Sleeps `ms_per_image` per image of the batch, and writes down how long each call took, timed from inside."""

    def __init__(self, ms_per_image: float) -> None:
        super().__init__()
        self.seconds_per_image, self.calls = ms_per_image / 1e3, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        time.sleep(self.seconds_per_image * x.shape[0])
        self.calls.append((x.shape[0], time.perf_counter() - start))
        return x.flatten(1)[:, :5]


def _median_seconds(model: Sleeper, batch: int, timed: int) -> float:
    """Median duration of the last `timed` calls at `batch` images, as the model itself saw them."""
    return statistics.median([t for b, t in model.calls if b == batch][-timed:])


def test_compare_reports_the_times_timed_inside_the_models() -> None:
    dense, sparse = Sleeper(4.0), Sleeper(1.0)  # 16 ms and 4 ms per batch of 4: a 4x speed-up by construction
    result = compare(dense, sparse, INPUT, 4, warmup=1, repeats=5)
    d4, s4 = _median_seconds(dense, 4, 5), _median_seconds(sparse, 4, 5)
    d1, s1 = _median_seconds(dense, 1, 5), _median_seconds(sparse, 1, 5)
    # the helpers' clock also runs around the call (a few microseconds; more under load): generous tolerances
    assert result["dense"]["images_per_s"] == pytest.approx(4 / d4, rel=0.25)
    assert result["sparse"]["latency_ms"] == pytest.approx(s4 * 1e3, rel=0.25)
    assert result["speedup"] == pytest.approx(d4 / s4, rel=0.3)
    assert result["paired_speedup"] == pytest.approx(d4 / s4, rel=0.3)
    assert result["dense"]["batch1_latency_ms"] == pytest.approx(d1 * 1e3, rel=0.25)
    assert result["latency_speedup"] == pytest.approx(d1 / s1, rel=0.3)
    assert 2.0 < result["speedup"] < 4.5  # and near the 4x the sleeps give


def test_bad_counts_raise() -> None:
    with pytest.raises(TokenPruneError):
        measure_throughput(tiny(), INPUT, 0, repeats=1)
    with pytest.raises(TokenPruneError):
        measure_throughput(tiny(), INPUT, 1, repeats=0)


def test_describe_device() -> None:
    assert describe_device("cpu").startswith("cpu")


def test_input_follows_the_model_dtype() -> None:
    seen: list[torch.dtype] = []
    model = tiny().to(torch.bfloat16)
    model.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
    measure_throughput(model, INPUT, 2, warmup=0, repeats=1)
    assert seen == [torch.bfloat16]
    with pytest.raises(TokenPruneError, match="different dtypes"):
        compare(tiny(), tiny().to(torch.bfloat16), INPUT, 2, warmup=0, repeats=1, latency=False)


@pytest.fixture
def compiled(monkeypatch) -> list[tuple[nn.Module, str]]:
    """(model, mode) of each `torch.compile` call the timing helpers make; the model runs eagerly (a real compile is
    `test_a_real_compile_runs`)."""
    calls: list[tuple[nn.Module, str]] = []

    def fake_compile(model, mode=None, **kwargs):
        calls.append((model, mode))
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    return calls


def test_compile_modes(compiled) -> None:
    with pytest.raises(TokenPruneError, match="modes"):
        measure_throughput(tiny(), INPUT, 2, warmup=0, repeats=1, compile="fastest")
    model = tiny()
    result = measure_throughput(model, INPUT, 2, warmup=1, repeats=1, compile="max-autotune-no-cudagraphs")
    assert result["compile"] == "max-autotune-no-cudagraphs" and result["images_per_s"] > 0
    measure_throughput(model, INPUT, 2, warmup=0, repeats=1, compile=True)
    assert compiled == [(model, "max-autotune-no-cudagraphs"), (model, "default")]


def test_time_interleaved_compiles_per_model(compiled) -> None:
    eager, other = tiny(), tiny()
    times = time_interleaved([eager, other], INPUT, 2, warmup=1, repeats=2, compile=[False, True])
    assert [len(t) for t in times] == [2, 2] and all(s > 0 for t in times for s in t)
    assert compiled == [(other, "default")]
    with pytest.raises(TokenPruneError, match="one per model"):
        time_interleaved([eager, eager], INPUT, 2, repeats=1, compile=[True])


@pytest.mark.slow
def test_a_real_compile_runs() -> None:
    model = tiny()
    times = time_interleaved([model, model], INPUT, 2, warmup=1, repeats=2, compile=[False, True])
    assert [len(t) for t in times] == [2, 2] and all(s > 0 for t in times for s in t)


def test_contention_warning_counts_cores_threads_and_device(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert contention_warnings(None) == []  # not measured: nothing to say
        assert contention_warnings(0.4) == []  # 2.4 cores asked of 2: within the half core left to the system
        (warning,) = contention_warnings(1.0)
        assert "1.0 of the 2 CPU cores" in warning and "2 thread(s)" in warning and "--threads" in warning
        assert contention_warnings(1.0, "cuda") == []  # a GPU timing's host side is one thread
        torch.set_num_threads(1)
        assert contention_warnings(1.0) == []  # one thread beside one busy core: each has a core
    finally:
        torch.set_num_threads(threads)


def test_other_processes_load_is_the_cpus_busy_time_less_this_process(monkeypatch) -> None:
    """The arithmetic on two samples: 2 s of busy CPU time over 1 s of wall time, 1 s of it this process's own."""
    samples = iter([(10.0, 1.0, 100.0), (12.0, 2.0, 101.0), (20.0, 3.0, 200.0), (20.1, 3.0, 200.1)])
    monkeypatch.setattr(speed, "_cpu_sample", lambda: next(samples))
    loads: list[float] = []
    with speed._watch_others(loads):
        pass
    assert loads == [pytest.approx(1.0)]
    with speed._watch_others(loads):
        pass  # 0.1 s: shorter than MIN_WATCH_S, /proc/stat's ticks are too coarse to judge it
    assert loads == [pytest.approx(1.0)]


@pytest.mark.skipif(speed._cpu_sample() is None, reason="reads Linux's /proc/stat")
def test_a_busy_process_beside_a_timing_is_seen() -> None:
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start spinning
        loads: list[float] = []
        with speed._watch_others(loads):
            time.sleep(speed.MIN_WATCH_S + 0.3)  # this process idles, the child spins
        assert len(loads) == 1 and loads[0] > 0.5
    finally:
        child.kill()
        child.wait()


def test_compare_reports_other_load_and_warnings() -> None:
    result = compare(tiny(), tiny(), INPUT, 2, warmup=0, repeats=1, latency=False)
    assert result["other_load"] is None  # a few milliseconds: not judged
    assert result["warnings"] == []


def test_compare_warns_when_others_took_the_cores_its_threads_needed(monkeypatch) -> None:
    """compare's own samples (faked: other processes busy on 1 core over a 1 s timing) reach its result."""
    samples = iter([(0.0, 0.0, 0.0), (2.0, 1.0, 1.0)])  # 2 busy CPU-seconds, 1 of them this process's own
    monkeypatch.setattr(speed, "_cpu_sample", lambda: next(samples))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        result = compare(tiny(), tiny(), INPUT, 2, warmup=0, repeats=1, latency=False)
    finally:
        torch.set_num_threads(threads)
    assert result["other_load"] == pytest.approx(1.0)
    assert len(result["warnings"]) == 1 and "1.0 of the 2 CPU cores" in result["warnings"][0]
