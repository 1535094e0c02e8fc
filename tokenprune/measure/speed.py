"""Throughput and latency of eval forward passes, and a side-by-side dense/sparse comparison.

Timings are wall-clock medians of several runs, in eval mode under `torch.inference_mode`, with CUDA synchronised
around each run. The input has the dtype of the model's parameters (convert a copy with ``.to(torch.bfloat16)`` to
time bf16 inference). Machine noise (other processes, frequency scaling) shifts absolute figures, so `compare` times the
two models in the same process with interleaved runs, which is what a speed-up should be computed from.

Other processes can make the figures meaningless rather than merely noisy: with as many threads as cores and one core
taken by another job, every parallel region waits for the thread that lost its core (measured: XCiT-nano 26x slower at
2 threads than at 1 on a 2-core machine with one training job beside it, and its sparse/dense ratio 0.81x instead of
1.19x). `compare` therefore watches, on Linux, how many cores other processes keep busy while it times, and says so in
its ``warnings`` when they and its threads need more cores than there are.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import TokenPruneError

__all__ = [
    "measure_throughput", "measure_latency", "compare", "describe_device", "time_interleaved", "COMPILE_MODES",
    "contention_warnings",
]  # fmt: skip

#: Shortest timing (wall seconds) whose share of other processes' CPU time is judged: /proc/stat counts in ticks of
#: 10 ms per core, too coarse for a shorter window.
MIN_WATCH_S = 0.5


def describe_device(device: str | torch.device) -> str:
    """A readable name of `device`: the GPU's name on CUDA, the CPU model (when the OS tells it) otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"cpu ({line.split(':', 1)[1].strip()})"
    except OSError:
        pass
    return str(device)


@contextlib.contextmanager
def _prepared(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode on `device` for the measurement; training flags and the original device restored afterwards."""
    training = {m: m.training for m in model.modules()}
    first = next(iter(model.parameters()), None)
    original = first.device if first is not None else device
    model.eval().to(device)
    try:
        yield
    finally:
        model.to(original)
        for module, mode in training.items():
            module.training = mode


#: `torch.compile` modes a measurement accepts (``compile=True`` is "default").
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _compile_mode(compile: bool | str) -> str | None:
    """The `torch.compile` mode that `compile` asks for, or None for eager execution."""
    if compile is False or compile is None:
        return None
    mode = "default" if compile is True else compile
    if mode not in COMPILE_MODES:
        raise TokenPruneError(f"compile={compile!r}: use True, False or one of the modes {COMPILE_MODES}.")
    return mode


def _runner(model: nn.Module, compile: bool | str) -> Callable[[torch.Tensor], Any]:
    mode = _compile_mode(compile)
    if mode is None:
        return model
    try:
        return torch.compile(model, mode=mode)
    except Exception as e:  # compile backends fail in many ways (no compiler, unsupported op)
        raise TokenPruneError(
            f"torch.compile failed for {type(model).__name__}: {e}; measure with compile=False."
        ) from e


def _input_dtype(models: Sequence[nn.Module]) -> torch.dtype:
    """The floating dtype of the models' parameters (float32 when they have none); models must agree."""
    dtypes = set()
    for model in models:
        first = next((p for p in model.parameters() if p.is_floating_point()), None)
        dtypes.add(first.dtype if first is not None else torch.float32)
    if len(dtypes) > 1:
        raise TokenPruneError(
            f"the models to compare have parameters of different dtypes {sorted(map(str, dtypes))}; convert both "
            "to one dtype (e.g. .to(torch.bfloat16)) before measuring."
        )
    return dtypes.pop()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, device: torch.device) -> float:
    _sync(device)  # do not charge this run with work queued before it
    start = time.perf_counter()
    fn(x)
    _sync(device)
    return time.perf_counter() - start


def _check_counts(batch_size: int, warmup: int, repeats: int) -> None:
    if batch_size < 1 or warmup < 0 or repeats < 1:
        raise TokenPruneError(
            f"batch_size={batch_size}, warmup={warmup}, repeats={repeats}: need batch_size >= 1, warmup >= 0 and "
            "repeats >= 1."
        )


def time_interleaved(
    models: Sequence[nn.Module],
    input_size: Sequence[int],
    batch_size: int,
    *,
    warmup: int = 3,
    repeats: int = 10,
    device: str | torch.device = "cpu",
    compile: bool | str | Sequence[bool | str] = False,
) -> list[list[float]]:
    """Seconds per run of each model, runs interleaved model by model so machine noise hits all of them alike.

    Args:
        models: the models, timed in this order in every round (the same module may appear twice, e.g. once eager
            and once compiled).
        input_size, batch_size, warmup, repeats, device: as in `measure_throughput`.
        compile: one setting for all models (as in `measure_throughput`) or one per model.

    Returns:
        One list of `repeats` timings (seconds) per model; entry j of each list comes from the same round.
    """
    _check_counts(batch_size, warmup, repeats)
    modes = list(compile) if isinstance(compile, (list, tuple)) else [compile] * len(models)
    if len(modes) != len(models):
        raise TokenPruneError(f"compile has {len(modes)} settings for {len(models)} models; give one per model.")
    device = torch.device(device)
    x = torch.randn(batch_size, *input_size, device=device, dtype=_input_dtype(models))
    times: list[list[float]] = [[] for _ in models]
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(_prepared(model, device))
        runners = [_runner(m, mode) for m, mode in zip(models, modes)]
        with torch.inference_mode():
            for _ in range(warmup):
                for fn in runners:
                    _time_once(fn, x, device)
            for _ in range(repeats):
                for i, fn in enumerate(runners):
                    times[i].append(_time_once(fn, x, device))
    return times


def _cpu_sample() -> tuple[float, float, float] | None:
    """(busy seconds of the CPUs this process may run on, this process's CPU seconds, wall seconds) now, from Linux's
    /proc/stat (user, nice, system, irq, softirq and steal time: a hypervisor's steal is contention too); None where
    it cannot be read."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
        cpus = os.sched_getaffinity(0)
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, AttributeError, ValueError):
        return None
    busy = 0
    for line in lines:
        name, *fields = line.split() or [""]
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            user, nice, system, _idle, _iowait, irq, softirq, steal = ([int(v) for v in fields] + [0] * 8)[:8]
            busy += user + nice + system + irq + softirq + steal
    return busy / tick, time.process_time(), time.perf_counter()


@contextlib.contextmanager
def _watch_others(loads: list[float]) -> Iterator[None]:
    """Append to `loads` the cores that other processes kept busy during the block: the busy time of this process's
    CPUs less its own CPU time, over the wall time (nothing for a block shorter than `MIN_WATCH_S`, or off Linux)."""
    start = _cpu_sample()
    yield
    end = _cpu_sample()
    if start is not None and end is not None and end[2] - start[2] >= MIN_WATCH_S:
        others = (end[0] - start[0]) - (end[1] - start[1])
        loads.append(max(0.0, others / (end[2] - start[2])))


def contention_warnings(other_load: float | None, device: str | torch.device = "cpu") -> list[str]:
    """The warning for timings during which other processes (`other_load` cores busy) and this one's threads needed
    more cores than this process may use, with half a core to spare for the system; [] otherwise or when unknown."""
    if other_load is None:
        return []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = torch.get_num_threads() if torch.device(device).type == "cpu" else 1
    if other_load + threads <= cores + 0.5:
        return []
    return [
        f"other processes kept {other_load:.1f} of the {cores} CPU cores busy while {threads} thread(s) timed the "
        "models: threads waited for cores, so the timings and the speed-up are not the models' own. Time on an idle "
        "machine or with fewer threads than free cores: --threads N on the command line, torch.set_num_threads."
    ]


def _summary(seconds: list[float], batch_size: int, device: str | torch.device, compile: bool | str) -> dict[str, Any]:
    median = statistics.median(seconds)
    return {
        "images_per_s": batch_size / median,
        "latency_ms": median * 1e3,
        "runs_ms": [s * 1e3 for s in seconds],
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "device": str(torch.device(device)),
        "compile": compile,
    }


def measure_throughput(
    model: nn.Module,
    input_size: Sequence[int],
    batch_size: int = 32,
    *,
    warmup: int = 3,
    repeats: int = 10,
    device: str | torch.device = "cpu",
    compile: bool | str = False,
) -> dict[str, Any]:
    """Images per second of `model`'s eval forward at `batch_size`.

    Args:
        model: the model; put in eval mode and on `device` for the measurement, restored afterwards.
        input_size: (C, H, W) of one image.
        batch_size: images per forward pass.
        warmup: untimed passes first (allocator, caches, cuDNN autotuning, compilation).
        repeats: timed passes; the result is their median.
        device: where to run ("cpu", "cuda", "cuda:1").
        compile: run through `torch.compile`: True (mode "default") or a mode name from `COMPILE_MODES`
            ("reduce-overhead" replays CUDA graphs: what batch-1 latency on a GPU needs).

    Returns:
        ``{"images_per_s", "latency_ms" (median per batch), "runs_ms", "batch_size", "threads", "device",
        "compile"}``.
    """
    (times,) = time_interleaved(
        [model], input_size, batch_size, warmup=warmup, repeats=repeats, device=device, compile=compile
    )
    return _summary(times, batch_size, device, compile)


def measure_latency(
    model: nn.Module,
    input_size: Sequence[int],
    *,
    warmup: int = 3,
    repeats: int = 20,
    device: str | torch.device = "cpu",
    compile: bool | str = False,
) -> dict[str, Any]:
    """Median milliseconds of one eval forward at batch 1. Same arguments and result keys as `measure_throughput`."""
    return measure_throughput(model, input_size, 1, warmup=warmup, repeats=repeats, device=device, compile=compile)


def compare(
    dense: nn.Module,
    sparse: nn.Module,
    input_size: Sequence[int],
    batch_size: int = 32,
    *,
    warmup: int = 3,
    repeats: int = 10,
    device: str | torch.device = "cpu",
    compile: bool | str = False,
    latency: bool = True,
) -> dict[str, Any]:
    """Measure `dense` and `sparse` side by side, runs interleaved (dense, sparse, dense, sparse, ...).

    Args:
        dense: the original model.
        sparse: its sparsified version.
        input_size: (C, H, W) of one image.
        batch_size: images per forward pass for the throughput figures.
        warmup: untimed passes of each model before timing.
        repeats: timed passes of each model; medians are reported.
        device: where to run.
        compile: run both through `torch.compile` (True or a mode name, as in `measure_throughput`).
        latency: also measure batch-1 latency (interleaved as well).

    Returns:
        ``{"dense": {...}, "sparse": {...}, "speedup": sparse/dense images per second (ratio of medians),
        "paired_speedup": median over interleaved pairs of dense time / sparse time (robust to drifts),
        "latency_speedup": dense/sparse batch-1 latency or None, "other_load": the most CPU cores other processes
        kept busy during a timing (None off Linux or for timings under `MIN_WATCH_S`), "warnings": [str]
        (`contention_warnings`: the machine was too busy for the figures to mean anything)}``; ``dense``/``sparse``
        hold the `measure_throughput` keys plus ``"batch1_latency_ms"`` (None without `latency`).
    """
    loads: list[float] = []
    with _watch_others(loads):
        dense_t, sparse_t = time_interleaved(
            [dense, sparse], input_size, batch_size, warmup=warmup, repeats=repeats, device=device, compile=compile
        )
    result = {
        "dense": _summary(dense_t, batch_size, device, compile),
        "sparse": _summary(sparse_t, batch_size, device, compile),
    }
    result["speedup"] = result["sparse"]["images_per_s"] / result["dense"]["images_per_s"]
    # each dense run and the sparse run right after it share the machine's state: their ratio cancels slow drifts
    # (other processes, thermal limits) that the ratio of two medians keeps
    result["paired_speedup"] = statistics.median(d / s for d, s in zip(dense_t, sparse_t))
    result["latency_speedup"] = None
    for key in ("dense", "sparse"):
        result[key]["batch1_latency_ms"] = None
    if latency:
        with _watch_others(loads):
            dense_l, sparse_l = time_interleaved(
                [dense, sparse], input_size, 1, warmup=warmup, repeats=repeats, device=device, compile=compile
            )
        result["dense"]["batch1_latency_ms"] = statistics.median(dense_l) * 1e3
        result["sparse"]["batch1_latency_ms"] = statistics.median(sparse_l) * 1e3
        result["latency_speedup"] = result["dense"]["batch1_latency_ms"] / result["sparse"]["batch1_latency_ms"]
    result["other_load"] = max(loads) if loads else None
    result["warnings"] = contention_warnings(result["other_load"], device)
    return result
