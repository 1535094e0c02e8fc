"""Reading plain weight files (other tools' checkpoints) without executing anything, and checking they fit a model.

A tokenprune model file is a different thing: see `tokenprune.io.model_file`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from .bounds import check_nesting, check_torch_zip

__all__ = [
    "FORMAT",
    "read_metadata",
    "read_weights",
    "read_pickle",
    "tensor_dict",
    "load_weights",
    "check_fit",
    "require_file",
    "SAVE_HINT",
]

_WRAPPERS = ("state_dict", "model", "model_state_dict", "module")
#: The `format` header value of a sparsified model file (`io/model_file.py`).
FORMAT = "tokenprune"
SAVE_HINT = "create it with tokenprune.save(model, path) (or `tokenprune convert`)"


def require_file(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file; check the path.")


def tensor_dict(state: Any, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap {"state_dict": ...}/{"model": ...} wrappers and DDP's "module." prefixes; check it holds tensors."""
    for _ in range(2):  # e.g. {"model": {"state_dict": ...}}
        if isinstance(state, dict):
            inner = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), dict)), None)
            if inner is not None:
                state = inner
    if not isinstance(state, dict) or not state:
        raise CheckpointError(
            f"{path} holds {type(state).__name__}, not a state dict of tensors; save model.state_dict() instead."
        )
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors at its top level or under {', '.join(_WRAPPERS)}.")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str] | None:
    """The string metadata of a safetensors file's header (None when it has none).

    Raises:
        CheckpointError: if the file is missing, truncated or not a safetensors file.
    """
    from safetensors import safe_open

    path = Path(path)
    require_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata()
    except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError, OSError, ...
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); it may be truncated or of another "
            f"format. Re-create it: {SAVE_HINT}."
        ) from None


def read_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch pickle (``.pth``/``.pt``/``.bin``), executing nothing.

    Pickles are read with ``torch.load(weights_only=True)``, which refuses any object that would run code on
    unpickling. Wrappers ``{"state_dict": ...}``, ``{"model": ...}`` and DDP's ``module.`` prefix are removed.

    Raises:
        CheckpointError: missing, truncated or unreadable files, refused pickles, files without tensors, files that
            would allocate more than they hold (`tokenprune.io.bounds`).
    """
    path = Path(path)
    require_file(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        read_metadata(path)  # a clear message for truncated and foreign files
        try:
            return tensor_dict(load_file(str(path)), path)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path} could not be read as safetensors ({type(e).__name__}: {e}).") from None
    return tensor_dict(read_pickle(path), path)


def read_pickle(path: Path, allowed: tuple[type, ...] = ()) -> Any:
    """The object a torch pickle holds, read with ``weights_only=True`` (tensors and plain containers, and the
    classes in `allowed`, which must be plain records that run nothing when rebuilt), bounded (`tokenprune.io.bounds`).

    Raises:
        CheckpointError: as `read_weights`.
    """
    check_torch_zip(path)
    safe = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        with safe(list(allowed)) if safe is not None and allowed else contextlib.nullcontext():
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it contains pickled objects other than tensors and plain containers, which "
            f"could run code when unpickled ({str(e).splitlines()[0]}). Nothing from it was executed. If you trust "
            "the file, re-save only its tensors (torch.save(model.state_dict(), ...) or safetensors)."
        ) from None
    except Exception as e:  # noqa: BLE001 - truncated zips raise RuntimeError, others EOFError/OSError
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint ({type(e).__name__}: {str(e).splitlines()[0]}); it may be "
            "truncated or of another format."
        ) from None
    check_nesting(state, path)
    return state


def check_fit(expected: dict[str, Any], state: dict[str, Any], path: Path, what: str) -> None:
    """Raise a CheckpointError naming missing/unexpected keys and shape mismatches, or return if `state` fits.

    Args:
        expected: a model's state dict (tensors, or anything with ``.shape``: meta tensors, safetensors slices).
        state: the file's tensors (or their shapes, as ``torch.Size``/lists).
        path: the file, for the message.
        what: the model, for the message.
    """

    def shape(v: Any) -> list[int]:
        return list(v.shape) if hasattr(v, "shape") else list(v)

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {shape(state[k])} vs {shape(v)}"
        for k, v in expected.items()
        if k in state and shape(state[k]) != shape(v)
    ]
    if not (missing or unexpected or shapes):
        return

    def few(items: list[str]) -> str:
        return ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")

    problems = [
        f"{len(missing)} missing keys ({few(missing)})" if missing else "",
        f"{len(unexpected)} unexpected keys ({few(unexpected)})" if unexpected else "",
        f"{len(shapes)} shape mismatches (file vs model: {few(shapes)})" if shapes else "",
    ]
    raise CheckpointError(
        f"{path} does not fit {what}: {'; '.join(p for p in problems if p)}. It was saved for another architecture "
        "or configuration; use the model name and keyword arguments (e.g. num_classes, img_size) it was trained with."
    )


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a plain weight file (see `read_weights`) into `model`, strictly. Returns `model`.

    Raises:
        CheckpointError: unreadable file, or keys/shapes that do not fit the model.
    """
    from ..fx.tracing import model_name

    path = Path(path)
    if path.suffix == ".safetensors" and (read_metadata(path) or {}).get("format") == FORMAT:
        raise CheckpointError(
            f"{path} is a sparsified tokenprune model, not dense weights; use it directly "
            "(tokenprune.load, `tokenprune report/export PATH`)."
        )
    state = read_weights(path)
    check_fit(model.state_dict(), state, path, model_name(model))
    model.load_state_dict(state, strict=True)
    return model
