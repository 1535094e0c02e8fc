"""Runs that cannot lose work or lie (#21): honest checkpoints, a resumable final phase, data checked before training
and compared on resume, every failure a tokenprune error. A tiny sparsified ViT on synthetic or tiny image folders."""

from __future__ import annotations

import copy
import errno
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_runs import SYNTHETIC, THREE_EPOCHS, TINY_VIT

from tokenprune.errors import CheckpointError, ConfigError, DataError, TrainingError
from tokenprune.train import checkpoint as checkpoint_module
from tokenprune.train import finetune
from tokenprune.train.checkpoint import load_checkpoint, save_checkpoint
from tokenprune.train.trainer import Trainer

TINY = [*TINY_VIT, *SYNTHETIC, *THREE_EPOCHS]


def _run(tmp_path, name, *extra):
    return finetune(None, overrides=[*TINY, f"run.output_dir={tmp_path / name}", *extra])


def _same_weights(a, b):
    a, b = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Interrupt(BaseException):
    """Stands for Ctrl-C / SIGKILL: not an Exception, so nothing on the way may swallow it."""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    return tmp / "full", _run(tmp, "full").metrics


# -- honest checkpoints -------------------------------------------------------------------------------------------
def test_non_finite_weights_are_never_checkpointed_and_the_error_names_the_last_good_one(tmp_path, monkeypatch):
    original = Trainer._optimizer_step

    def poison_after_step_4(self):
        original(self)
        if self.step == 3:  # the optimizer step that makes step 4
            with torch.no_grad():
                next(self.student.parameters()).fill_(float("inf"))

    monkeypatch.setattr(Trainer, "_optimizer_step", poison_after_step_4)
    with pytest.raises(TrainingError, match=r"non-finite by step 4 .*finite weights is \S+last\.pt \(step 3\)"):
        _run(tmp_path, "inf")
    out = tmp_path / "inf"
    assert [load_checkpoint(out / n)["step"] for n in ("last.pt", "last.1.pt")] == [3, 2]  # keep_checkpoints=2
    for name in ("last.pt", "last.1.pt"):
        assert all(v.isfinite().all() for v in load_checkpoint(out / name)["model"].values() if v.is_floating_point())
    assert not (out / "last.2.pt").exists() and not (out / "final.pt").exists()


def test_keep_checkpoints_rotates_and_each_file_is_one_step(tmp_path):
    _run(tmp_path, "keep", "optim.epochs=1", "run.keep_checkpoints=3")
    out = tmp_path / "keep"
    assert [load_checkpoint(out / n)["step"] for n in ("last.pt", "last.1.pt")] == [2, 1]
    assert not (out / "last.2.pt").exists()  # two steps, two checkpoints: nothing older to keep
    assert not list(out.glob(".*.tmp"))


def test_a_checkpoint_with_non_finite_weights_is_refused_on_resume(tmp_path, uninterrupted):
    ckpt = load_checkpoint(uninterrupted[0] / "last.pt")
    next(iter(ckpt["model"].values())).fill_(float("nan"))
    ckpt["step"] = 3
    save_checkpoint({k: v for k, v in ckpt.items() if k != "format"}, tmp_path / "nan" / "last.pt")
    with pytest.raises(CheckpointError, match=r"non-finite weights .*last\.1\.pt"):
        _run(tmp_path, "nan")


@pytest.mark.parametrize(
    "key, value, words",
    [("step", -5, "'step' is -5"), ("step", 2.5, "'step'"), ("step", True, "'step'"), ("keep_ratios", [2.0], "keep")],
)
def test_crafted_checkpoint_values_are_refused(tmp_path, uninterrupted, key, value, words):
    ckpt = load_checkpoint(uninterrupted[0] / "last.pt")
    ckpt[key] = value
    save_checkpoint({k: v for k, v in ckpt.items() if k != "format"}, tmp_path / "c" / "last.pt")
    with pytest.raises(CheckpointError, match=words):
        _run(tmp_path, "c")


def test_a_checkpoint_past_the_end_is_refused(tmp_path, uninterrupted):
    with pytest.raises(ConfigError, match=r"step 6, past this recipe's 4 steps"):
        _run(tmp_path, "short", "optim.epochs=2", f"run.resume={uninterrupted[0] / 'last.pt'}")


# -- the final phase is a resumable step ---------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["final evaluation", "writing final.pt"])
def test_interrupted_final_phase_completes_on_rerun_bitwise(tmp_path, monkeypatch, uninterrupted, where):
    full_dir, full_metrics = uninterrupted
    if where == "final evaluation":
        original = Trainer.evaluate_metrics

        def interrupt(self, model):
            if self.step == self.total_steps and model is self.student:
                raise _Interrupt
            return original(self, model)

        monkeypatch.setattr(Trainer, "evaluate_metrics", interrupt)
    else:
        original_save = checkpoint_module.torch.save

        def interrupt(obj, f, *a, **k):
            if "final.pt" in getattr(f, "name", ""):
                f.write(b"half a file")
                raise _Interrupt
            return original_save(obj, f, *a, **k)

        monkeypatch.setattr(checkpoint_module.torch, "save", interrupt)
    with pytest.raises(_Interrupt):
        _run(tmp_path, "cut")
    out = tmp_path / "cut"
    assert load_checkpoint(out / "last.pt")["step"] == 6 and not (out / "final.pt").exists()
    monkeypatch.undo()
    if where == "writing final.pt":
        assert list(out.glob(".final.pt.*.tmp")) == []  # removed by save_checkpoint's cleanup or at start
    resumed = _run(tmp_path, "cut")
    assert resumed.metrics == full_metrics
    assert _same_weights(full_dir / "final.pt", out / "final.pt")
    finals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in finals]
    assert kinds.count("final") == 1 and kinds.count("train") == 6  # the rerun trained nothing again


def test_stale_temp_files_are_removed_at_start(tmp_path):
    out = tmp_path / "stale"
    out.mkdir()
    (out / ".last.pt.12345.tmp").write_bytes(b"x" * 100)
    (out / "recipe.yaml.tmp").write_text("half")
    (out / "notes.txt").write_text("mine")
    _run(tmp_path, "stale", "optim.epochs=1")
    assert not (out / ".last.pt.12345.tmp").exists() and not (out / "recipe.yaml.tmp").exists()
    assert (out / "notes.txt").read_text() == "mine"


# -- failures are tokenprune errors ---------------------------------------------------------------------------------
def test_full_disk_keeps_the_previous_checkpoint_and_names_the_file(tmp_path, monkeypatch):
    original_save = checkpoint_module.torch.save
    calls = {"n": 0}

    def enospc_on_third(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint_module.torch, "save", enospc_on_third)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint \S+last\.pt: No space left on device"):
        _run(tmp_path, "full")
    assert load_checkpoint(tmp_path / "full" / "last.pt")["step"] == 2
    assert not list((tmp_path / "full").glob(".*.tmp"))


def test_unusable_output_dir_and_device_are_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(ConfigError, match=r"run.output_dir=\S+file/run is not a writable folder"):
        finetune(None, overrides=[*TINY, f"run.output_dir={tmp_path / 'file' / 'run'}"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            _run(tmp_path, "cuda", "run.device=cuda")
    with pytest.raises(ConfigError, match="run.device"):
        _run(tmp_path, "tpu", "run.device=tpu")


# -- data checked before training, compared on resume ------------------------------------------------------------
IMAGES = [
    "model.kwargs={img_size: 16, patch_size: 4, embed_dim: 32, depth: 4, num_heads: 2, num_classes: 2, in_chans: 3}",
    "data.source=imagefolder",
    "optim.epochs=1",
]


def _folder(root, classes=("a", "b"), n=16, val_classes=None):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, names in (("train", classes), ("val", val_classes or classes)):
        for c in names:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize(
    "damage, mode",
    [(lambda p: p.write_bytes(b""), "header"), (lambda p: p.write_bytes(p.read_bytes()[:60]), "full")],
    ids=["empty", "truncated"],
)
def test_a_bad_image_is_named_before_the_teacher_is_evaluated(tmp_path, monkeypatch, damage, mode):
    def evaluated(*_):
        raise AssertionError("the teacher was evaluated before the data was checked")

    monkeypatch.setattr(Trainer, "evaluate_metrics", evaluated)
    root = _folder(tmp_path / "data")
    bad = root / "val" / "b" / "3.png"
    damage(bad)
    with pytest.raises(DataError, match=rf"image {bad} cannot be read"):
        _run(tmp_path, "bad", *IMAGES, f"data.root={root}", f"data.check_images={mode}")
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()  # nothing trained, nothing evaluated


def test_validation_classes_must_match_training_classes(tmp_path):
    root = _folder(tmp_path / "data", classes=("a", "b"), val_classes=("a", "c"))
    with pytest.raises(DataError, match=r"only in training: \['b'\]; only in validation: \['c'\]"):
        _run(tmp_path, "cls", *IMAGES, f"data.root={root}")


def test_resume_on_other_data_is_refused_but_moved_data_is_fine(tmp_path, monkeypatch):
    first = _folder(tmp_path / "first")
    original = Trainer._optimizer_step
    calls = {"n": 0}

    def crash_on_second(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Interrupt
        original(self)

    monkeypatch.setattr(Trainer, "_optimizer_step", crash_on_second)
    with pytest.raises(_Interrupt):
        _run(tmp_path, "run", *IMAGES, f"data.root={first}")
    monkeypatch.undo()
    other = _folder(tmp_path / "other", n=17)
    with pytest.raises(ConfigError, match=r"other data .*train count: 32 -> 34"):
        _run(tmp_path, "run", *IMAGES, f"data.root={other}")
    moved = tmp_path / "moved"
    first.rename(moved)
    assert _run(tmp_path, "run", *IMAGES, f"data.root={moved}").metrics["steps"] == 2


def test_an_image_that_fails_in_a_worker_is_named_in_one_line(tmp_path):
    root = _folder(tmp_path / "data")
    bad = root / "train" / "a" / "5.png"
    bad.write_bytes(bad.read_bytes()[:80])  # the header is intact: only decoding finds it
    with pytest.raises(DataError) as info:
        _run(tmp_path, "w", *IMAGES, f"data.root={root}", "data.workers=1")
    assert str(info.value).startswith(f"image {bad} cannot be read") and "\n" not in str(info.value)


# -- real signals: a separate process is killed at a phase, then the run is resumed here ------------------------
_KILLER = """
import json, os, signal, sys
import tokenprune.train.checkpoint as C
from tokenprune.train import finetune
from tokenprune.train.trainer import Trainer

phase, sig, overrides = sys.argv[1], getattr(signal, sys.argv[2]), json.loads(sys.argv[3])
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (xdist workers ignore SIGINT)
kill = lambda: os.kill(os.getpid(), sig)
if phase == "final evaluation":
    evaluate = Trainer.evaluate_metrics
    def patched(self, model):
        if self.step == self.total_steps and model is self.student:
            kill()
        return evaluate(self, model)
    Trainer.evaluate_metrics = patched
else:  # the write of a checkpoint file: half of it is on disk when the signal comes
    name, save = phase.split()[-1], C.torch.save
    def patched(obj, f, *a, **k):
        if os.path.basename(f.name).startswith("." + name) and (name != "last.pt" or obj["step"] == 4):
            f.write(b"half a checkpoint"); f.flush(); kill()
        return save(obj, f, *a, **k)
    C.torch.save = patched
finetune(None, overrides=overrides)
"""


@pytest.mark.slow  # a subprocess per case, killed by a real signal
@pytest.mark.parametrize(
    "phase, sig",
    [("final evaluation", "SIGINT"), ("writing final.pt", "SIGKILL"), ("writing last.pt", "SIGKILL")],
)
def test_killed_at_a_phase_then_resumed_equals_uninterrupted(tmp_path, uninterrupted, phase, sig):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    full_dir, full_metrics = uninterrupted
    out = tmp_path / "killed"
    overrides = json.dumps([*TINY, f"run.output_dir={out}"])
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLER, phase, sig, overrides],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -getattr(signal, sig), proc.stderr[-2000:]
    assert not (out / "final.pt").exists()
    if sig == "SIGKILL":
        assert list(out.glob(".*.pt.*.tmp")), "a killed write leaves its temporary file"
    step = load_checkpoint(out / "last.pt")["step"]
    assert step == (3 if phase == "writing last.pt" else 6)  # the file before the killed write, intact
    resumed = _run(tmp_path, "killed")
    assert resumed.metrics == full_metrics
    assert _same_weights(full_dir / "final.pt", out / "final.pt")
    assert not list(out.glob(".*.tmp"))


@pytest.mark.slow  # over 2 s on 2 cores: the full run covers it, the inner loop (-m 'not slow') skips it
def test_a_fresh_run_over_a_finished_one_writes_its_own_result(tmp_path):
    _run(tmp_path, "twice", "optim.epochs=1")
    out = tmp_path / "twice"
    first = out.joinpath("final.pt").stat().st_mtime_ns
    _run(tmp_path, "twice", "optim.epochs=1", "run.resume=none")  # trains anew: never the old final.pt's result
    assert out.joinpath("final.pt").stat().st_mtime_ns != first
    kinds = [json.loads(line)["kind"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("final") == 2 and kinds.count("teacher") == 2


_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.lists(st.one_of(st.integers(-2, 2), st.floats(-1, 2)), max_size=4),
    st.dictionaries(st.sampled_from(["torch", "python", "numpy", "state", "x"]), st.integers(), max_size=3),
)


@pytest.fixture(scope="module")
def trainer(uninterrupted, tmp_path_factory):
    """A Trainer of the TINY run (to restore fuzzed checkpoints into) and a valid checkpoint of it."""
    import tokenprune
    from tokenprune.train.api import _coerce_recipe, build_teacher
    from tokenprune.train.data import build_datasets
    from tokenprune.train.distributed import init_distributed

    out = tmp_path_factory.mktemp("fuzz")
    recipe = _coerce_recipe(None, [*TINY, f"run.output_dir={out}", "run.resume=none"])
    teacher = build_teacher(recipe)
    student = tokenprune.sparsify(teacher.eval(), locations=[1, 2, 3], example_inputs=torch.randn(1, 1, 16, 16))
    data = build_datasets(recipe.data, img_size=16, in_chans=1, seed=0)
    return Trainer(recipe, student, teacher, data, init_distributed("cpu")), load_checkpoint(
        uninterrupted[0] / "last.pt"
    )


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
@pytest.mark.slow  # over 2 s on 2 cores: the full run covers it, the inner loop (-m 'not slow') skips it
def test_a_fuzzed_checkpoint_resumes_or_is_refused_as_a_checkpoint_error(trainer, tmp_path, data):
    trainer, valid = trainer
    ckpt = copy.deepcopy({k: v for k, v in valid.items() if k != "format"})
    path_keys = data.draw(
        st.sampled_from(
            [
                ("step",),
                ("keep_ratios",),
                ("teacher_top1",),
                ("rng",),
                ("model",),
                ("optimizer",),
                ("scheduler",),
                ("scaler",),
                ("rng", 0, "torch"),
                ("rng", 0, "python"),
                ("rng", 0, "numpy", "keys"),
                ("data",),
                ("recipe",),
            ]
        )
    )
    node = ckpt
    for k in path_keys[:-1]:
        node = node[k]
    node[path_keys[-1]] = data.draw(_JUNK)
    path = tmp_path / "f" / "last.pt"
    try:
        save_checkpoint(ckpt, path)
        trainer.resume(path)
    except CheckpointError:
        return
    # accepted: what was restored is a state training can continue from
    assert type(trainer.step) is int and trainer.step >= 0
    assert all(0 < s.keep_ratio <= 1 for s in trainer.selectors())
    assert all(v.isfinite().all() for v in trainer.student.state_dict().values() if v.is_floating_point())
