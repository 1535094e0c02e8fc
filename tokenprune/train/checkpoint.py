"""Training checkpoints: written atomically, complete enough that a resumed run continues exactly.

A checkpoint holds the student's weights, the learned keep ratios, optimizer, scheduler and gradient-scaler state,
the position in the data (epoch, batch within the epoch, optimizer step) and every rank's random states. It is
written to a temporary file in the same folder and moved into place with `os.replace`, so a crash (or a non-finite
loss) never leaves a half-written `last.pt`: the previous checkpoint stays intact until the new one is complete.

Everything in it is a tensor or a plain container (dict, list, tuple, str, number, bool, None), random states
included, so it is read with ``torch.load(weights_only=True)``: a file that needs anything else is refused and no
pickled code ever runs.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError
from ..io.bounds import check_nesting, check_torch_zip

__all__ = [
    "FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "rotated",
    "remove_stale_temps",
    "check_output_dir",
    "capture_rng",
    "restore_rng",
]

FORMAT = "tokenprune-train/2"  # 2: random states as tensors, read with weights_only=True


def capture_rng() -> dict[str, Any]:
    """This process's random states (torch CPU and CUDA, Python, NumPy), as tensors and plain numbers."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore states captured by `capture_rng`."""
    torch.set_rng_state(state["torch"].cpu())
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def rotated(path: str | os.PathLike[str], keep: int) -> list[Path]:
    """The files `save_checkpoint(..., keep=keep)` maintains, newest first: ``last.pt``, ``last.1.pt``, ..."""
    path = Path(path)
    return [path, *(path.with_name(f"{path.stem}.{i}{path.suffix}") for i in range(1, keep))]


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files an interrupted `save_checkpoint`/`save_recipe` left in `folder`; return them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.is_file() and (p.name.startswith(".") and p.name.endswith(".tmp"))]
    stale += [p for p in folder.glob("*.yaml.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def check_output_dir(out: Path) -> None:
    """Create `out` and check a file can be written there, before any training.

    Raises:
        ConfigError: naming the folder and the system's reason (read-only, a file in the way, no space, ...).
    """
    probe = out / f".write-test.{os.getpid()}.tmp"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"tokenprune")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"run.output_dir={out} is not a writable folder ({e.strerror or e}); choose another run.output_dir or "
            "fix its permissions."
        ) from None


def _write_error(path: Path, e: OSError) -> CheckpointError:
    return CheckpointError(
        f"cannot write checkpoint {path}: {e.strerror or e} (errno {e.errno}). The previous checkpoint there, if any, "
        "is intact; free space or fix the folder's permissions, then rerun to resume."
    )


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike[str], *, keep: int = 1) -> Path:
    """Write `payload` to `path` atomically (temporary file, fsync, `os.replace`), keeping `keep` generations.

    With ``keep > 1`` the previous file becomes ``<stem>.1<suffix>`` (and so on up to ``keep - 1``) by hard link
    before the new one replaces it, so at every instant `path` names a complete checkpoint.

    Raises:
        CheckpointError: the file cannot be written (full disk, read-only folder, ...); the previous one is intact.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        files = rotated(path, keep)
        for older, newer in zip(files[:0:-1], files[-2::-1]):  # last.1 -> last.2 first, last -> last.1 last
            if newer == path and newer.exists():
                older.unlink(missing_ok=True)
                try:
                    os.link(newer, older)
                except OSError:  # a file system without hard links
                    shutil.copy2(newer, older)
            elif newer.exists():
                os.replace(newer, older)
        os.replace(tmp, path)
    except OSError as e:
        raise _write_error(path, e) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`.

    Raises:
        CheckpointError: if the file is missing, truncated, or not a tokenprune training checkpoint, or if it would
            make the reader allocate more than it holds (compressed entries, structures shared many times over).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass run.resume=<path to last.pt> or start anew.")
    check_torch_zip(path)
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e) and "Weights only" not in str(e):
            raise CheckpointError(f"checkpoint {path} is unreadable or truncated (UnpicklingError: {e}).") from None
        raise CheckpointError(
            f"refused to read checkpoint {path}: it holds Python objects other than tensors and plain containers, "
            f"which tokenprune training checkpoints ({FORMAT}) never do; unpickling them could run code. "
            "If you trust the file (e.g. it comes from tokenprune before format 2), start the run anew instead."
        ) from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated ({type(e).__name__}: {e}).") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a tokenprune training checkpoint (expected format {FORMAT}); a run writes last.pt and "
            "final.pt. Plain weights load into a named model: tokenprune.create_model(name, checkpoint=PATH), "
            "`--checkpoint PATH` on the command line, model.checkpoint in a recipe."
        )
    check_nesting(data, path)
    return data
