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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint", "capture_rng", "restore_rng"]

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


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write `payload` to `path` atomically (temporary file, fsync, `os.replace`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`.

    Raises:
        CheckpointError: if the file is missing, truncated, or not a tokenprune training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass run.resume=<path to last.pt> or start anew.")
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
        raise CheckpointError(f"{path} is not a tokenprune training checkpoint (expected format {FORMAT}).")
    return data
