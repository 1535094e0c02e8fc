"""Measurement: honest FLOPs (multiply-adds, fvcore + attention handles), throughput, latency and reports."""

from .flops import FlopReport, count_params, profile, profile_flops, sparsify_config
from .report import SCHEMA_VERSION, build_report, render_table, stage_tokens, to_markdown
from .speed import compare, describe_device, measure_latency, measure_throughput

__all__ = [
    "FlopReport",
    "profile",
    "profile_flops",
    "count_params",
    "sparsify_config",
    "measure_throughput",
    "measure_latency",
    "compare",
    "describe_device",
    "SCHEMA_VERSION",
    "build_report",
    "render_table",
    "to_markdown",
    "stage_tokens",
]
