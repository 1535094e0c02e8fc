"""The `tokenprune` command as a user drives it: convert, report, gates, and clean failures with distinct exit codes."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import tokenprune
from tokenprune.cli import EXIT_ERROR, EXIT_GATE, app
from tokenprune.cli.gates import eval_dataset
from tokenprune.io import load_original

MODEL = "deit_tiny_patch16_224"
KWARGS = {"depth": 4, "embed_dim": 48, "num_heads": 3, "num_classes": 4}
TINY = ["--input-size", "32"] + [a for k, v in KWARGS.items() for a in ("-k", f"{k}={v}")]  # 4 patches: fast
FAST = ["--repeats", "1", "--warmup", "0", "--batch-size", "2"]


def run(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "Traceback" not in text, text
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return result


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("convert")
    result = run("convert", MODEL, "--out", out, *TINY, "--flops-only", "--min-flops-reduction", "0.1")
    assert result.exit_code == 0, result.output + result.stderr
    assert "all gates passed" in result.output
    return out


def test_help_documents_commands_and_exit_codes():
    result = run("--help")
    assert result.exit_code == 0
    for word in ("convert", "report", "sweep", "export", "finetune", "Exit codes", "gate"):
        assert word in result.output
    for command in ("convert", "report", "sweep", "export", "finetune"):
        assert run(command, "--help").exit_code == 0


def test_convert_writes_model_and_reports(converted: Path):
    assert {p.name for p in converted.iterdir()} >= {"model.safetensors", "report.json", "report.md"}
    report = json.loads((converted / "report.json").read_text())
    assert report["model"] == MODEL and report["input_size"] == [3, 32, 32]
    assert report["ratio"] == pytest.approx(0.7)
    assert report["sparse"]["gmacs"] < report["dense"]["gmacs"]
    assert report["flops_reduction"] > 0.1 and report["speedup"] is None
    assert len(report["stages"]) == 3
    assert "tokenprune report" in (converted / "report.md").read_text()


def test_converted_file_loads_to_the_same_model(converted: Path):
    loaded = tokenprune.load(converted / "model.safetensors")
    # The model convert built in memory: same seed, same construction order.
    torch.manual_seed(0)
    dense = tokenprune.create_model(MODEL, img_size=[32, 32], **KWARGS).eval()
    sparse = tokenprune.sparsify(dense, 0.7, example_inputs=torch.randn(1, 3, 32, 32)).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded(x), sparse(x))
    config = tokenprune.config_of(loaded)
    assert config.locations == [1, 2, 3] and config.source["name"] == MODEL


def test_report_on_saved_file_writes_json_and_markdown(converted: Path, tmp_path: Path):
    result = run(
        "report", converted / "model.safetensors", "--flops-only", "--json", tmp_path / "r.json",
        "--markdown", tmp_path / "r.md",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["flops_reduction"] == pytest.approx(
        json.loads((converted / "report.json").read_text())["flops_reduction"]
    )
    assert (tmp_path / "r.md").read_text().startswith("**tokenprune report")
    assert "GFLOPs" in result.output


def test_report_by_name_applies_ratio(tmp_path: Path):
    result = run("report", MODEL, *TINY, "--ratio", "0.5", "--flops-only", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ratio"] == 0.5 and [s["keep_ratio"] for s in report["stages"]] == [0.5, 0.25, 0.125]


def test_flops_gate_fails_with_one_line_and_exit_3(converted: Path, tmp_path: Path):
    result = run("report", converted / "model.safetensors", "--flops-only", "--min-flops-reduction", "0.9",
                 "--json", tmp_path / "r.json")  # fmt: skip
    assert result.exit_code == EXIT_GATE
    lines = error_lines(result)
    assert len(lines) == 1 and "FLOPs reduction" in lines[0] and "short by" in lines[0]
    assert (tmp_path / "r.json").is_file()  # reports are written before the gate, for CI artifacts


@pytest.mark.parametrize("threshold, code", [("0.0", 0), ("1000", EXIT_GATE)])
def test_speedup_gate(converted: Path, threshold: str, code: int):
    result = run("report", converted / "model.safetensors", *FAST, "--min-speedup", threshold)
    assert result.exit_code == code, result.stderr
    if code:
        assert len(error_lines(result)) == 1 and "speed-up" in result.stderr


def test_threads_set_the_timing_threads_and_are_given_back(converted: Path, tmp_path: Path):
    threads = torch.get_num_threads()
    result = run("report", converted / "model.safetensors", *FAST, "--threads", "1", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["threads"] == 1 and isinstance(report["warnings"], list)
    assert torch.get_num_threads() == threads
    result = run("report", converted / "model.safetensors", *FAST, "--threads", "0")
    assert result.exit_code == EXIT_ERROR and "--threads 0" in result.stderr


def test_speedup_gate_needs_timings(converted: Path):
    result = run("report", converted / "model.safetensors", "--flops-only", "--min-speedup", "1")
    assert result.exit_code == EXIT_ERROR and "--flops-only" in result.stderr


def _image_folder(root: Path, sparse_file: Path) -> float:
    """Random images labelled so that the dense model is mostly right; returns the expected top-1 drop (points)."""
    staging = root / "staging" / "0"
    staging.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(staging / f"{i:02d}.png")
    dense, sparse = load_original(sparse_file), tokenprune.load(sparse_file)
    data = eval_dataset(root / "staging", (3, 32, 32), dense)
    images = torch.stack([data[i][0] for i in range(len(data))])
    with torch.inference_mode():
        d, s = dense(images).argmax(-1), sparse(images).argmax(-1)
    labels = d.clone()
    for c in range(4):  # every class folder needs an image; relabel images until each class has one
        if not (labels == c).any():
            labels[int((labels == labels.mode().values).nonzero()[0])] = c
    for i, path in enumerate(sorted(staging.iterdir())):
        (root / "data" / str(int(labels[i]))).mkdir(parents=True, exist_ok=True)
        path.rename(root / "data" / str(int(labels[i])) / path.name)
    return 100.0 * (float((d == labels).float().mean()) - float((s == labels).float().mean()))


def test_accuracy_gate_on_an_image_folder(converted: Path, tmp_path: Path):
    model = converted / "model.safetensors"
    drop = _image_folder(tmp_path, model)
    assert drop > 0, "the sparse model should disagree with the dense one on some random image"
    data = tmp_path / "data"
    ok = run("report", model, "--flops-only", "--eval-data", data, "--max-accuracy-drop", drop + 1, "--json",
             tmp_path / "r.json")  # fmt: skip
    assert ok.exit_code == 0, ok.stderr
    accuracy = json.loads((tmp_path / "r.json").read_text())["accuracy"]
    assert accuracy["images"] == 24 and accuracy["drop"] == pytest.approx(drop)
    failed = run("report", model, "--flops-only", "--eval-data", data, "--max-accuracy-drop", drop / 2)
    assert failed.exit_code == EXIT_GATE
    assert len(error_lines(failed)) == 1 and "top-1 drop" in failed.stderr


def test_accuracy_gate_needs_eval_data(converted: Path):
    result = run("report", converted / "model.safetensors", "--flops-only", "--max-accuracy-drop", "1")
    assert result.exit_code == EXIT_ERROR and "--eval-data" in result.stderr


# ---- clean failures ---------------------------------------------------------------------------------------------


def test_unknown_model_lists_close_matches(tmp_path: Path):
    result = run("convert", "deit_tiny_patch16_2244", "--out", tmp_path)
    assert result.exit_code == EXIT_ERROR
    assert "unknown model" in result.stderr and "deit_tiny_patch16_224" in result.stderr


@pytest.mark.parametrize("args, words", [
    (["--ratio", "1.5"], "out of range"),
    (["--locations", "a,b"], "comma-separated numbers"),
    (["--keep-ratios", "0.5,0.7,0.9"], "increase"),
    (["--input-size", "0"], "--input-size"),
    (["-k", "num_classes"], "KEY=VALUE"),
])  # fmt: skip
def test_bad_options_exit_2(tmp_path: Path, args: list[str], words: str):
    result = run("convert", MODEL, "--out", tmp_path, "-k", "depth=4", "--flops-only", *args)
    assert result.exit_code == EXIT_ERROR and words in result.stderr
    assert not (tmp_path / "model.safetensors").exists()


def test_missing_file(tmp_path: Path):
    result = run("report", tmp_path / "nope.safetensors")
    assert result.exit_code == EXIT_ERROR and "does not exist" in result.stderr
    result = run("report", tmp_path / "runs" / "student")  # a run folder that is not there is not a model name
    assert result.exit_code == EXIT_ERROR and "no such file or folder" in result.stderr
    assert "unknown model" not in result.stderr


def test_truncated_file(converted: Path, tmp_path: Path):
    data = (converted / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    for command in (["report"], ["export", "--out", tmp_path / "x.onnx"]):
        result = run(command[0], tmp_path / "cut.safetensors", *command[1:])
        assert result.exit_code == EXIT_ERROR and "truncated" in result.stderr


def test_foreign_safetensors_file(tmp_path: Path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    result = run("report", tmp_path / "plain.safetensors", "--flops-only")
    assert result.exit_code == EXIT_ERROR and "not a tokenprune model" in result.stderr


def test_tokenprune_file_for_another_architecture(converted: Path, tmp_path: Path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from tokenprune.io.model_file import _digest

    with safe_open(str(converted / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    source = json.loads(meta["source"])
    source["kwargs"]["num_classes"] = 7  # the header now describes another head than the weights hold
    meta["source"] = json.dumps(source)
    meta["config"] = json.dumps({**json.loads(meta["config"]), "source": source})
    tensors = load_file(str(converted / "model.safetensors"))
    meta["digest"] = _digest(meta, tensors)  # a consistent file, so the shape check is what refuses it
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata=meta)
    result = run("report", tmp_path / "other.safetensors", "--flops-only")
    assert result.exit_code == EXIT_ERROR
    assert "does not fit" in result.stderr and "shape mismatch" in result.stderr


def test_malicious_pickle_checkpoint_is_refused_unexecuted(tmp_path: Path, code_payload):
    payload, marker = code_payload
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": payload}, f)
    result = run("convert", MODEL, "--out", tmp_path / "out", *TINY, "--flops-only", "--checkpoint",
                 tmp_path / "evil.pth")  # fmt: skip
    assert result.exit_code == EXIT_ERROR and "refused" in result.stderr
    assert not marker.exists()


def test_dense_checkpoint_with_wrapper_is_used(tmp_path: Path):
    dense = tokenprune.create_model(MODEL, img_size=[32, 32], **KWARGS)
    torch.save({"model": dense.state_dict(), "epoch": 3}, tmp_path / "dense.pth")
    result = run("convert", MODEL, "--out", tmp_path / "out", *TINY, "--flops-only", "--checkpoint",
                 tmp_path / "dense.pth")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    original = load_original(tmp_path / "out" / "model.safetensors")
    assert torch.equal(original.state_dict()["head.weight"], dense.state_dict()["head.weight"])


def test_checkpoint_for_another_model_is_rejected(tmp_path: Path):
    other = tokenprune.create_model(MODEL, img_size=[32, 32], **{**KWARGS, "num_classes": 10})
    torch.save(other.state_dict(), tmp_path / "other.pth")
    result = run("convert", MODEL, "--out", tmp_path / "out", *TINY, "--flops-only", "--checkpoint",
                 tmp_path / "other.pth")  # fmt: skip
    assert result.exit_code == EXIT_ERROR and "head.weight" in result.stderr


def test_finetune_input_errors(tmp_path: Path):
    result = run("finetune", "--recipe", tmp_path / "none.yaml")
    assert result.exit_code == EXIT_ERROR and "none.yaml" in result.stderr
    result = run("finetune", "stray")
    assert result.exit_code == EXIT_ERROR and "KEY=VALUE" in result.stderr
    result = run("finetune", "recipes/deit_s.yaml")  # the recipe given without --recipe
    assert result.exit_code == EXIT_ERROR and "--recipe recipes/deit_s.yaml" in result.stderr


def test_finetune_checks_its_output_paths_before_training(tmp_path: Path, monkeypatch):
    """--save/--json that cannot be written fail at once (exit 2, naming the option), not after the run."""
    import tokenprune.train as train

    monkeypatch.setattr(train, "finetune", lambda *a, **k: pytest.fail("trained before checking the output paths"))
    (tmp_path / "folder").mkdir()
    result = run("finetune", "--save", tmp_path / "folder", "data.source=synthetic")
    assert result.exit_code == EXIT_ERROR and "--save" in result.stderr and "folder" in result.stderr
    (tmp_path / "file").write_text("in the way")
    result = run("finetune", "--json", tmp_path / "file" / "metrics.json", "data.source=synthetic")
    assert result.exit_code == EXIT_ERROR and "--json" in result.stderr


@pytest.mark.slow
def test_finetune_saves_a_loadable_model(tmp_path: Path):
    result = run(
        "finetune", f"model.name={MODEL}", "model.kwargs={img_size: 32, depth: 4, embed_dim: 48, num_heads: 3, "
        "num_classes: 4}", "data.source=synthetic", "data.num_classes=4", "data.synthetic_size=16", "data.workers=0",
        "optim.max_steps=2", "optim.batch_size=8", "optim.epochs=1", f"run.output_dir={tmp_path}", "run.device=cpu",
        "run.amp=false", "--save", tmp_path / "m.safetensors", "--json", tmp_path / "metrics.json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 2
    assert tokenprune.config_of(tokenprune.load(tmp_path / "m.safetensors")).source["name"] == MODEL


@pytest.mark.slow
def test_convert_features_only_saves_a_feature_extractor(tmp_path: Path):
    out = tmp_path / "features"
    result = run("convert", "convnext_atto", "--features-only", "--input-size", "64", "--out", out, "--flops-only")
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["outputs"] == ["output0", "output1", "output2", "output3"]
    assert report["split"] is None and report["sparse"]["gmacs"] < report["dense"]["gmacs"]
    assert "4 outputs" in result.output
    loaded = tokenprune.load(out / "model.safetensors")
    assert tokenprune.config_of(loaded).source["kwargs"] == {"features_only": True}
    with torch.no_grad():
        maps = loaded(torch.randn(1, 3, 64, 64))
        dense = load_original(out / "model.safetensors")(torch.randn(1, 3, 64, 64))
    assert [m.shape for m in maps] == [m.shape for m in dense] and len(maps) == 4
    # the dense report of the saved file and of the name agree
    by_file = run("report", out, "--flops-only", "--json", tmp_path / "file.json")
    by_name = run("report", "convnext_atto", "--features-only", "--input-size", "64", "--flops-only", "--json",
                  tmp_path / "name.json")  # fmt: skip
    assert by_file.exit_code == by_name.exit_code == 0, by_file.output + by_name.output
    file_report, name_report = (json.loads((tmp_path / f).read_text()) for f in ("file.json", "name.json"))
    assert file_report["dense"]["gmacs"] == name_report["dense"]["gmacs"] == report["dense"]["gmacs"]
    assert file_report["outputs"] == name_report["outputs"] == report["outputs"]


def test_features_only_is_refused_for_torchvision_and_files(converted: Path, tmp_path: Path):
    result = run("convert", "vit_b_16", "--features-only", "--out", tmp_path / "x", "--flops-only")
    assert result.exit_code == 2 and "create_feature_extractor" in result.stderr
    result = run("report", converted / "model.safetensors", "--features-only", "--flops-only")
    assert result.exit_code == 2 and "--features-only" in result.stderr


def test_report_on_a_file_names_every_model_option_it_would_ignore(converted: Path):
    args = ["--ratio", "0.5", "-k", "num_classes=3", "--seed", "3", "--scorer", "attention", "--flops-only"]
    result = run("report", converted / "model.safetensors", *args)
    assert result.exit_code == EXIT_ERROR
    assert "--model-kwarg, --seed, --scorer apply to model names" in result.stderr  # --ratio applies (rekeep)
    assert "only --ratio, --keep-ratios or --flops may change what its stages keep" in " ".join(result.stderr.split())


def test_convert_and_report_take_the_same_model_and_measurement_options():
    from typer.main import get_command

    commands = get_command(app).commands
    convert = {p.name: p.default for p in commands["convert"].params if p.name not in ("model", "out")}
    report = {p.name: p.default for p in commands["report"].params if p.name not in ("model", "json_path")}
    report.pop("markdown_path")
    report.pop("dense_checkpoint")  # report's own: the dense side of a file, which convert never reads
    assert convert == report and {"ratio", "seed", "eval_data", "min_speedup"} <= set(convert)


def test_convert_decisions_reach_the_spatial_stages(tmp_path):
    """--decisions picks how a spatial model's stages decide; the saved file records it; a bad value is a usage
    error."""
    import tokenprune

    args = ["convnext_atto", "--input-size", "64", "-k", "num_classes=3", "--flops-only"]
    for decisions in ("nested", "independent"):
        result = run("convert", *args, "--decisions", decisions, "--out", tmp_path / decisions)
        assert result.exit_code == 0, result.output
        model = tokenprune.load(tmp_path / decisions / "model.safetensors")
        assert tokenprune.config_of(model).decisions == decisions
    result = run("convert", *args, "--decisions", "sometimes", "--out", tmp_path / "bad")
    assert result.exit_code == EXIT_ERROR and "sometimes" in result.stderr
