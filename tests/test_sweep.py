"""`tokenprune sweep`: a sparse model measured at several keep ratios without retraining, and the ratio chosen.

What makes it right: each row is what `tokenprune report MODEL --ratio R` says at that ratio (GFLOPs, top-1, the
dense top-1), for a saved file and for a model name; the chosen ratio is the cheapest row passing every gate; a ratio
that would cost at least the dense model is a refused row, never chosen; no ratio passing is exit 3, and bad input
exit 2 before any model is built.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import tokenprune
from tokenprune.cli import EXIT_ERROR, EXIT_GATE, app
from tokenprune.cli.gates import Gates
from tokenprune.cli.pipeline import choose

TINY = {"depth": 4, "embed_dim": 48, "num_heads": 3, "num_classes": 4, "img_size": 64}  # 16 patches


def run(*args: object):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output + result.stderr, result.output + result.stderr
    return result


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny DeiT sparsified at 0.7 and saved, and an image folder of random images in its 4 classes."""
    root = tmp_path_factory.mktemp("sweep")
    sparse = tokenprune.sparsify(tokenprune.create_model("deit_tiny_patch16_224", **TINY), 0.7)
    rng = np.random.default_rng(0)
    for i in range(32):
        folder = root / "data" / str(i % 4)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return tokenprune.save(sparse, root / "m.safetensors")


def _sweep(tmp_path: Path, model: object, *args: object) -> tuple[object, dict]:
    out = tmp_path / "sweep.json"
    result = run("sweep", model, *args, "--json", out, "--markdown", tmp_path / "sweep.md")
    return result, json.loads(out.read_text()) if out.is_file() else {}


def _row_is_the_report(tmp_path: Path, model: Path, row: dict, by: str, data: Path) -> dict:
    """`tokenprune report MODEL --ratio R` (`--flops B` when `by` is "flops") at a sweep row's point: the row's
    figures must be the report's. Returns the report."""
    out = tmp_path / f"report-{by}{row[by]}.json"
    made = run("report", model, f"--{by}", row[by], "--flops-only", "--eval-data", data, "--json", out)
    assert made.exit_code == 0, made.stderr
    report = json.loads(out.read_text())
    assert row["keep_ratios"] == [s["keep_ratio"] for s in report["stages"]]
    assert row["gmacs"] == pytest.approx(report["sparse"]["gmacs"], rel=1e-9)
    assert row["flops_reduction"] == pytest.approx(report["flops_reduction"], rel=1e-9)
    assert row["top1"] == report["accuracy"]["sparse_top1"]
    assert row["drop"] == pytest.approx(report["accuracy"]["drop"])
    return report


@pytest.mark.slow
def test_each_row_is_the_report_at_that_ratio(saved, tmp_path):
    data = saved.parent / "data"
    result, sweep = _sweep(tmp_path, saved, "--ratios", "0.9,0.5,0.7", "--eval-data", data)
    assert result.exit_code == 0, result.output + result.stderr
    assert sweep["kind"] == "sweep" and sweep["chosen"] is None  # no gate, nothing chosen
    assert [r["ratio"] for r in sweep["rows"]] == [0.5, 0.7, 0.9]
    assert sweep["saved_keep_ratios"] == pytest.approx([0.7, 0.49, 0.343])
    assert sweep["eval"] == {"data": str(data), "images": 32}
    for row in sweep["rows"]:
        report = _row_is_the_report(tmp_path, saved, row, "ratio", data)
        assert sweep["dense"]["top1"] == report["accuracy"]["dense_top1"]
        assert sweep["dense"]["gmacs"] == pytest.approx(report["dense"]["gmacs"], rel=1e-9)
    gmacs = [r["gmacs"] for r in sweep["rows"]]
    assert gmacs == sorted(gmacs) and len(set(gmacs)) == 3
    text = (tmp_path / "sweep.md").read_text()
    assert "| 0.5 | 0.5/0.25/0.125 |" in text and "saved keeping 0.7/0.49/0.343" in text


def test_a_model_name_is_measured_as_sparsify_builds_it_at_each_ratio(tmp_path):
    kwargs = [a for k, v in TINY.items() if k != "img_size" for a in ("-k", f"{k}={v}")]
    result, sweep = _sweep(tmp_path, "deit_tiny_patch16_224", "--input-size", "64", *kwargs, "--ratios", "0.6,0.8")
    assert result.exit_code == 0, result.stderr
    assert sweep["saved_keep_ratios"] is None
    assert [r["ratio"] for r in sweep["rows"]] == [0.6, 0.8]  # built at 0.6, then moved to 0.8
    out = tmp_path / "r.json"
    assert run("report", "deit_tiny_patch16_224", "--input-size", "64", *kwargs, "--ratio", "0.8", "--flops-only",
               "--json", out).exit_code == 0  # fmt: skip
    assert sweep["rows"][1]["gmacs"] == pytest.approx(json.loads(out.read_text())["sparse"]["gmacs"], rel=1e-9)


@pytest.mark.slow
def test_the_cheapest_ratio_passing_every_gate_is_chosen(saved, tmp_path):
    data = saved.parent / "data"
    _, measured = _sweep(tmp_path, saved, "--ratios", "0.5,0.6,0.7,0.8,0.9", "--eval-data", data)
    rows = measured["rows"]
    for allowed in sorted({r["drop"] for r in rows}):  # every threshold that separates the rows, on the same figures
        for least in (None, rows[2]["flops_reduction"]):
            passing = [r for r in rows if r["drop"] <= allowed and r["flops_reduction"] >= (least or 0)]
            chosen = choose(copy.deepcopy(measured), Gates(least, None, allowed))["chosen"]
            assert chosen == (min(passing, key=lambda r: r["gmacs"])["ratio"] if passing else None)
    allowed = sorted(r["drop"] for r in rows)[2]  # the command line gives the same choice, and exit 3 for none
    result, gated = _sweep(tmp_path, saved, "--ratios", "0.5,0.6,0.7,0.8,0.9", "--eval-data", data,
                           "--max-accuracy-drop", allowed)  # fmt: skip
    assert result.exit_code == 0 and gated["chosen"] == choose(measured, Gates(None, None, allowed))["chosen"]
    assert f"Lowest-cost ratio passing every gate: {gated['chosen']:g}" in result.output
    result, gated = _sweep(tmp_path, saved, "--ratios", "0.5,0.7", "--min-flops-reduction", "0.99")
    assert result.exit_code == EXIT_GATE and gated["chosen"] is None  # the files are written first
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "0.5: FLOPs reduction" in lines[0] and "0.7: FLOPs reduction" in lines[0]


def test_a_budget_sweep_moves_the_saved_allocation_onto_each_budget(saved, tmp_path):
    """--flops rows are `tokenprune report FILE --flops B` at each budget, from the keep ratios the file was saved
    with (an allocation no rho gives, as learned keep ratios leave it), not from a schedule; the choice is a
    budget."""
    model = tokenprune.load(saved)
    tokenprune.set_keep_ratios(model, [0.9, 0.6, 0.2])
    learned = tokenprune.save(model, tmp_path / "learned.safetensors")
    data = saved.parent / "data"
    result, sweep = _sweep(tmp_path, learned, "--flops", "0.7,0.5,0.02", "--eval-data", data,
                           "--min-flops-reduction", "0")  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    assert sweep["by"] == "flops" and sweep["saved_keep_ratios"] == pytest.approx([0.9, 0.6, 0.2])
    unreachable, *rows = sweep["rows"]
    assert unreachable["flops"] == 0.02 and "out of reach" in unreachable["refused"]
    assert unreachable["refused_as"] == "out of reach"
    assert "| 0.02 | refused: out of the chain's reach |" in (tmp_path / "sweep.md").read_text()
    for row in rows:
        assert row["ratio"] is None
        _row_is_the_report(tmp_path, learned, row, "flops", data)
        expected = tokenprune.set_keep_ratios(tokenprune.load(learned), flops=row["flops"])
        assert row["keep_ratios"] == tokenprune.config_of(expected).keep_ratios
    assert sweep["chosen"] == 0.5 and "Lowest-cost budget passing every gate: 0.5" in result.output


def test_a_ratio_that_would_cost_more_is_a_refused_row(saved, tmp_path):
    result, sweep = _sweep(tmp_path, saved, "--ratios", "0.7,1.0", "--min-flops-reduction", "0")
    assert result.exit_code == 0, result.stderr
    refused = sweep["rows"][1]
    assert refused["ratio"] == 1.0 and "would not save compute" in refused["refused"] and refused["gmacs"] is None
    assert refused["refused_as"] == "costlier" and sweep["rows"][0]["refused_as"] is None
    assert sweep["chosen"] == 0.7
    assert "refused" in result.output
    assert "| 1 | refused: would cost at least the dense model |" in (tmp_path / "sweep.md").read_text()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--ratios", "0,0.5"], "in (0, 1]"),
        (["--ratios", "half"], "comma-separated numbers"),
        (["--flops", "0.5,1"], "in (0, 1)"),
        (["--flops", "0.5", "--ratios", "0.5"], "not both"),
        (["--max-accuracy-drop", "1"], "--eval-data"),
        (["--locations", "1,2"], "apply to model names"),
        (["--eval-limit", "0"], "--eval-limit"),
    ],
)
def test_bad_input_is_exit_2_with_the_reason(saved, args, words):
    result = run("sweep", saved, *args)
    assert result.exit_code == EXIT_ERROR and words in result.stderr, result.stderr


@pytest.mark.parametrize("option", ["--min-speedup", "--ratio", "--keep-ratios"])
def test_timing_and_single_ratio_options_are_not_sweep_options(saved, option):
    result = run("sweep", saved, option, "0.5")
    assert result.exit_code == 2 and "No such option" in result.stderr
