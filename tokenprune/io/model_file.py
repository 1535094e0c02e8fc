"""The tokenprune model file: save a sparsified model, load it back.

Format (``tokenprune``, version 2): one safetensors file. Its tensors are the sparsified model's state dict (the
original weights under their original names, plus the stages' predictors); its header metadata holds::

    format          "tokenprune"
    format_version  "2"
    tokenprune      the writing tokenprune version
    source          JSON: {"library": "timm" | "torchvision", "name": str, "kwargs": {...}}, or null when the
                    architecture is not one tokenprune can rebuild (load it with ``model=``)
    config          JSON: `SparsifyConfig.to_dict()` with the keep ratios the stages held when saved
    digest          sha256 of the other fields and every tensor (name, dtype, shape, bytes)

The digest detects damage (truncation, flipped bytes), not tampering: whoever edits a file can recompute it. What
stops a hostile file is that every header field is checked against an allowlist (`tokenprune.io.source`,
`_check_config`) before anything is built, the architecture is built on the meta device and compared with the
file's tensor shapes before real memory is allocated, and safetensors holds only tensors and strings, so nothing
from a file is ever executed or fetched. Version 1 files (no digest) are still read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import FAST_PATHS, SparsifyConfig
from ..errors import CheckpointError, ConfigError, TokenPruneError
from ..models import copy_model
from ..nn.select import SCORERS
from ..outputs import outputs_close
from .source import build, build_meta, check_source, describe, infer_source, state_shapes
from .weights import FORMAT, SAVE_HINT, check_fit, read_metadata

__all__ = ["FORMAT", "FORMAT_VERSION", "SourceWarning", "save", "load", "load_original"]

FORMAT_VERSION = 2
_FIELDS = ("format", "format_version", "tokenprune", "source", "config")
# reason: an example input of this size is allocated and run through the model before any weight is read.
_MAX_SIDE, _MAX_CHANNELS, _MAX_PIXELS = 2048, 16, 3 * 2048 * 2048
_MAX_STAGES, _MAX_CHAIN = 64, 4096


class SourceWarning(UserWarning):
    """`save` could not record how to rebuild the architecture: loading the file needs ``model=``."""


# ---- writing ---------------------------------------------------------------------------------------------------


def _digest(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in _FIELDS:
        h.update(f"{key}={metadata.get(key)}\n".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy
    return h.hexdigest()


def _same_function(sparse: nn.Module, rebuilt: nn.Module, size: tuple[int, ...]) -> bool:
    """Whether the rebuilt model gives the sparsified model's outputs on a random batch, both in eval mode on the
    CPU in float32 (the saved model is copied there, whatever its device and precision)."""
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            expected = copy_model(sparse).to("cpu", torch.float32).eval()(x)
            got = rebuilt.to(torch.float32).eval()(x)
    except Exception:  # noqa: BLE001 - a model that cannot run on the CPU cannot be confirmed
        return False
    return outputs_close(expected, got, rtol=1e-5, atol=1e-6)  # every output of a multi-output model


def _non_default_tag(model: nn.Module, name: str | None) -> str | None:
    """The timm pretrained tag the model was made with (``vit_base_patch16_clip_224.openai``) when it is not the
    architecture's default one, else None.

    The tag selects the pretrained_cfg a rebuilt model gets (mean, std, crop, default class count): without it a
    loaded CLIP model would get the default tag's crop."""
    tag = (getattr(model, "pretrained_cfg", None) or {}).get("tag")
    if not tag or not name:
        return None
    try:
        from timm.models import get_pretrained_cfg

        default = get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - not a timm name: no tag to keep
        return None
    return tag if default is not None and default.tag != tag else None


def _inferred(model: nn.Module, config: SparsifyConfig, state: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """The source of a model made by timm or torchvision, confirmed by rebuilding it and comparing outputs."""
    from ..nn.recorder import find_recorder

    # reason: a features_only timm model has other module names than its classifier; sparsify kept its keywords.
    extra = getattr(find_recorder(model), "dense_kwargs", None)
    names = [config.model_name]
    tag = _non_default_tag(model, config.model_name)
    if tag is not None:
        names.insert(0, f"{config.model_name}.{tag}")
    source = next((s for n in names if (s := infer_source(n, config.input_size, state, extra))), None)
    if source is None or not config.input_size:
        return None
    try:
        rebuilt = resparsify(build(source), config, "the inferred architecture")
        rebuilt.load_state_dict(state, strict=True)
    except (TokenPruneError, RuntimeError):
        return None
    return source if _same_function(model, rebuilt, config.input_size) else None


def save(model: nn.Module, path: str | os.PathLike[str], *, source: dict[str, Any] | None = None) -> Path:
    """Save a sparsified model: its sparsify configuration (learned keep ratios included), its weights, and how to
    rebuild its architecture.

    The architecture source is, in order: `source`; the one `tokenprune.create_model` recorded; one inferred for
    a model made by ``timm.create_model`` or a torchvision builder (its name, ``num_classes`` and input size, and
    ``features_only``/``out_indices`` for timm feature extractors, confirmed by rebuilding it and comparing every
    output). For any other model (your own module, changed layers) the
    file holds the weights and configuration only, a `SourceWarning` says so, and loading it needs the dense
    architecture: ``tokenprune.load(path, model=original)``.

    Args:
        model: a `tokenprune.sparsify` result.
        path: the file to write (``.safetensors`` is the natural suffix); written atomically.
        source: ``{"library": "timm" | "torchvision", "name": ..., "kwargs": {...}}`` to record instead.

    Returns:
        The path written.

    Raises:
        ConfigError: a given or recorded source that a loader would refuse (see `tokenprune.io.source`).
        TokenPruneError: when `model` is not sparsified.
        CheckpointError: the file cannot be written (full disk, read-only folder, a file in the way).
    """
    from safetensors.torch import save_file

    from .._version import __version__
    from ..nn.recorder import config_of

    config = config_of(model)
    path = Path(path)
    given = source if source is not None else config.source
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    try:
        given = check_source(json.loads(json.dumps(given)), f"source of {config.model_name or type(model).__name__}")
    except (TypeError, ValueError):
        raise ConfigError(f"source={given!r} is not JSON: use numbers, strings, booleans and lists.") from None
    except CheckpointError as e:
        raise ConfigError(f"cannot save {path} with this source: {e}") from None
    source = given or _inferred(model, config, state)
    if source is None:
        warnings.warn(
            f"{path}: tokenprune cannot tell how to rebuild {config.model_name or type(model).__name__} (not made by "
            "tokenprune.create_model, timm.create_model or a torchvision builder, or changed since), so the file "
            "holds its weights and configuration only. Load it with tokenprune.load(path, model=<the dense model, "
            "freshly built>).",
            SourceWarning,
            stacklevel=2,
        )
    data = config.to_dict()
    data["source"] = source
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "tokenprune": __version__,
        "source": json.dumps(source),
        "config": json.dumps(data),
    }
    metadata["digest"] = _digest(metadata, state)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except OSError as e:
        raise CheckpointError(
            f"cannot write {path}: {e.strerror or e}; free space or choose another path (nothing was replaced)."
        ) from None
    finally:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
    return path


# ---- reading ---------------------------------------------------------------------------------------------------


def _bad(path: Path, key: str, problem: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: refused header field '{key}': {problem}. The file is damaged or was not written by "
        f"tokenprune.save; {SAVE_HINT}."
    )


def _int_list(value: Any, path: Path, key: str, low: int, high: int, max_len: int) -> list[int]:
    if not isinstance(value, list) or not value or len(value) > max_len:
        raise _bad(path, key, f"expected a list of 1 to {max_len} integers, got {str(value)[:60]}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise _bad(path, key, f"expected integers in [{low}, {high}], got {str(v)[:40]}")
    return value


def _ratio(value: Any, path: Path, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(path, key, f"expected a number in (0, 1], got {str(value)[:40]}")
    if not 0.0 < value <= 1.0:
        raise _bad(path, key, f"{value} is not a keep ratio in (0, 1]")
    return float(value)


def _check_config(data: Any, path: Path, version: int, source: dict[str, Any] | None) -> SparsifyConfig:
    """Every field of the recorded configuration, typed and bounded (version 2 files must have all of them)."""
    if not isinstance(data, dict):
        raise _bad(path, "config", f"a {type(data).__name__}, not an object")
    fields = list(SparsifyConfig.__dataclass_fields__)
    # "scorer", "decisions" and "fast_path" came after format 2: a file without them used learned, nested
    # predictors and scaled fast paths.
    later, first = ("scorer", "decisions", "fast_path"), ["ratio", "locations", "keep_ratios", "input_size"]
    required = [f for f in fields if f not in later] if version >= 2 else first
    for key in required:
        if key not in data:
            raise _bad(path, f"config.{key}", "missing")
    unknown = [k for k in data if k not in fields]
    if unknown and version >= 2:
        raise _bad(path, f"config.{str(unknown[0])[:40]}", "unknown field")
    if version >= 2 and data["source"] != source:
        raise _bad(path, "config.source", "differs from the header's source")
    size = _int_list(data["input_size"], path, "config.input_size", 1, _MAX_SIDE, 3)
    if len(size) != 3 or size[0] > _MAX_CHANNELS or math.prod(size) > _MAX_PIXELS:
        raise _bad(
            path, "config.input_size", f"expected [C <= {_MAX_CHANNELS}, H, W <= {_MAX_SIDE}] (C*H*W <= "
            f"{_MAX_PIXELS}), got {size}"
        )  # fmt: skip
    locations = _int_list(data["locations"], path, "config.locations", 1, _MAX_CHAIN, _MAX_STAGES)
    keep = data["keep_ratios"]
    if not isinstance(keep, list) or len(keep) != len(locations):
        raise _bad(path, "config.keep_ratios", f"expected one keep ratio per location, got {str(keep)[:60]}")
    keep = [_ratio(v, path, "config.keep_ratios") for v in keep]
    kind = data.get("kind", "token")
    if kind not in ("token", "spatial"):
        raise _bad(path, "config.kind", f"{str(kind)[:40]!r} is not 'token' or 'spatial'")
    chain = data.get("chain", [])
    if not isinstance(chain, list) or len(chain) > _MAX_CHAIN or not all(isinstance(c, str) for c in chain):
        raise _bad(path, "config.chain", "expected a list of module names")
    prefix = data.get("prefix_tokens", 0)
    if isinstance(prefix, bool) or not isinstance(prefix, int) or not 0 <= prefix <= _MAX_SIDE:
        raise _bad(path, "config.prefix_tokens", f"expected a small non-negative integer, got {str(prefix)[:40]}")
    name = data.get("model_name")
    if name is not None and (not isinstance(name, str) or len(name) > 200):
        raise _bad(path, "config.model_name", "expected a short string")
    learned = data.get("learned", False)
    if not isinstance(learned, bool):
        raise _bad(path, "config.learned", f"expected true or false, got {str(learned)[:40]}")
    scorer = data.get("scorer", "predictor")
    if scorer not in SCORERS:
        raise _bad(path, "config.scorer", f"{str(scorer)[:40]!r} is not one of {', '.join(SCORERS)}")
    decisions = data.get("decisions", "nested")
    if decisions not in ("nested", "independent") or (kind == "token" and decisions != "nested"):
        raise _bad(path, "config.decisions", f"{str(decisions)[:40]!r} is not 'nested' or (spatial) 'independent'")
    fast_path = data.get("fast_path", "scaled")
    if fast_path not in FAST_PATHS:
        raise _bad(path, "config.fast_path", f"{str(fast_path)[:40]!r} is not one of {', '.join(FAST_PATHS)}")
    return SparsifyConfig(
        ratio=_ratio(data["ratio"], path, "config.ratio"),
        locations=locations,
        keep_ratios=keep,
        kind=kind,
        chain=chain,
        prefix_tokens=prefix,
        model_name=name,
        input_size=tuple(size),
        learned=learned,
        scorer=scorer,
        decisions=decisions,
        fast_path=fast_path,
    )


def _json(meta: dict[str, str], key: str, path: Path) -> Any:
    if key not in meta:
        raise _bad(path, key, "missing")
    try:
        return json.loads(meta[key])
    except (ValueError, RecursionError) as e:
        raise _bad(path, key, f"not JSON ({type(e).__name__})") from None


def _parse(path: Path) -> tuple[dict[str, Any] | None, SparsifyConfig, dict[str, str]]:
    if zipfile.is_zipfile(path):  # torch.save's container: a training checkpoint or plain weights, not a model file
        raise CheckpointError(
            f"{path} is a torch checkpoint, not a tokenprune model file. The final.pt of a finetune run loads with "
            "tokenprune.train.load_trained(path) (then tokenprune.save(model, 'model.safetensors') writes a model "
            "file; `tokenprune report/export/visualize` take it as it is), or rerun its `tokenprune finetune` "
            "command with --save FILE (a finished run is not trained again); plain weights load with "
            "tokenprune.create_model(name, checkpoint=PATH)."
        )
    meta = read_metadata(path) or {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a tokenprune model: its safetensors header has no tokenprune metadata (plain weights?). "
            f"Load plain weights with tokenprune.create_model(name, checkpoint=PATH) or `--checkpoint PATH`; "
            f"a sparsified model file is made by tokenprune.save or `tokenprune convert`."
        )
    version = meta.get("format_version", "")
    if not (version.isascii() and version.isdigit() and len(version) < 4) or not 1 <= int(version) <= FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: refused header field 'format_version' {version[:20]!r}; this tokenprune reads versions 1 to "
            f"{FORMAT_VERSION}. Upgrade tokenprune, or re-create the file: {SAVE_HINT}."
        )
    version = int(version)
    unknown = sorted(k for k in meta if k not in (*_FIELDS, "digest"))
    if unknown:
        raise _bad(
            path,
            str(unknown[0])[:40],
            f"unknown field (this tokenprune writes and reads only {', '.join((*_FIELDS, 'digest'))})",
        )
    if version >= 2:
        for key in ("digest", "tokenprune"):
            if not isinstance(meta.get(key), str) or not 0 < len(meta[key]) <= 128:
                raise _bad(path, key, "missing or not a short string")
    source = check_source(_json(meta, "source", path), str(path))
    config = _check_config(_json(meta, "config", path), path, version, source)
    config.source = source
    return source, config, meta


def _kind(dtype: torch.dtype) -> str:
    return "complex" if dtype.is_complex else "floating" if dtype.is_floating_point else str(dtype)


def _check_dtypes(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: Path) -> None:
    """A file's tensor must be of the architecture's kind (floating, an integer type, bool); precision may differ
    (a model saved in half precision loads into the float32 architecture)."""
    wrong = [
        f"{k} {state[k].dtype} vs {v.dtype}" for k, v in expected.items() if _kind(state[k].dtype) != _kind(v.dtype)
    ]
    if wrong:
        raise CheckpointError(
            f"{path}: {len(wrong)} tensors have a dtype the architecture cannot hold (file vs model: "
            f"{', '.join(wrong[:3])}); the file is damaged or was not written by tokenprune.save; {SAVE_HINT}."
        )


def _check_digest(path: Path, meta: dict[str, str], state: dict[str, torch.Tensor]) -> None:
    if "digest" in meta and _digest(meta, state) != meta["digest"]:
        raise CheckpointError(
            f"{path}: its contents do not match the digest recorded when it was saved (header field 'digest'): the "
            f"file is damaged or was edited. Copy it again, or re-create it: {SAVE_HINT}."
        )


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError, OSError, ...
        raise CheckpointError(f"{path}: its tensors cannot be read ({type(e).__name__}: {e}).") from None


def _file_shapes(path: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: its tensor index cannot be read ({type(e).__name__}: {e}).") from None


def _fixed_size(model: nn.Module, kwargs: dict[str, Any]) -> list[int] | None:
    """[H, W] an architecture is built for: timm patch embeddings that are strict or whose img_size the source
    sets, torchvision ViTs (always strict)."""
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is not None and (getattr(patch_embed, "strict_img_size", False) or "img_size" in kwargs):
        return [int(v) for v in img_size]
    if isinstance(getattr(model, "image_size", None), int):
        return [model.image_size, model.image_size]
    return None


def _dense(path: Path, source: dict[str, Any] | None, model: nn.Module | None, size: tuple[int, ...]) -> nn.Module:
    """The dense architecture: the caller's `model`, or the recorded source built after its shapes were checked."""
    if model is not None:
        if not isinstance(model, nn.Module):
            raise CheckpointError(f"model= must be the dense torch.nn.Module {path} was made from, not {model!r}.")
        from ..nn.recorder import selectors

        if any(True for _ in selectors(model)):
            raise CheckpointError(f"model= is already sparsified; pass the dense model {path} was made from.")
        return model
    if source is None:
        raise CheckpointError(
            f"{path} records no architecture it can rebuild (it was saved from a model tokenprune could not "
            "identify). Pass the dense architecture, freshly built: tokenprune.load(path, model=<dense model>)."
        )
    meta_model = build_meta(source)
    if meta_model is None:
        raise CheckpointError(f"{path}: its recorded architecture {describe(path, source)} cannot be built.")
    expected, found = state_shapes(meta_model), _file_shapes(path)
    # reason: a hostile source could ask for a huge model; compare with the file's shapes before allocating it.
    found = {k: v for k, v in found.items() if k in expected}
    check_fit(expected, found, path, f"its recorded architecture {describe(path, source)}")
    fixed = _fixed_size(meta_model, source["kwargs"])
    if fixed is not None and fixed != list(size[1:]):
        raise _bad(path, "config.input_size", f"{list(size)}, but the architecture is built for {fixed} images")
    try:
        return build(source)
    except ConfigError as e:
        raise CheckpointError(f"{path}: cannot rebuild its architecture: {e}") from None


def resparsify(
    dense: nn.Module, config: SparsifyConfig, what: str, *, inplace: bool = True, recorded: tuple[str, ...] = ()
) -> nn.Module:
    """`dense` sparsified again with `config`; the fields named in `recorded` (present in the file) must agree."""
    from ..sparsify import config_of, sparsify

    try:
        with warnings.catch_warnings():
            # reason: warnings about the configuration were given when it was made; loading it repeats nothing new.
            warnings.simplefilter("ignore", UserWarning)
            sparse = sparsify(
                dense.eval(),
                config.ratio,
                locations=config.locations,
                keep_ratios=config.keep_ratios,
                example_inputs=torch.zeros(1, *config.input_size),
                inplace=inplace,
                scorer=config.scorer,
                decisions=config.decisions,
                fast_path=config.fast_path,
            )
    except TokenPruneError as e:
        raise CheckpointError(f"{what}: the recorded configuration cannot be applied again: {e}") from None
    except Exception as e:  # noqa: BLE001 - a configuration the model cannot run at (e.g. an input size)
        raise CheckpointError(
            f"{what}: the recorded configuration cannot be applied again ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})."
        ) from None
    rebuilt = config_of(sparse)
    # reason: these fields are derived again by sparsify; a file that says otherwise describes another model.
    for key in ("kind", "chain", "prefix_tokens"):
        if key in recorded and getattr(rebuilt, key) != getattr(config, key):
            raise CheckpointError(
                f"{what}: refused header field 'config.{key}': the file records {str(getattr(config, key))[:80]}, "
                f"the architecture gives {str(getattr(rebuilt, key))[:80]}, so the file does not fit it (a model= of "
                "another architecture, or a damaged or edited file)."
            )
    rebuilt.learned = config.learned
    rebuilt.source = config.source
    rebuilt.model_name = config.model_name if config.model_name is not None else rebuilt.model_name
    return sparse


def load(path: str | os.PathLike[str], *, model: nn.Module | None = None) -> nn.Module:
    """Load a model written by `save`: rebuild the dense architecture, re-sparsify it with the saved configuration,
    load the weights strictly.

    Args:
        path: a tokenprune ``.safetensors`` file.
        model: the dense architecture to use instead of the recorded one (required when the file records none,
            e.g. your own module). It is not changed, not even its train/eval mode: the result is built from a copy.

    Returns:
        The sparsified model (a `torch.fx.GraphModule`) in eval mode, on CPU.

    Raises:
        CheckpointError: a missing, truncated, damaged, foreign or refused file, weights that do not fit the
            architecture, or a file without an architecture and no `model`.
    """
    path = Path(path)
    source, config, meta = _parse(path)
    state = _read_tensors(path)
    _check_digest(path, meta, state)
    dense = _dense(path, source, model, config.input_size)
    if model is not None:
        dense = copy_model(model)  # the caller's model stays exactly as it was (its mode included)
    recorded = ("kind", "chain", "prefix_tokens") if int(meta["format_version"]) >= 2 else ()  # version 1: absent
    sparse = resparsify(dense, config, str(path), recorded=recorded)
    expected = sparse.state_dict()
    check_fit(expected, state, path, f"the sparsified {describe(path, source)}")
    _check_dtypes(expected, state, path)
    sparse.load_state_dict(state, strict=True)
    return sparse.eval()


def load_original(path: str | os.PathLike[str], *, model: nn.Module | None = None) -> nn.Module:
    """The dense model inside a tokenprune file: its architecture with the saved backbone weights (no stages).

    The dense-vs-sparse report and accuracy gates compare against it.

    Args:
        path: a tokenprune ``.safetensors`` file.
        model: the dense architecture to load into (as for `load`); it is loaded in place and returned.

    Raises:
        CheckpointError: as `load`.
    """
    path = Path(path)
    source, config, meta = _parse(path)
    state = _read_tensors(path)
    _check_digest(path, meta, state)
    dense = _dense(path, source, model, config.input_size)
    expected = dense.state_dict()
    state = {k: v for k, v in state.items() if k in expected}
    check_fit(expected, state, path, f"the original {describe(path, source)}")
    dense.load_state_dict(state, strict=True)
    return dense.eval()
