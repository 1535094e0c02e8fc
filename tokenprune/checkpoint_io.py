"""Saving and loading sparsified models, and reading plain weight files without executing anything.

File format (``tokenprune``, version 1): one safetensors file. Its tensors are the sparsified model's state dict
(original weights under their original names, plus the stages' predictors); its header metadata holds::

    format          "tokenprune"
    format_version  "1"
    tokenprune      the writing tokenprune version
    source          JSON: {"library": "timm" | "torchvision", "name": str, "kwargs": {...}}
    config          JSON: `SparsifyConfig.to_dict()` with the keep ratios the stages held when saved

`load` rebuilds the original architecture from ``source`` (`tokenprune.create_model`), re-applies `sparsify` with
the recorded locations and keep ratios at the recorded input size, and loads the tensors strictly. safetensors holds
only tensors and strings, so loading never runs code from the file.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import SparsifyConfig
from .errors import CheckpointError, ConfigError, TokenPruneError

__all__ = ["FORMAT", "FORMAT_VERSION", "save", "load", "load_original", "read_metadata", "read_weights", "load_weights"]

FORMAT = "tokenprune"
FORMAT_VERSION = 1
_WRAPPERS = ("state_dict", "model", "model_state_dict", "module")
_SAVE_HINT = "create it with tokenprune.save(model, path) (or `tokenprune convert`)"


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file; check the path.")


def _tensor_dict(state: Any, path: Path) -> dict[str, torch.Tensor]:
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
    _require_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata()
    except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError, OSError, ...
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); it may be truncated or of another "
            f"format. Re-create it: {_SAVE_HINT}."
        ) from None


def read_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch pickle (``.pth``/``.pt``/``.bin``), executing nothing.

    Pickles are read with ``torch.load(weights_only=True)``, which refuses any object that would run code on
    unpickling. Wrappers ``{"state_dict": ...}``, ``{"model": ...}`` and DDP's ``module.`` prefix are removed.

    Raises:
        CheckpointError: missing, truncated or unreadable files, refused pickles, files without tensors.
    """
    path = Path(path)
    _require_file(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        read_metadata(path)  # a clear message for truncated and foreign files
        try:
            return _tensor_dict(load_file(str(path)), path)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path} could not be read as safetensors ({type(e).__name__}: {e}).") from None
    try:
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
    return _tensor_dict(state, path)


def _check_fit(model: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Raise a CheckpointError naming missing/unexpected keys and shape mismatches, or return if `state` fits."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {list(state[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
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
    path = Path(path)
    if path.suffix == ".safetensors" and (read_metadata(path) or {}).get("format") == FORMAT:
        raise CheckpointError(
            f"{path} is a sparsified tokenprune model, not dense weights; use it directly "
            "(tokenprune.load, `tokenprune report/export PATH`)."
        )
    state = read_weights(path)
    from .fx.tracing import model_name

    _check_fit(model, state, path, model_name(model))
    model.load_state_dict(state, strict=True)
    return model


def save(model: nn.Module, path: str | os.PathLike[str], *, source: dict[str, Any] | None = None) -> Path:
    """Save a sparsified model: architecture source, sparsify configuration (learned keep ratios included), weights.

    Args:
        model: a `tokenprune.sparsify` result.
        path: the file to write (``.safetensors`` is the natural suffix); written atomically.
        source: how to rebuild the original architecture, ``{"library": "timm" | "torchvision", "name": ...,
            "kwargs": {...}}``; default: the one recorded when the model came from `tokenprune.create_model`.

    Returns:
        The path written.

    Raises:
        ConfigError: when no source is known or it is malformed.
        TokenPruneError: when `model` is not sparsified.
    """
    from safetensors.torch import save_file

    from .models import model_source
    from .sparsify import config_of

    config = config_of(model)
    source = source if source is not None else config.source
    if source is None:
        raise ConfigError(
            f"cannot save {config.model_name or type(model).__name__}: it records no architecture source, so the file "
            "could not be loaded again. Create the model with tokenprune.create_model(name, ...) before sparsify, or "
            "pass source={'library': 'timm', 'name': '<timm name>', 'kwargs': {...}} to save."
        )
    if not isinstance(source, dict):
        raise ConfigError(f"source={source!r} must be a dict with 'library', 'name' and 'kwargs'.")
    source = model_source(source.get("library"), source.get("name"), source.get("kwargs"))
    data = config.to_dict()
    data["source"] = source
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    from . import __version__

    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "tokenprune": __version__,
        "source": json.dumps(source),
        "config": json.dumps(data),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def _parse(path: Path) -> tuple[dict[str, Any], SparsifyConfig]:
    meta = read_metadata(path) or {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a tokenprune model: its safetensors header has no tokenprune metadata (plain weights?). "
            f"Load plain weights with tokenprune.create_model(name, checkpoint=PATH) or `--checkpoint PATH`; "
            f"a sparsified model file is made by tokenprune.save or `tokenprune convert`."
        )
    version = meta.get("format_version", "")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} uses tokenprune format version {version!r}; this tokenprune reads up to {FORMAT_VERSION}. "
            "Upgrade tokenprune."
        )
    try:
        source = json.loads(meta["source"])
        config = SparsifyConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path} has malformed tokenprune metadata ({type(e).__name__}: {e}).") from None
    if not isinstance(source, dict) or not config.input_size:
        raise CheckpointError(f"{path} has incomplete tokenprune metadata (source or input size missing).")
    return source, config


def _original(path: Path, source: dict[str, Any]) -> nn.Module:
    from .models import create_model

    try:
        return create_model(source["name"], library=source.get("library"), **(source.get("kwargs") or {}))
    except (KeyError, TypeError):
        raise CheckpointError(f"{path} has a malformed architecture source {source!r}.") from None
    except TokenPruneError as e:
        raise CheckpointError(f"{path}: cannot rebuild its architecture {source.get('name')!r}: {e}") from None


def load(path: str | os.PathLike[str]) -> nn.Module:
    """Load a model written by `save`: rebuild, re-sparsify with the saved configuration, load weights strictly.

    Args:
        path: a tokenprune ``.safetensors`` file.

    Returns:
        The sparsified model (a `torch.fx.GraphModule`) in eval mode, on CPU.

    Raises:
        CheckpointError: missing, truncated or foreign file, or weights that do not fit the recorded architecture.
    """
    from safetensors.torch import load_file

    from .sparsify import config_of, sparsify

    path = Path(path)
    source, config = _parse(path)
    model = _original(path, source)
    try:
        with warnings.catch_warnings():
            # reason: warnings about the configuration were given when it was made; loading it repeats nothing new.
            warnings.simplefilter("ignore", UserWarning)
            sparse = sparsify(
                model.eval(),
                config.ratio,
                locations=config.locations,
                keep_ratios=config.keep_ratios,
                example_inputs=torch.zeros(1, *config.input_size),
                inplace=True,
            )
    except TokenPruneError as e:
        raise CheckpointError(f"{path}: its recorded configuration cannot be applied again: {e}") from None
    config_of(sparse).learned = config.learned
    state = load_file(str(path))
    _check_fit(sparse, state, path, f"the sparsified {source.get('name')}")
    sparse.load_state_dict(state, strict=True)
    return sparse.eval()


def load_original(path: str | os.PathLike[str]) -> nn.Module:
    """The dense model inside a tokenprune file: its architecture with the saved backbone weights (no stages).

    The dense-vs-sparse report and accuracy gates compare against it.

    Raises:
        CheckpointError: as `load`.
    """
    from safetensors.torch import load_file

    path = Path(path)
    source, _ = _parse(path)
    model = _original(path, source)
    expected = model.state_dict()
    state = {k: v for k, v in load_file(str(path)).items() if k in expected}
    _check_fit(model, state, path, f"the original {source.get('name')}")
    model.load_state_dict(state, strict=True)
    return model.eval()
