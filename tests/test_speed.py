"""Timing helpers return sane structures; no timed assertions (timings belong in benchmark scripts)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tokenprune.errors import TokenPruneError
from tokenprune.measure.speed import compare, describe_device, measure_latency, measure_throughput, time_interleaved

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
    result = measure_latency(tiny(), INPUT, warmup=0, repeats=2)
    assert result["batch_size"] == 1 and result["latency_ms"] > 0 and len(result["runs_ms"]) == 2


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
    assert result["speedup"] == pytest.approx(result["sparse"]["images_per_s"] / result["dense"]["images_per_s"])
    assert result["paired_speedup"] > 0
    assert result["latency_speedup"] is None and result["dense"]["batch1_latency_ms"] is None

    result = compare(tiny(), tiny(), INPUT, 2, warmup=0, repeats=1)
    assert result["dense"]["batch1_latency_ms"] > 0 and result["latency_speedup"] > 0


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


def test_compile_modes() -> None:
    with pytest.raises(TokenPruneError, match="modes"):
        measure_throughput(tiny(), INPUT, 2, warmup=0, repeats=1, compile="fastest")
    result = measure_throughput(tiny(), INPUT, 2, warmup=1, repeats=1, compile="max-autotune-no-cudagraphs")
    assert result["compile"] == "max-autotune-no-cudagraphs" and result["images_per_s"] > 0


def test_time_interleaved_compiles_per_model() -> None:
    model = tiny()
    times = time_interleaved([model, model], INPUT, 2, warmup=1, repeats=2, compile=[False, True])
    assert [len(t) for t in times] == [2, 2] and all(s > 0 for t in times for s in t)
    with pytest.raises(TokenPruneError, match="one per model"):
        time_interleaved([model, model], INPUT, 2, repeats=1, compile=[True])
