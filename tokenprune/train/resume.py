"""A run's state on disk: what `last.pt` holds, which checkpoint a run continues from, and restoring it exactly.

``run.resume: auto`` continues from ``output_dir/last.pt`` only when that file belongs to the same run: a checkpoint
written under a different recipe (another model, loss, schedule...) is refused with the differences listed, and so
is one whose run already finished, rather than "resuming" it into zero steps. Keys that change how a run executes but
not what it computes (threads, workers, logging, where the data lives) may differ.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from .distributed import all_gather_objects, barrier
from .recipe import Recipe

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["OPERATIONAL_KEYS", "recipe_differences", "find_resume", "save_state", "restore_state"]

#: Recipe keys that may change between an interrupted run and its continuation (they do not change the result).
OPERATIONAL_KEYS = frozenset(
    {
        "run.resume",
        "run.output_dir",
        "run.threads",
        "run.log_every",
        "run.checkpoint_every",
        "run.device",
        "data.workers",
        "data.root",
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


def find_resume(recipe: Recipe, total_steps: int, map_location: Any = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint this run continues from (path and contents), or ``None`` to start anew.

    Raises:
        ConfigError: ``resume: auto`` finds a `last.pt` of a different recipe, or the checkpoint's run has already
            reached `total_steps`.
        CheckpointError: the checkpoint is unreadable, foreign, or holds more than tensors and plain containers.
    """
    resume, out = recipe.run.resume, Path(recipe.run.output_dir)
    if resume in _OFF:
        return None
    auto = resume in _AUTO
    path = out / "last.pt" if auto else Path(resume)
    if auto and not path.is_file():
        return None
    ckpt = load_checkpoint(path, map_location=map_location)
    diffs = recipe_differences(ckpt.get("recipe") or {}, recipe.to_dict())
    if diffs and auto:
        raise ConfigError(
            f"run.output_dir={out} holds a run of a different recipe ({'; '.join(diffs)}), and run.resume=auto would "
            f"continue it. Choose another run.output_dir, or set run.resume=none to start anew there (its last.pt "
            f"is overwritten), or run.resume={path} to continue that checkpoint under the new recipe."
        )
    if diffs:
        warnings.warn(f"resuming {path} under a different recipe: {'; '.join(diffs)}.", UserWarning, stacklevel=2)
    step = int(ckpt["step"])
    if step >= total_steps:
        raise ConfigError(
            f"the run in {path} has already finished ({step} of {total_steps} optimizer steps; its model is in "
            f"{path.with_name('final.pt')}), so resuming would train zero steps. To train it longer, raise "
            f"optim.epochs or optim.max_steps and set run.resume={path}; to train again, choose another "
            "run.output_dir or set run.resume=none."
        )
    return path, ckpt


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
    }


def save_state(trainer: Trainer, name: str = "last.pt") -> Path:
    """Checkpoint the run (all ranks must call: random states are gathered; rank 0 writes)."""
    rngs = all_gather_objects(capture_rng(), trainer.info)
    path = trainer.out / name
    if trainer.info.main:
        save_checkpoint({**_payload(trainer), "rng": rngs, "world": trainer.info.world}, path)
    barrier(trainer.info)
    return path


def restore_state(trainer: Trainer, ckpt: dict[str, Any]) -> None:
    """Restore everything a checkpoint holds, so training continues exactly."""
    trainer.student.load_state_dict(ckpt["model"])
    for sel, r in zip(trainer.selectors(), ckpt["keep_ratios"], strict=True):
        sel.keep_ratio = float(r)
    if trainer.ratios is not None and ckpt.get("ratios") is not None:
        trainer.ratios.load_state_dict(ckpt["ratios"])
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    trainer.scheduler.load_state_dict(ckpt["scheduler"])
    trainer.scaler.load_state_dict(ckpt["scaler"])
    trainer.step, trainer.teacher_top1, trainer.best_top1 = ckpt["step"], ckpt["teacher_top1"], ckpt["best_top1"]
    rngs = ckpt["rng"]
    restore_rng(rngs[trainer.info.rank] if len(rngs) == trainer.info.world else rngs[0])
