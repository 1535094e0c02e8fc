"""A run's state on disk: what `last.pt` holds, which checkpoint a run continues from, and restoring it exactly.

``run.resume: auto`` continues from ``output_dir/last.pt`` only when that file belongs to the same run: a checkpoint
written under a different recipe (another model, loss, schedule...) or over different data (its fingerprint: class
list, file count, a hash of the names) is refused with the differences listed. Keys that change how a run executes
but not what it computes (threads, workers, logging, where the data lives) may differ. A checkpoint whose run has
trained all its steps continues into the final phase only (docs/design.md §8).

Every checkpoint written holds finite weights (`save_state` refuses others), and every checkpoint read is checked
key by key before anything is restored from it (`check_checkpoint`).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckpointError, ConfigError, TokenPruneError, TrainingError
from .checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from .distributed import all_gather_objects, barrier
from .recipe import Recipe

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = [
    "OPERATIONAL_KEYS",
    "recipe_differences",
    "check_checkpoint",
    "non_finite",
    "last_good_hint",
    "find_resume",
    "save_state",
    "restore_state",
    "stored_result",
]

#: Recipe keys that may change between an interrupted run and its continuation (they do not change the result).
OPERATIONAL_KEYS = frozenset(
    {
        "run.resume",
        "run.output_dir",
        "run.threads",
        "run.log_every",
        "run.checkpoint_every",
        "run.device",
        "run.keep_checkpoints",
        "data.workers",
        "data.root",  # the data itself is compared by its fingerprint
        "data.check_images",
    }
)

_OFF = (None, False, "none", "false", "no", "")
_AUTO = (True, "auto", "true", "yes")


def _plain(value: Any) -> Any:
    """Tuples become lists at every depth (a recipe read back from a checkpoint may hold either)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _flatten(data: dict[str, Any]) -> dict[str, Any]:
    """``{"section.key": value}``; free-form values (model.kwargs, data.augment) are compared whole."""
    out = {}
    for section, values in data.items():
        if isinstance(values, dict):
            out.update({f"{section}.{k}": _plain(v) for k, v in values.items()})
        else:
            out[section] = _plain(values)
    return out


def recipe_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"section.key: saved -> current"`` for every recipe key that differs, operational keys aside."""
    a, b = _flatten(saved), _flatten(current)
    keys = sorted((set(a) | set(b)) - OPERATIONAL_KEYS)
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in keys if a.get(k) != b.get(k)]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def non_finite(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors in `state` that hold a NaN or an infinity."""
    return [
        k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not v.isfinite().all()
    ]


def check_checkpoint(ckpt: dict[str, Any], path: Path) -> None:
    """Check every key `restore_state` reads, before anything is restored.

    Raises:
        CheckpointError: naming the file and the key that is missing or wrong.
    """

    def bad(key: str, problem: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: '{key}' {problem}; it was not written by this tokenprune run.")

    step = ckpt.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise bad("step", f"is {step!r}, not an optimizer step count >= 0")
    for key in ("model", "optimizer", "scheduler", "scaler", "recipe"):
        if not isinstance(ckpt.get(key), dict):
            raise bad(key, f"is {type(ckpt.get(key)).__name__}, not a mapping")
    if not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        raise bad("model", "holds values that are not tensors")
    ratios = ckpt.get("keep_ratios")
    if not isinstance(ratios, list) or not all(_number(r) and 0 < r <= 1 for r in ratios):
        raise bad("keep_ratios", f"is {ratios!r}, not a list of keep ratios in (0, 1]")
    for key in ("teacher_top1", "best_top1"):
        if ckpt.get(key) is not None and not _number(ckpt.get(key)):
            raise bad(key, f"is {ckpt.get(key)!r}, not a finite score or null")
    rng = ckpt.get("rng")
    if not isinstance(rng, list) or not rng or not all(isinstance(r, dict) for r in rng):
        raise bad("rng", "is not a list of random states, one per process")
    if ckpt.get("data") is not None and not isinstance(ckpt["data"], dict):
        raise bad("data", "is not a data fingerprint")
    bad_weights = non_finite(ckpt["model"])
    if bad_weights:
        raise CheckpointError(
            f"checkpoint {path} holds non-finite weights ({len(bad_weights)} of {len(ckpt['model'])} tensors, e.g. "
            f"{bad_weights[0]}); resume from an older one (run.resume={path.with_name(path.stem + '.1' + path.suffix)}"
            ", kept by run.keep_checkpoints) or start anew."
        )


def _data_differences(saved: dict[str, Any] | None, current: dict[str, Any] | None) -> list[str]:
    if saved is None or current is None:
        return []  # a checkpoint from before fingerprints, or data given without one
    out = []
    for split in sorted(set(saved) | set(current)):
        a, b = saved.get(split) or {}, current.get(split) or {}
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                shown = (a.get(k), b.get(k)) if k != "classes" else (len(a.get(k) or []), len(b.get(k) or []))
                what = f"{split} {k}" + (" (count)" if k == "classes" else "")
                out.append(f"{what}: {shown[0]!r} -> {shown[1]!r}")
    return out


def find_resume(
    recipe: Recipe, total_steps: int, map_location: Any = "cpu", data: dict[str, Any] | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint this run continues from (path and contents), or ``None`` to start anew.

    A checkpoint at exactly `total_steps` is returned too: the run then does its final phase only.

    Args:
        recipe: this run's recipe.
        total_steps: this run's optimizer steps.
        map_location: where tensors are loaded.
        data: this run's data fingerprint (`data.fingerprint`), compared with the checkpoint's.

    Raises:
        ConfigError: ``resume: auto`` finds a `last.pt` of a different recipe; the checkpoint was trained on other
            data, or is past this run's `total_steps`.
        CheckpointError: the checkpoint is unreadable, foreign, holds more than tensors and plain containers, has
            a malformed key or non-finite weights.
    """
    resume, out = recipe.run.resume, Path(recipe.run.output_dir)
    if resume in _OFF:
        return None
    auto = resume in _AUTO
    path = out / "last.pt" if auto else Path(resume)
    if auto and not path.is_file():
        return None
    ckpt = load_checkpoint(path, map_location=map_location)
    check_checkpoint(ckpt, path)
    diffs = recipe_differences(ckpt["recipe"], recipe.to_dict())
    if diffs and auto:
        raise ConfigError(
            f"run.output_dir={out} holds a run of a different recipe ({'; '.join(diffs)}), and run.resume=auto would "
            f"continue it. Choose another run.output_dir, or set run.resume=none to start anew there (its last.pt "
            f"is overwritten), or run.resume={path} to continue that checkpoint under the new recipe."
        )
    if diffs:
        warnings.warn(f"resuming {path} under a different recipe: {'; '.join(diffs)}.", UserWarning, stacklevel=2)
    data_diffs = _data_differences(ckpt.get("data"), data)
    if data_diffs:
        raise ConfigError(
            f"the run in {path} was trained on other data than data.root={recipe.data.root} holds "
            f"({'; '.join(data_diffs)}); continuing would mix two datasets. Point data.root at the run's data, or "
            "choose another run.output_dir (or run.resume=none) to train on this data anew."
        )
    step = ckpt["step"]
    if step > total_steps:
        raise ConfigError(
            f"the checkpoint {path} is at optimizer step {step}, past this recipe's {total_steps} steps; raise "
            "optim.epochs or optim.max_steps to continue it, or set run.resume=none to start anew."
        )
    return path, ckpt


def last_good_hint(trainer: Trainer) -> str:
    """Which checkpoint to resume from after a failure: the last one written (or resumed) in this run."""
    if trainer.last_good is None:
        return "No checkpoint with finite weights has been written yet"
    path, step = trainer.last_good
    return f"The last checkpoint with finite weights is {path} (step {step}); resume with run.resume={path}"


def _payload(trainer: Trainer) -> dict[str, Any]:
    config = trainer.config
    return {
        "model": trainer.student.state_dict(),
        "ratios": trainer.ratios.state_dict() if trainer.ratios is not None else None,
        "keep_ratios": [float(s.keep_ratio) for s in trainer.selectors()],
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "step": trainer.step,
        "teacher_top1": trainer.teacher_top1,
        "best_top1": trainer.best_top1,
        "recipe": trainer.recipe.to_dict(),
        "sparsify_config": config.to_dict() if config is not None else None,
        "data": trainer.data_fingerprint,
    }


def stored_result(trainer: Trainer) -> dict[str, Any] | None:
    """The metrics in the run's `final.pt` when it is this run's result (same recipe, step and data), else ``None``."""
    path = trainer.out / "final.pt"
    if not path.is_file():
        return None
    try:
        final = load_checkpoint(path, map_location="cpu")
    except TokenPruneError:
        return None  # unreadable: the final phase is redone from last.pt and rewrites it
    same = (
        final.get("step") == trainer.step
        and final.get("data") == trainer.data_fingerprint
        and not recipe_differences(final.get("recipe") or {}, trainer.recipe.to_dict())
    )
    return final.get("metrics") if same and isinstance(final.get("metrics"), dict) else None


def save_state(trainer: Trainer, name: str = "last.pt") -> Path:
    """Checkpoint the run (all ranks must call: random states are gathered; rank 0 writes).

    The last `run.keep_checkpoints` files are kept (last.pt, last.1.pt, ...), each with finite weights.

    Raises:
        TrainingError: the weights are no longer finite (nothing is written; the message names the last good file).
        CheckpointError: the file cannot be written.
    """
    payload = _payload(trainer)
    bad = non_finite({**payload["model"], **(payload["ratios"] or {})})
    if bad:
        raise TrainingError(
            f"the weights became non-finite by step {trainer.step} ({len(bad)} tensors, e.g. {bad[0]}), so no "
            f"checkpoint was written. {last_good_hint(trainer)}; lower optim.lr, set optim.clip_grad or "
            "run.amp=false, or check the data first."
        )
    rngs = all_gather_objects(capture_rng(), trainer.info)
    path = trainer.out / name
    if trainer.info.main:
        payload = {**payload, "rng": rngs, "world": trainer.info.world}
        save_checkpoint(payload, path, keep=trainer.recipe.run.keep_checkpoints)
    barrier(trainer.info)
    trainer.last_good = (path, trainer.step)
    return path


def restore_state(trainer: Trainer, ckpt: dict[str, Any], path: Path | None = None) -> None:
    """Restore everything a checkpoint holds (checked by `check_checkpoint`), so training continues exactly.

    Raises:
        CheckpointError: the checkpoint does not fit this run's model, optimizer or random states.
    """
    try:
        trainer.student.load_state_dict(ckpt["model"])
        for sel, r in zip(trainer.selectors(), ckpt["keep_ratios"], strict=True):
            sel.keep_ratio = float(r)
        if trainer.ratios is not None and ckpt.get("ratios") is not None:
            trainer.ratios.load_state_dict(ckpt["ratios"])
        trainer.optimizer.load_state_dict(ckpt["optimizer"])
        trainer.scheduler.load_state_dict(ckpt["scheduler"])
        trainer.scaler.load_state_dict(ckpt["scaler"])
        rngs = ckpt["rng"]
        restore_rng(rngs[trainer.info.rank] if len(rngs) == trainer.info.world else rngs[0])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(
            f"checkpoint {path or '(given)'} does not fit this run ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "it was written for another model or optimizer. Set run.resume=none to start anew."
        ) from None
    trainer.step, trainer.teacher_top1, trainer.best_top1 = ckpt["step"], ckpt["teacher_top1"], ckpt["best_top1"]
    if path is not None:
        trainer.last_good = (path, trainer.step)
