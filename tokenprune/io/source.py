"""The architecture source a model file records: ``{"library", "name", "kwargs"}``, checked, inferred and built.

A file's source is untrusted input. `check_source` admits only what cannot make the loader fetch or run anything:
a known library, a model name of that library without ``:`` or ``/`` (no hub or file names), and constructor
keywords with plain architecture values (numbers, short names, booleans, lists of them) whose names do not suggest
weights, files, caches or URLs. `build_meta` builds a source on the meta device (no memory, no initialisation of
real tensors), so a file's tensor shapes can be checked against it before anything real is allocated.

`infer_source` recovers the source of a sparsified model that was created by ``timm.create_model`` or a
torchvision builder (not by `tokenprune.create_model`, which records it): the architecture name comes from timm's
``pretrained_cfg`` (kept in the `SparsifyConfig`) or, for torchvision, from the builder whose model has the same
parameter shapes; ``num_classes``, ``img_size``/``image_size`` and ``in_chans`` from the weights and input size.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, TokenPruneError
from ..inputs import geometry_kwargs

__all__ = ["LIBRARIES", "check_source", "build_meta", "build", "infer_source", "state_shapes", "timm_feature_kwargs"]

LIBRARIES = ("timm", "torchvision")
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_WORD = re.compile(r"[A-Za-z0-9_\-]{0,64}")  # names such as "avg", "gelu", "layernorm2d": no dots, no paths
# reason: keywords that load weights or configs, or name files, caches, URLs or hubs (timm: pretrained,
# pretrained_cfg, pretrained_cfg_overlay, checkpoint_path, cache_dir; torchvision: weights, progress).
_REFUSED_PARTS = ("pretrained", "checkpoint", "path", "file", "dir", "cache", "url", "uri", "hub", "weights",
                  "download", "progress", "repo", "token")  # fmt: skip
_MAX_KWARGS, _MAX_LIST, _MAX_INT, _MAX_FLOAT = 32, 64, 1 << 16, 1e6
# reason: even on the meta device, building takes time per block; no real architecture has more than this.
_COUNTS, _MAX_COUNT = ("depth", "depths", "num_layers", "layers", "num_blocks", "num_stages"), 512


def _refuse(where: str, key: str, problem: str) -> CheckpointError:
    return CheckpointError(
        f"{where}: refused header field '{key}': {problem}. A tokenprune file may only name a timm or torchvision "
        "architecture with plain keyword values; nothing from it is fetched or executed. Re-create the file with "
        "tokenprune.save, or load the weights into your own model: tokenprune.load(path, model=<dense model>)."
    )


def _check_value(value: Any, where: str, key: str, depth: int = 0, limit: int = _MAX_INT) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if abs(value) > limit:
            raise _refuse(where, key, f"the integer {value} is beyond {limit}")
        return
    if isinstance(value, float):
        if not math.isfinite(value) or abs(value) > _MAX_FLOAT:
            raise _refuse(where, key, f"the number {value} is not finite or beyond {_MAX_FLOAT:g}")
        return
    if isinstance(value, str):
        if not _WORD.fullmatch(value):
            raise _refuse(where, key, f"the string {value[:40]!r} is not a short plain name (letters, digits, _.-)")
        return
    if isinstance(value, list) and depth < 2:
        if len(value) > _MAX_LIST:
            raise _refuse(where, key, f"a list of {len(value)} items (at most {_MAX_LIST})")
        for i, item in enumerate(value):
            _check_value(item, where, f"{key}[{i}]", depth + 1, limit)
        return
    raise _refuse(where, key, f"a value of type {type(value).__name__} is not a number, string, boolean or list")


def _known(library: str, name: str) -> bool:
    if library == "timm":
        import timm

        return timm.is_model(name)
    import torchvision

    return name in torchvision.models.list_models()


def check_source(source: Any, where: str) -> dict[str, Any] | None:
    """Validate a source read from a file header (or about to be written). ``None`` means "none recorded".

    Args:
        source: the parsed JSON value.
        where: the file, for messages.

    Returns:
        ``{"library", "name", "kwargs"}`` with exactly those keys, or None.

    Raises:
        CheckpointError: naming the offending key, for anything outside the allowlist.
    """
    if source is None:
        return None
    if not isinstance(source, dict):
        raise _refuse(where, "source", f"a {type(source).__name__}, not an object")
    extra = sorted(set(source) - {"library", "name", "kwargs"})
    if extra:
        raise _refuse(where, f"source.{extra[0]}", "unknown key")
    library, name, kwargs = source.get("library"), source.get("name"), source.get("kwargs", {})
    if library not in LIBRARIES:
        raise _refuse(where, "source.library", f"{str(library)[:40]!r} is not one of {', '.join(LIBRARIES)}")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _refuse(where, "source.name", f"{str(name)[:60]!r} is not a plain model name (no ':' or '/')")
    if not _known(library, name):
        raise _refuse(where, "source.name", f"{library} has no model {name!r}")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise _refuse(where, "source.kwargs", f"a {type(kwargs).__name__}, not an object")
    if len(kwargs) > _MAX_KWARGS:
        raise _refuse(where, "source.kwargs", f"{len(kwargs)} keywords (at most {_MAX_KWARGS})")
    for key, value in kwargs.items():
        field = f"source.kwargs.{str(key)[:40]}"
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("_") or len(key) > 64:
            raise _refuse(where, field, "not a public keyword name")
        if any(part in key.lower() for part in _REFUSED_PARTS):
            raise _refuse(where, field, "keywords that load weights or name files, caches or URLs are not allowed")
        _check_value(value, where, field, limit=_MAX_COUNT if key in _COUNTS else _MAX_INT)
    return {"library": library, "name": name, "kwargs": dict(kwargs)}


def _construct(library: str, name: str, kwargs: dict[str, Any]) -> nn.Module:
    from ..models import _build  # the one constructor, also for `task_head` models (a segmenter on a backbone)

    return _build(library, name, False, kwargs)


def build_meta(source: dict[str, Any]) -> nn.Module | None:
    """The source's architecture on the meta device (shapes only), or None when its constructor refuses."""
    try:
        with torch.device("meta"):
            return _construct(source["library"], source["name"], source["kwargs"])
    except Exception:  # noqa: BLE001 - constructors raise anything for keywords they reject
        return None


def build(source: dict[str, Any]) -> nn.Module:
    """The source's architecture with fresh weights, in eval mode.

    Raises:
        ConfigError: when the constructor refuses the keywords.
    """
    try:
        return _construct(source["library"], source["name"], source["kwargs"]).eval()
    except Exception as e:  # noqa: BLE001
        raise ConfigError(
            f"cannot create {source['library']} model {source['name']!r} with {source['kwargs']}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None


def state_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Every state-dict entry's shape."""
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _fits(expected: dict[str, list[int]], found: dict[str, list[int]]) -> bool:
    """Whether every entry of the dense architecture is in the sparsified model's state with the same shape (the
    sparsified model adds its stages' entries)."""
    return all(found.get(k) == v for k, v in expected.items())


def _with_classes(source: dict[str, Any], model: nn.Module, found: dict[str, list[int]]) -> dict[str, Any] | None:
    """The source (whose meta-built `model` is given), with ``num_classes`` set when the classifier is the only
    difference; None when it does not fit."""
    expected = state_shapes(model)
    if _fits(expected, found):
        return source
    default = getattr(model, "num_classes", 1000)
    changed = {k for k, v in expected.items() if found.get(k) != v}
    # reason: the classifier's weight and bias lead with num_classes; num_classes=0 removes them (timm).
    classes = {found[k][0] for k in changed if k in found and expected[k] and expected[k][0] == default}
    if len(classes) == 1:
        candidate = {**source, "kwargs": {**source["kwargs"], "num_classes": classes.pop()}}
    elif changed and not any(k in found for k in changed):
        candidate = {**source, "kwargs": {**source["kwargs"], "num_classes": 0}}
    else:
        return None
    model = build_meta(candidate)
    return candidate if model is not None and _fits(state_shapes(model), found) else None


def timm_feature_kwargs(model: nn.Module) -> dict[str, Any] | None:
    """``{"features_only": True, "out_indices": [...]}`` for a model made by ``timm.create_model(...,
    features_only=True)``, else None.

    Structural: timm's feature wrappers carry a `FeatureInfo` (an object with ``out_indices``) where its classifiers
    carry a plain list of dicts. The indices are recorded as the model holds them; other feature keywords (e.g. a
    changed ``output_fmt``) are not recovered, and `save` confirms the rebuilt model's outputs before trusting it.
    """
    info = getattr(model, "feature_info", None)
    indices = getattr(info, "out_indices", None)
    if indices is None or not getattr(model, "pretrained_cfg", None):
        return None
    try:
        return {"features_only": True, "out_indices": [int(i) for i in indices]}
    except (TypeError, ValueError):
        return None


def _candidate(
    library: str, name: str, input_size: tuple[int, ...] | None, extra: dict[str, Any] | None = None
) -> tuple[dict[str, Any], nn.Module] | None:
    """The source of `name` built for `input_size` (img_size/in_chans for timm, image_size for torchvision ViTs,
    where the constructor takes them) with the `extra` keywords, and its meta-built model."""
    try:
        kwargs = geometry_kwargs(library, name, input_size)
    except ConfigError:
        return None
    for attempt in (kwargs, {k: v for k, v in kwargs.items() if k == "in_chans"}):
        source = {"library": library, "name": name, "kwargs": {**attempt, **(extra or {})}}
        model = build_meta(source)
        if model is not None:
            return source, model
        if not kwargs:
            break
    return None


def _torchvision_candidates(model_name: str) -> list[str]:
    """torchvision builders defined in the module of the class called `model_name`."""
    import torchvision

    names = []
    for name in torchvision.models.list_models(module=torchvision.models):
        builder = torchvision.models.get_model_builder(name)
        annotation = getattr(builder, "__annotations__", {}).get("return")
        returned = getattr(annotation, "__name__", str(annotation))
        if returned == model_name:
            names.append(name)
    return sorted(names)


def infer_source(
    model_name: str | None,
    input_size: tuple[int, ...] | None,
    state: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict | None:
    """The source of a sparsified model made from a timm or torchvision model, when its shapes identify one.

    Args:
        model_name: the `SparsifyConfig`'s model name (timm's architecture name, or the class name).
        input_size: the input size it was sparsified at.
        state: its state dict (or ``{key: shape}``).
        extra: constructor keywords known from the dense model (`timm_feature_kwargs`), tried with timm names.

    Returns:
        A checked source whose meta-built architecture has exactly the dense entries of `state`, or None. The
        caller must still confirm the rebuilt model computes the same function (shapes do not show, e.g.,
        ``global_pool``).
    """
    if not model_name:
        return None
    found = {k: list(v.shape) if hasattr(v, "shape") else list(v) for k, v in state.items()}
    candidates: list[tuple[str, str]] = []
    try:
        if _known("timm", model_name):
            candidates.append(("timm", model_name))
        candidates += [("torchvision", n) for n in _torchvision_candidates(model_name)]
    except Exception:  # noqa: BLE001 - a name no registry knows
        return None
    for library, name in candidates:
        built = _candidate(library, name, input_size, extra if library == "timm" else None)
        fitted = _with_classes(*built, found) if built is not None else None
        if fitted is not None:
            try:
                return check_source(fitted, "inferred source")
            except TokenPruneError:
                return None
    return None


def describe(path: Path | str, source: dict[str, Any] | None) -> str:
    """A short name for messages."""
    return f"{source['library']} {source['name']}" if source else f"the model in {path}"
