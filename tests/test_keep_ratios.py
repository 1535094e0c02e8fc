"""`tokenprune.set_keep_ratios`: a sparsified model kept at other ratios than it was built (or trained) with.

The property that makes it correct: the model it returns is the model `sparsify` builds at those ratios with the
same weights (logits equal), so everything `sparsify` guarantees (masked ≡ pruned, the cost refusal) carries over;
and a refused change leaves the model as it was.
"""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from typer.testing import CliRunner

import tokenprune
from tokenprune.cli import app
from tokenprune.errors import ConfigError, UnsupportedModelError
from tokenprune.measure.budget import floor_of, logits_of
from tokenprune.measure.flops import profile_flops
from tokenprune.nn.recorder import find_recorder

# name -> (constructor, base keep ratio to move to): a token model with a class token, one without, a spatial model
MODELS = {
    "deit_tiny": (lambda: timm.create_model("deit_tiny_patch16_224", img_size=96), 0.5),
    "vit_gap": (lambda: timm.create_model("vit_small_patch16_224", img_size=96, class_token=False, global_pool="avg"),
                0.9),
    "convnext_atto": (lambda: timm.create_model("convnext_atto"), 0.5),
}  # fmt: skip


def _unit_layer_scales(model: torch.nn.Module) -> torch.nn.Module:
    """Layer scales at 1, so no small scale hides a difference (random weights); the test perturbs the predictors."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", ".ls1.gamma", ".ls2.gamma")) or "layer_scale" in name:
                p.fill_(1.0)
    return model


@pytest.mark.parametrize("name", MODELS)
def test_set_keep_ratios_is_sparsify_at_those_ratios(name):
    build, rho = MODELS[name]
    dense = _unit_layer_scales(build().eval())
    moved = tokenprune.sparsify(dense, 0.7)
    built = tokenprune.sparsify(dense, rho)
    with torch.no_grad():  # the predictors and fast paths of `moved`, trained or not, in the model built at rho
        for (k, v), (k2, v2) in zip(moved.state_dict().items(), built.state_dict().items(), strict=True):
            assert k == k2
            v2.copy_(v + 0.05 * torch.randn_like(v) if "tokenprune" in k or "fast_path" in k else v)
            v.copy_(v2)
    tokenprune.set_keep_ratios(moved, ratio=rho)
    assert tokenprune.config_of(moved).keep_ratios == tokenprune.config_of(built).keep_ratios
    assert tokenprune.config_of(moved).ratio == rho
    x = torch.randn(2, 3, 96, 96) if name != "convnext_atto" else torch.randn(2, 3, 224, 224)
    moved.eval(), built.eval()
    with torch.no_grad():
        torch.testing.assert_close(moved(x), built(x), rtol=0, atol=0)
        state = tokenprune.sparsity_state(moved)
        tokenprune.set_execution(moved, "masked")
        torch.testing.assert_close(moved(x), built(x), rtol=1e-4, atol=1e-4)  # masked ≡ pruned at the new ratios
    assert [d.shape for d in state.decisions] == [d.shape for d in tokenprune.sparsity_state(built).decisions]


def test_a_lower_ratio_keeps_a_subset_of_the_first_stages_tokens():
    """The predictors score every token whatever is kept: at a lower ratio the first stage keeps the top of the same
    ranking."""
    sparse = tokenprune.sparsify(timm.create_model("deit_tiny_patch16_224", img_size=96), 0.8).eval()
    x = torch.randn(3, 3, 96, 96)
    kept = []
    for rho in (0.8, 0.5):
        tokenprune.set_keep_ratios(sparse, ratio=rho)
        with torch.no_grad():
            sparse(x)
        kept.append(tokenprune.selectors(sparse)[0].last_index)
    assert kept[1].shape[1] == 18 and kept[0].shape[1] == 28  # floor(rho * 36)
    for wide, narrow in zip(*kept, strict=True):
        assert set(narrow.tolist()) <= set(wide.tolist())


def test_refused_ratios_leave_the_model_as_it_was():
    sparse = tokenprune.sparsify(timm.create_model("deit_tiny_patch16_224", img_size=96), 0.7)
    before = tokenprune.config_of(sparse).keep_ratios
    with pytest.raises(UnsupportedModelError, match="would not save compute"):
        tokenprune.set_keep_ratios(sparse, [1.0, 1.0, 1.0])
    for bad, match in (([0.5, 0.6, 0.4], "increase"), ([0.5], "one per location"), ([0.5, 0.3, 0.0], "keep_ratios")):
        with pytest.raises(ConfigError, match=match):
            tokenprune.set_keep_ratios(sparse, bad)
    with pytest.raises(ConfigError, match="one of them"):
        tokenprune.set_keep_ratios(sparse, [0.5, 0.3, 0.2], ratio=0.5)
    with pytest.raises(ConfigError, match="one of them"):
        tokenprune.set_keep_ratios(sparse)
    with pytest.raises(ConfigError, match="not a sparsified model"):
        tokenprune.set_keep_ratios(timm.create_model("deit_tiny_patch16_224", img_size=96), ratio=0.5)
    assert tokenprune.config_of(sparse).keep_ratios == before
    assert [s.keep_ratio for s in tokenprune.selectors(sparse)] == before


@pytest.mark.parametrize("name", MODELS)
def test_a_flops_budget_is_met_keeping_the_allocation(name):
    """`flops=` moves the current keep ratios, all stages by one shift of their logits (a learned-looking allocation
    here, which no schedule gives), until the calibrated estimate meets the budget; the model equals the one
    `keep_ratios=` gives at the ratios it chose."""
    build, _ = MODELS[name]
    dense = build().eval()
    sparse = tokenprune.sparsify(dense, 0.7)
    compute = find_recorder(sparse).compute
    floor = floor_of(compute.patches)
    for start, budget in (([0.9, 0.6, 0.2], 0.55), ([0.6, 0.5, 0.45], 0.8)):
        tokenprune.set_keep_ratios(sparse, start)
        tokenprune.set_keep_ratios(sparse, flops=budget)
        moved = tokenprune.config_of(sparse).keep_ratios
        assert float(compute.ratio(torch.tensor(moved, dtype=torch.float64))) == pytest.approx(budget, abs=1e-6)
        shifts = [a - b for a, b in zip(logits_of(moved, floor), logits_of(start, floor), strict=True)]
        assert shifts == pytest.approx([shifts[0]] * len(shifts), abs=1e-6)  # one shift: the allocation is kept
        assert all(b <= a for a, b in zip(moved, moved[1:]))
        assert [s.keep_ratio for s in tokenprune.selectors(sparse)] == moved
    x = torch.randn(2, 3, 96, 96) if name != "convnext_atto" else torch.randn(2, 3, 224, 224)
    by_hand = tokenprune.set_keep_ratios(copy.deepcopy(sparse), moved)
    with torch.no_grad():
        torch.testing.assert_close(sparse.eval()(x), by_hand.eval()(x), rtol=0, atol=0)


def test_a_flops_budget_is_what_fvcore_counts_and_keeps_a_schedule_geometric():
    """A rho^s model stays geometric at another base, but for the one-token floor m of the parameterisation; the
    chain's multiply-adds as fvcore counts them meet the budget up to floor(rho * N)."""
    x = torch.randn(1, 3, 224, 224)
    sparse = tokenprune.sparsify(timm.create_model("deit_tiny_patch16_224").eval(), 0.7)
    floor = floor_of(find_recorder(sparse).compute.patches)
    for budget in (0.45, 0.6, 0.75):
        tokenprune.set_keep_ratios(sparse, flops=budget)
        moved = tokenprune.config_of(sparse).keep_ratios
        assert moved == pytest.approx([moved[0] ** s for s in (1, 2, 3)], abs=floor)
        sparse_count = profile_flops(sparse, x)
        before = [sel.keep_ratio for sel in tokenprune.selectors(sparse)]
        for sel in tokenprune.selectors(sparse):
            sel.keep_ratio = 1.0
        dense_blocks = sum(profile_flops(sparse, x).blocks.values())
        for sel, r in zip(tokenprune.selectors(sparse), before, strict=True):
            sel.keep_ratio = r
        counted = (sum(sparse_count.blocks.values()) + sum(sparse_count.predictors.values())) / dense_blocks
        assert budget - 0.03 < counted <= budget + 1e-9  # counts are rounded down to whole tokens


@pytest.mark.parametrize("name", ["deit_tiny", "convnext_atto"])
def test_the_report_names_a_ratio_only_when_the_stages_keep_its_schedule(name):
    """The report's "ratio" is the rho whose default schedule (rho^s; rho - 0.2 s) the stages keep, however they
    came to keep it, and null when they keep no rho's."""
    from tokenprune.measure import build_report

    build, _ = MODELS[name]
    dense = build().eval()
    sparse = tokenprune.sparsify(dense, 0.7)
    size = tokenprune.config_of(sparse).input_size

    def ratio() -> float | None:
        return build_report(name, dense, sparse, size, flops_only=True)["ratio"]

    assert ratio() == pytest.approx(0.7)
    schedule = [0.6, 0.36, 0.216] if name == "deit_tiny" else [0.6, 0.4, 0.2]
    tokenprune.set_keep_ratios(sparse, schedule)  # rho = 0.6's schedule, given per stage
    assert ratio() == pytest.approx(0.6)
    tokenprune.set_keep_ratios(sparse, [0.6, 0.35, 0.2] if name == "deit_tiny" else [0.6, 0.45, 0.2])
    assert ratio() is None
    tokenprune.set_keep_ratios(sparse, flops=0.6)
    assert ratio() is None


def test_bad_flops_budgets_leave_the_model_as_it_was():
    sparse = tokenprune.sparsify(timm.create_model("deit_tiny_patch16_224", img_size=96), 0.7)
    before = tokenprune.config_of(sparse).keep_ratios
    for bad in (1.0, 0.0, -0.5, float("nan"), "half"):
        with pytest.raises(ConfigError, match="deit_tiny_patch16_224: flops="):
            tokenprune.set_keep_ratios(sparse, flops=bad)
    with pytest.raises(ConfigError, match=r"deit_tiny_patch16_224: flops=0.1 is out of reach .* \[0.30"):
        tokenprune.set_keep_ratios(sparse, flops=0.1)  # below every stage at one token
    with pytest.raises(ConfigError, match="one of them"):
        tokenprune.set_keep_ratios(sparse, ratio=0.5, flops=0.5)
    assert [s.keep_ratio for s in tokenprune.selectors(sparse)] == before


def test_without_a_kept_cost_model_it_calibrates_one():
    """A model that holds no cost model (pickled by an older tokenprune) is measured at its configured size."""
    sparse = tokenprune.sparsify(timm.create_model("deit_tiny_patch16_224", img_size=96), 0.7)
    kept = find_recorder(sparse).compute
    del find_recorder(sparse).compute
    with pytest.raises(UnsupportedModelError, match="would not save compute"):
        tokenprune.set_keep_ratios(sparse, [1.0, 1.0, 1.0])
    assert find_recorder(sparse).compute.blocks == kept.blocks
    tokenprune.set_keep_ratios(sparse, ratio=0.6)
    assert tokenprune.config_of(sparse).keep_ratios == pytest.approx([0.6, 0.36, 0.216])


def test_saved_files_record_the_new_ratios(tmp_path):
    sparse = tokenprune.sparsify(timm.create_model("deit_tiny_patch16_224", img_size=96), 0.7)
    find_recorder(sparse).config.learned = True  # as a run with learned keep ratios leaves it
    tokenprune.set_keep_ratios(sparse, [0.6, 0.4, 0.2])
    path = tokenprune.save(sparse, tmp_path / "m.safetensors")
    loaded = tokenprune.load(path)
    assert tokenprune.config_of(loaded).keep_ratios == [0.6, 0.4, 0.2]
    assert not tokenprune.config_of(loaded).learned  # set by hand: no longer the learned ones
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), sparse.eval()(x), rtol=0, atol=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    sparse = tokenprune.sparsify(timm.create_model("deit_tiny_patch16_224", img_size=96), 0.7)
    return tokenprune.save(sparse, tmp_path_factory.mktemp("rekeep") / "m.safetensors")


def test_cli_report_of_a_file_at_other_keep_ratios(saved, tmp_path):
    runner = CliRunner()
    out = tmp_path / "r.json"
    result = runner.invoke(
        app, ["report", str(saved), "--keep-ratios", "0.5,0.3,0.2", "--flops-only", "--json", str(out),
              "--markdown", str(tmp_path / "r.md")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [s["keep_ratio"] for s in report["stages"]] == [0.5, 0.3, 0.2]
    assert report["saved_keep_ratios"] == pytest.approx([0.7, 0.49, 0.343])
    assert "saved with 0.7/0.49/0.343" in " ".join(result.output.split())
    assert "Keep ratios set to 0.5/0.3/0.2" in (tmp_path / "r.md").read_text()
    plain = tmp_path / "plain.json"
    assert runner.invoke(app, ["report", str(saved), "--flops-only", "--json", str(plain)]).exit_code == 0
    plain_report = json.loads(plain.read_text())
    assert plain_report["saved_keep_ratios"] is None
    assert plain_report["ratio"] == pytest.approx(0.7) and report["ratio"] is None  # no rho gives 0.5/0.3/0.2
    assert report["flops_reduction"] > plain_report["flops_reduction"]
    for args, message in ((["--locations", "3,6"], "apply to model names"),
                          (["--ratio", "0.5", "--keep-ratios", "0.5,0.3,0.2"], "give one of"),
                          (["--ratio", "1.0"], "would not save compute")):  # fmt: skip
        result = runner.invoke(app, ["report", str(saved), "--flops-only", *args])
        assert result.exit_code == 2 and message in result.output, result.output


def test_cli_flops_moves_a_file_or_a_name_onto_the_budget(saved, tmp_path):
    runner = CliRunner()
    expected = tokenprune.config_of(tokenprune.set_keep_ratios(tokenprune.load(saved), flops=0.5)).keep_ratios
    reports = []
    for model in (str(saved), "deit_tiny_patch16_224"):  # the file was saved from this name at 96 px, rho = 0.7
        out = tmp_path / "f.json"
        size = ["--input-size", "96"] if model != str(saved) else []
        result = runner.invoke(app, ["report", model, *size, "--flops", "0.5", "--flops-only", "--json", str(out)])
        assert result.exit_code == 0, result.output
        reports.append(json.loads(out.read_text()))
        assert [s["keep_ratio"] for s in reports[-1]["stages"]] == pytest.approx(expected, abs=1e-9)
        assert reports[-1]["ratio"] is None and "keep " + "/".join(f"{r:.3g}" for r in expected) in result.output
    assert reports[0]["saved_keep_ratios"] == pytest.approx([0.7, 0.49, 0.343])
    assert reports[1]["saved_keep_ratios"] is None
    for args, message in ((["--flops", "0.5", "--ratio", "0.5"], "give one of"),
                          (["--flops", "1"], "out of range"),
                          (["--flops", "0.1"], "out of reach")):  # fmt: skip
        result = runner.invoke(app, ["report", str(saved), "--flops-only", *args])
        assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.slow
def test_cli_export_at_another_ratio(saved, tmp_path):
    pytest.importorskip("onnxruntime")
    info = tmp_path / "e.json"
    result = CliRunner().invoke(
        app, ["export", str(saved), "--ratio", "0.5", "--out", str(tmp_path / "m.onnx"), "--json", str(info)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(info.read_text())["keep_ratios"] == [0.5, 0.25, 0.125]
    assert "keep 0.5/0.25/0.125" in result.output


@pytest.mark.slow
def test_the_proof_measures_a_trained_student_at_other_ratios(fashion_mnist_like, tmp_path, monkeypatch, capsys):
    """examples/fashion_mnist_proof.py: teacher, the rho = 0.7 student, one fine-tuned at 0.5, and the rekeep table
    (the 0.7 student moved to each ratio, random tokens at the same counts, the 0.5 student beside its row)."""
    import runpy
    import sys
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples"
    monkeypatch.syspath_prepend(str(examples))
    out = tmp_path / "proof"
    stages = "teacher,student,student_r0.5,rekeep"
    argv = ["fashion_mnist_proof.py", "--out", str(out), "--data-root", str(fashion_mnist_like), "--width", "24",
            "--batch-size", "8", "--teacher-epochs", "1", "--student-epochs", "1", "--stages", stages]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(examples / "fashion_mnist_proof.py"), run_name="__main__")
    rows = json.loads((out / "rekeep.json").read_text())["rows"]
    assert [r["rho"] for r in rows] == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert rows[0]["keep_ratios"] == pytest.approx([0.5, 0.25, 0.125])
    flops = [r["flops_vs_teacher"] for r in rows]
    assert flops == sorted(flops) and flops[-1] < 1
    assert [r["trained_at_rho_top1"] is not None for r in rows] == [True, False, True, False, False]
    assert (out / "student_r0.5" / "final.pt").is_file()
    assert "| 0.5 |" in (out / "rekeep.md").read_text()


@pytest.mark.slow
def test_the_spatial_proof_measures_a_trained_student_at_other_ratios(fashion_mnist_like, tmp_path, monkeypatch):
    """examples/spatial_scene_proof.py, the same stages on a sparsified ConvNeXt: its spatial schedule (rho, rho - 0.2,
    rho - 0.4) moves with rho, and the FLOPs with it."""
    import runpy
    import sys
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples"
    monkeypatch.syspath_prepend(str(examples))
    out = tmp_path / "spatial"
    argv = ["spatial_scene_proof.py", "--out", str(out), "--data-root", str(fashion_mnist_like), "--train-subset", "8",
            "--val-subset", "4", "--teacher-epochs", "1", "--student-epochs", "1", "--set", "optim.batch_size=4",
            "--stages", "teacher,student,student_r0.5,rekeep"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(examples / "spatial_scene_proof.py"), run_name="__main__")
    results = json.loads((out / "rekeep.json").read_text())
    rows = results["rows"]
    assert results["test_images"] == 20  # the whole test split
    assert [r["rho"] for r in rows] == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert rows[0]["keep_ratios"] == pytest.approx([0.5, 0.3, 0.1]) and rows[2]["keep_ratios"] == [0.7, 0.5, 0.3]
    flops = [r["flops_vs_teacher"] for r in rows]
    assert flops == sorted(flops) and flops[0] < flops[-1] < 1
    assert [r["trained_at_rho_top1"] is not None for r in rows] == [True, False, True, False, False]
    assert "| 0.5 | 0.5/0.3/0.1 |" in (out / "rekeep.md").read_text()


def test_visualize_draws_a_file_at_the_ratio_asked(saved, tmp_path):
    """`tokenprune visualize FILE --ratio` keeps what it is asked (it used to ignore --ratio for files)."""
    from PIL import Image

    from tokenprune.visualize import visualize_files

    image = tmp_path / "x.png"
    Image.new("RGB", (96, 96), (90, 20, 200)).save(image)
    with pytest.raises(UnsupportedModelError, match="would not save compute"):
        visualize_files(str(saved), [image], tmp_path / "pictures", ratio=1.0)
    assert visualize_files(str(saved), [image], tmp_path / "pictures", ratio=0.5)[0].is_file()
