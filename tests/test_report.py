"""The `tokenprune report` data: schema, consistency of the figures, table and Markdown rendering."""

from __future__ import annotations

import json
import statistics
import time

import pytest
import timm
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import tokenprune
from tokenprune.measure.flops import sparsify_config
from tokenprune.measure.report import SCHEMA_VERSION, build_report, render_table, to_markdown

INPUT = [3, 32, 32]
TOP_KEYS = {
    "schema_version", "model", "input_size", "ratio", "dense", "sparse", "flops_reduction", "speedup", "stages",
    "predictor_gmacs", "uncounted_ops", "versions", "device", "threads", "batch_size", "outputs", "split", "scorer",
    "other_load", "warnings",
}  # fmt: skip
SIDE_KEYS = {"gmacs", "params_m", "throughput", "latency_ms"}
STAGE_KEYS = {"location", "keep_ratio", "tokens", "gmacs"}


def tiny_vit() -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=4, embed_dim=48, num_heads=3
    ).eval()


def check_schema(report: dict) -> None:
    assert set(report) == TOP_KEYS
    assert report["schema_version"] == SCHEMA_VERSION == 1
    assert report["input_size"] == INPUT
    for side in ("dense", "sparse"):
        assert set(report[side]) == SIDE_KEYS
        assert report[side]["gmacs"] > 0 and report[side]["params_m"] > 0
    assert set(report["versions"]) == {"torch", "timm", "torchvision", "tokenprune", "python"}
    assert isinstance(report["uncounted_ops"], list) and report["uncounted_ops"] == []
    assert all(set(stage) == STAGE_KEYS for stage in report["stages"])
    assert isinstance(report["warnings"], list) and all(isinstance(w, str) for w in report["warnings"])
    assert report["flops_reduction"] == pytest.approx(1 - report["sparse"]["gmacs"] / report["dense"]["gmacs"])
    json.dumps(report)  # JSON-serialisable as is


def check_renderings(report: dict) -> None:
    table = render_table(report)
    assert isinstance(table, Table) and table.row_count == len(report["stages"]) + 2
    console = Console(record=True, width=160)
    console.print(table)
    assert "GFLOPs" in console.export_text()
    markdown = to_markdown(report)
    assert markdown.count("\n| ") == len(report["stages"]) + 3  # header + dense + stages + sparse
    assert "multiply-adds" in markdown and report["model"] in markdown


def test_dense_vs_dense_flops_only() -> None:
    dense = tiny_vit()
    report = build_report("tiny", dense, dense, INPUT, batch_size=2, flops_only=True, ratio=0.7)
    check_schema(report)
    assert report["ratio"] == 0.7 and report["flops_reduction"] == pytest.approx(0.0)
    assert report["stages"] == [] and report["predictor_gmacs"] == 0.0
    assert report["speedup"] is None
    assert report["dense"]["throughput"] is None and report["sparse"]["latency_ms"] is None
    assert report["batch_size"] == 2
    assert report["other_load"] is None and report["warnings"] == []  # nothing timed, nothing to doubt
    check_renderings(report)


def test_a_warning_reaches_the_table_the_markdown_and_a_failed_speed_gate() -> None:
    from tokenprune.cli.gates import Gates, check_gates

    dense = tiny_vit()
    report = build_report("tiny", dense, dense, INPUT, batch_size=2, flops_only=True, ratio=0.7)
    report.update(speedup=0.8, warnings=["other processes kept 1.0 of the 2 CPU cores busy"])
    console = Console(record=True, width=400)
    console.print(render_table(report))
    caption = " ".join(console.export_text().split())  # rich wraps the caption to the table's width
    assert "WARNING: other processes kept 1.0 of the 2 CPU cores busy" in caption
    assert "WARNING: other processes kept 1.0" in to_markdown(report)
    (failure,) = check_gates(report, Gates(min_speedup=1.1))
    assert failure.startswith("speed-up 0.800x < required 1.100x") and "; WARNING: other processes kept 1.0" in failure
    assert check_gates(report, Gates(min_speedup=0.5)) == []


def _timed(model: nn.Module, pause: float) -> list[tuple[int, float]]:
    """Make every forward of `model` take `pause` seconds longer (a sleep), and time each forward from inside it:
    (batch, seconds) per call, the clock started by a pre-hook and stopped after the pause."""
    calls: list[tuple[int, float]] = []
    start = [0.0]
    model.register_forward_pre_hook(lambda *_: start.__setitem__(0, time.perf_counter()))

    def stop(_module, args, _output) -> None:
        time.sleep(pause)
        calls.append((args[0].shape[0], time.perf_counter() - start[0]))

    model.register_forward_hook(stop)
    return calls


def test_timed_report_agrees_with_the_pair_timed_here() -> None:
    dense = tiny_vit()
    sparse = tokenprune.sparsify(dense, ratio=0.7).eval()
    # dense pauses 40 ms, sparse 10 ms: the pair's speed-up is well above 1 whatever the tiny models' own speed
    dense_calls, sparse_calls = _timed(dense, 0.04), _timed(sparse, 0.01)
    report = build_report("tiny", dense, sparse, INPUT, batch_size=2, warmup=1, repeats=5)
    check_schema(report)
    # the last 5 forwards at batch 2 are the timed throughput runs; their durations as the models saw them
    dense_s, sparse_s = (
        statistics.median([t for b, t in calls if b == 2][-5:]) for calls in (dense_calls, sparse_calls)
    )
    # the report's clock also runs around the call (microseconds; more under load): generous tolerances
    assert report["speedup"] == pytest.approx(dense_s / sparse_s, rel=0.2)
    assert report["dense"]["throughput"] == pytest.approx(2 / dense_s, rel=0.2)
    assert report["sparse"]["throughput"] == pytest.approx(2 / sparse_s, rel=0.2)
    assert report["sparse"]["latency_ms"] > 10 and report["dense"]["latency_ms"] > 40  # batch 1 pays the pauses too
    assert report["speedup"] > 1.2
    assert report["threads"] == torch.get_num_threads()
    check_renderings(report)


def test_sparse_report() -> None:
    dense = tiny_vit()
    sparse = tokenprune.sparsify(dense, ratio=0.7)
    report = build_report("tiny", dense, sparse, INPUT, batch_size=2, warmup=0, repeats=1)
    check_schema(report)
    config = sparsify_config(sparse)
    assert report["ratio"] == pytest.approx(0.7)
    assert [s["location"] for s in report["stages"]] == list(config.locations)
    assert [s["keep_ratio"] for s in report["stages"]] == pytest.approx(list(config.keep_ratios))
    # 8x8 = 64 patches + class token; k = floor(keep * 64) per stage
    patches = (INPUT[1] // 4) * (INPUT[2] // 4)
    expected = [config.prefix_tokens + int(k * patches + 1e-6) for k in config.keep_ratios]
    assert [s["tokens"] for s in report["stages"]] == expected
    assert report["predictor_gmacs"] == pytest.approx(sum(s["gmacs"] for s in report["stages"]))
    assert 0 < report["predictor_gmacs"] < report["sparse"]["gmacs"]
    assert report["flops_reduction"] > 0
    check_renderings(report)
