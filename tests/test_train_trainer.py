"""The trainer on a tiny sparsified ViT: exact resume, non-finite loss handling, outputs, parameter groups, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_runs import SYNTHETIC, THREE_EPOCHS, TINY_VIT

import tokenprune
from tokenprune.errors import ConfigError, DataError, TrainingError
from tokenprune.train import cli_main, finetune
from tokenprune.train.checkpoint import load_checkpoint
from tokenprune.train.trainer import Trainer

TINY = [*TINY_VIT, *SYNTHETIC, *THREE_EPOCHS, "optim.backbone_lr_scale=0.1"]


def _run(tmp_path, name, *extra):
    return finetune(None, overrides=[*TINY, f"run.output_dir={tmp_path / name}", *extra])


def _weights(path):
    return load_checkpoint(path)["model"]


class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.slow  # over 2 s on 2 cores: the full run covers it, the inner loop (-m 'not slow') skips it
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, monkeypatch, learned):
    extra = ["learned_ratios.enabled=true", "learned_ratios.target_flops=0.7"] if learned else []
    full = _run(tmp_path, "full", *extra)
    assert full.metrics["steps"] == 6  # 32 images / (8 x 2) = 2 steps per epoch, 3 epochs

    original = Trainer._optimizer_step
    calls = {"n": 0}

    def crash_on_fourth(self):
        calls["n"] += 1
        if calls["n"] == 4:  # mid-epoch 1, after last.pt was written at step 3
            raise _Crash("simulated crash")
        original(self)

    monkeypatch.setattr(Trainer, "_optimizer_step", crash_on_fourth)
    with pytest.raises(_Crash):
        _run(tmp_path, "cut", *extra)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 3
    monkeypatch.setattr(Trainer, "_optimizer_step", original)
    resumed = _run(tmp_path, "cut", *extra)  # run.resume defaults to "auto"

    a, b = _weights(tmp_path / "full" / "final.pt"), _weights(tmp_path / "cut" / "final.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.metrics == full.metrics
    if learned:
        assert full.metrics["learned"] and full.metrics["flops_estimate"] == pytest.approx(0.7, abs=1e-4)
        sels = tokenprune.selectors(resumed.model)
        assert [s.keep_ratio for s in sels] == full.metrics["keep_ratios"]
        assert tokenprune.config_of(resumed.model).learned


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    original = Trainer._forward_loss
    calls = {"n": 0}

    def poisoned(self, x, y):
        out, kept = original(self, x, y)
        calls["n"] += 1
        if calls["n"] == 7:  # a micro-batch of step 4
            out.total = out.total * float("nan")
        return out, kept

    monkeypatch.setattr(Trainer, "_forward_loss", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 4.*finite weights is \S+last\.pt \(step 3\)"):
        _run(tmp_path, "nan")
    ckpt = load_checkpoint(tmp_path / "nan" / "last.pt")
    assert ckpt["step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (tmp_path / "nan" / "final.pt").exists()


def test_outputs_metrics_and_groups(tmp_path):
    result = _run(tmp_path, "out", "optim.epochs=1", "optim.lr=2e-3")
    out = tmp_path / "out"
    assert {"recipe.yaml", "metrics.jsonl", "last.pt", "final.pt"} <= {p.name for p in out.iterdir()}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds.count("teacher") == 1 and kinds[-1] == "final"
    train = [r for r in records if r["kind"] == "train"]
    assert {"ce", "ratio", "kl", "distill", "loss", "keep1", "keep3", "img_s", "lr"} <= set(train[0])
    ckpt = load_checkpoint(out / "last.pt")
    groups = {g["name"]: g for g in ckpt["optimizer"]["param_groups"]}
    assert groups["new"]["initial_lr"] == pytest.approx(2e-3)
    assert groups["backbone"]["initial_lr"] == pytest.approx(2e-4)
    assert not result.model.training


def test_global_batch_must_divide(tmp_path):
    with pytest.raises(ConfigError, match="global_batch_size=12"):
        _run(tmp_path, "gb", "optim.global_batch_size=12")


def test_dataset_smaller_than_a_step(tmp_path):
    with pytest.raises(DataError, match="smaller than one optimizer step"):
        _run(tmp_path, "small", "data.synthetic_size=8")


def test_cli_reports_unknown_key(tmp_path, capsys):
    assert cli_main([*TINY, "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err


def test_finetune_given_student_and_teacher(tmp_path):
    import timm

    torch.manual_seed(0)
    teacher = timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=4, in_chans=1
    )
    student = tokenprune.sparsify(teacher, 0.7, locations=[1, 2, 3], example_inputs=torch.randn(1, 1, 16, 16))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    overrides = [o for o in TINY if not o.startswith(("model.", "sparsify."))]
    result = finetune(
        model=student, teacher=teacher, overrides=[*overrides, "optim.epochs=1", f"run.output_dir={tmp_path}"]
    )
    assert result.model is student and result.metrics["steps"] == 2
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # the teacher stays frozen
    with pytest.raises(ConfigError, match="pass teacher="):
        finetune(model=student, overrides=[*overrides, f"run.output_dir={tmp_path / 'b'}"])


def test_a_class_count_other_than_the_datasets_is_refused_saying_where_to_set_it(tmp_path):
    """Built from the recipe: set model.kwargs.num_classes. Passed in (a sparse model, which carries the original's
    `num_classes`): build it so before sparsifying."""
    import timm

    with pytest.raises(
        ConfigError, match=r"predicts 4 classes but the dataset has 3; set model\.kwargs\.num_classes=3"
    ):
        _run(tmp_path, "recipe", "data.num_classes=3")
    dense = timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=4, in_chans=1
    )
    sparse = tokenprune.sparsify(dense, 0.7, locations=[1, 2, 3], example_inputs=torch.randn(1, 1, 16, 16))
    overrides = [o for o in TINY if not o.startswith(("model.", "sparsify."))]
    with pytest.raises(ConfigError, match="predicts 4 classes but the dataset has 3; build it with num_classes=3"):
        finetune(
            model=sparse, teacher=dense, overrides=[*overrides, "data.num_classes=3", f"run.output_dir={tmp_path}"]
        )


def test_resume_auto_refuses_another_recipe_and_reruns_of_a_finished_run_train_nothing(tmp_path):
    first = _run(tmp_path, "run", "optim.epochs=1")
    recipe_yaml = (tmp_path / "run" / "recipe.yaml").read_text()
    with pytest.raises(ConfigError, match=r"different recipe \(optim.lr: 0.001 -> 0.005\).*run.resume=none"):
        _run(tmp_path, "run", "optim.epochs=1", "optim.lr=5e-3")
    assert (tmp_path / "run" / "recipe.yaml").read_text() == recipe_yaml  # refused before writing anything
    final = (tmp_path / "run" / "final.pt").stat().st_mtime_ns
    again = _run(tmp_path, "run", "optim.epochs=1", "run.threads=2")  # operational keys may differ
    assert again.metrics == first.metrics  # the finished run's result, read back: no step trained
    assert (tmp_path / "run" / "final.pt").stat().st_mtime_ns == final
    anew = _run(tmp_path, "run", "optim.epochs=1", "optim.lr=5e-3", "run.resume=none")
    assert anew.metrics["steps"] == 2


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, code_payload):
    from tokenprune.errors import CheckpointError
    from tokenprune.train.checkpoint import save_checkpoint

    payload, marker = code_payload
    save_checkpoint({"step": 1, "recipe": {}, "rng": [payload]}, tmp_path / "evil" / "last.pt")
    with pytest.raises(CheckpointError, match="refused to read checkpoint"):
        _run(tmp_path, "evil")
    assert not marker.exists()


def test_backbone_trains_at_its_scale_without_a_teacher(tmp_path):
    import timm

    teacher = timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=4, in_chans=1
    )
    student = tokenprune.sparsify(teacher, 0.7, locations=[1, 2, 3], example_inputs=torch.randn(1, 1, 16, 16))
    overrides = [o for o in TINY if not o.startswith(("model.", "sparsify."))]
    finetune(
        model=student,
        overrides=[
            *overrides,
            "optim.epochs=1",
            "optim.lr=2e-3",
            "loss.kl=0",
            "loss.distill=0",
            f"run.output_dir={tmp_path}",
        ],
    )
    groups = {g["name"]: g for g in load_checkpoint(tmp_path / "last.pt")["optimizer"]["param_groups"]}
    assert groups["backbone"]["initial_lr"] == pytest.approx(2e-4)  # optim.backbone_lr_scale=0.1
    assert groups["new"]["initial_lr"] == pytest.approx(2e-3)
    inserted = sum(len(list(s.parameters())) for s in tokenprune.selectors(student))
    assert sum(len(g["params"]) for name, g in groups.items() if name.startswith("new")) == inserted


@pytest.mark.slow
def test_torchvision_recipe(tmp_path):
    # The harness builds models with tokenprune.create_model, so torchvision names work as timm ones do.
    overrides = [
        "model.name=vit_b_16",
        "model.kwargs={image_size: 32, num_classes: 4}",  # 2 x 2 patches: small enough for a test
        "data.source=synthetic",
        "data.num_classes=4",
        "data.synthetic_size=16",
        "data.img_size=32",
        "data.workers=0",
        "optim.batch_size=8",
        "optim.max_steps=1",
        "run.threads=1",
        "run.eval_every=0",
        f"run.output_dir={tmp_path}",
    ]
    result = finetune(None, overrides=overrides)
    assert result.metrics["steps"] == 1
    config = tokenprune.config_of(result.model)
    assert config.source == {
        "library": "torchvision",
        "name": "vit_b_16",
        "kwargs": {"image_size": 32, "num_classes": 4},
    }
    assert len(tokenprune.selectors(result.model)) == 3
