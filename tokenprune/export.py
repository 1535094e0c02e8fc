"""Export a sparsified model's eval graph (top-k + gather) to ONNX or a `torch.export` program, and verify it.

What the exported graph accepts:

* **Batch size**: any (a symbolic batch dimension) by default; ``dynamic_batch=False`` fixes it to the example's.
  Each stage keeps the same k tokens for the whole batch, so the batch never enters a shape computation.
* **Image size**: fixed to the size the model was sparsified at (``SparsifyConfig.input_size``). The keep counts
  k = floor(rho_s * N) are computed from the token count N at export time and baked in as constants, as are the
  positional embeddings of a ViT; another size would need another export.

ONNX files use the ``images`` input name. A model with one output names it ``logits``; a model with several (a
dict, list or tuple of feature maps) gets one ONNX output per tensor, named as `tokenprune.outputs.named_outputs`
does (the dict's keys; ``output0``, ``output1``, ... for a list or tuple), and each is verified. Opset and
operators are those of PyTorch's dynamo-based exporter (TopK, GatherElements, ...). `torch.export` programs are
written with `torch.export.save` (``.pt2``) and read with `torch.export.load`.

A model whose own forward cannot be traced (a torchvision detector: a list of images in, data-dependent
post-processing out) was sparsified at a submodule (docs/design.md §3.7), and only that submodule exports:
``backbone=True`` (``tokenprune export --backbone``) exports it, taking the image batch the model makes itself (a
detector's transform resizes to its fixed ``min_size``/``max_size``) and returning its feature maps; without it such a
model is refused before the exporter runs.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from .errors import ConfigError, TokenPruneError, UnsupportedModelError
from .outputs import named_outputs

__all__ = ["FORMATS", "export", "verify_export"]

FORMATS = ("onnx", "torch-export")
_MAX_BATCH = 4096
_INLINE_LIMIT = 1.8e9  # protobuf caps a file at 2 GB; larger models keep their weights in a side file


def _input_size(model: nn.Module, input_size: tuple[int, ...] | None) -> tuple[int, int, int]:
    if input_size is not None:
        return tuple(int(v) for v in input_size)
    from .nn.recorder import config_of

    size = config_of(model).input_size
    if not size:
        raise ConfigError("the model records no input size; pass input_size=(C, H, W).")
    return tuple(size)


def _sparsified_part(model: nn.Module) -> str:
    """The qualified name of the submodule `tokenprune.sparsify` rewrote: "" when that is the model itself, else the
    outermost graph module that holds the chain's first block (the chain's names are qualified in the whole model)."""
    if isinstance(model, fx.GraphModule):
        return ""
    from .nn.recorder import config_of

    chain = config_of(model).chain
    parts = chain[0].split(".") if chain else []
    for i in range(1, len(parts)):
        path = ".".join(parts[:i])
        if isinstance(model.get_submodule(path), fx.GraphModule):
            return path
    return ""


def _select(
    model: nn.Module, size: tuple[int, int, int], backbone: bool
) -> tuple[nn.Module, tuple[int, int, int], str]:
    """What to export for `model` at input `size`: (module, its input size, its qualified name or "" for `model`)."""
    from .fx.tracing import model_name

    part = _sparsified_part(model)
    name = model_name(model)
    if not part:
        if backbone:
            raise ConfigError(
                f"{name} was sparsified and traces as a whole, so it exports whole: drop --backbone "
                "(backbone=False). --backbone is for a model sparsified at a submodule, such as a detector."
            )
        return model, size, ""
    if not backbone:
        raise UnsupportedModelError(
            f"{name}'s own forward cannot be exported: tokenprune sparsified its submodule {part} because the forward "
            f"around it does not trace (a detector's transform and post-processing). Export the sparsified {part} "
            "instead: `tokenprune export FILE --backbone` (Python: tokenprune.export(model, path, backbone=True)); "
            "it takes the image batch the model's transform makes and returns the feature maps its heads use."
        )
    from .measure.backbone import image_batch_inputs

    batch = image_batch_inputs(model, torch.randn(1, *size), [part]).get(part)
    if batch is None:
        raise UnsupportedModelError(
            f"{name}: its sparsified submodule {part} was not called on an image batch [1, {size[0]}, H, W] when the "
            f"model ran on an input of size {list(size)}, so its input size is unknown; export it in Python: "
            f"tokenprune.export(model.get_submodule({part!r}), path, input_size=(C, H, W))."
        )
    return model.get_submodule(part), tuple(int(v) for v in batch.shape[1:]), part


def _dynamic(dynamic_batch: bool) -> tuple[dict[int, Any]] | None:
    if not dynamic_batch:
        return None
    return ({0: torch.export.Dim("batch", min=1, max=_MAX_BATCH)},)


def _tolerance(reference: torch.Tensor) -> float:
    return 1e-4 + 1e-3 * float(reference.abs().max()) if reference.numel() else 1e-4


def _write(model: nn.Module, example: torch.Tensor, path: Path, fmt: str, dynamic_batch: bool) -> None:
    if fmt == "onnx":
        big = sum(p.numel() * p.element_size() for p in model.parameters()) > _INLINE_LIMIT
        with torch.inference_mode():
            names = [name for name, _ in named_outputs(model(example), "the model to export")]
        # reason: the exporter prints progress lines to stdout, which would corrupt JSON printed by the CLI.
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(
                model, (example,), str(path), input_names=["images"], output_names=names,
                dynamic_shapes=_dynamic(dynamic_batch), dynamo=True, external_data=big, verbose=False,
            )  # fmt: skip
    else:
        program = torch.export.export(model, (example,), dynamic_shapes=_dynamic(dynamic_batch))
        torch.export.save(program, str(path))


def _check(model: nn.Module, path: Path, fmt: str, size: tuple[int, ...], batch: int, dynamic_batch: bool) -> float:
    """Largest difference from PyTorch over the batch sizes the export must accept."""
    batches = sorted({batch, 1, 3}) if dynamic_batch else [batch]
    diff = 0.0
    for b in batches:
        x = torch.randn(b, *size)
        try:
            d = verify_export(model, path, fmt, x, raise_above_tolerance=True)
        except TokenPruneError:
            raise
        except Exception as e:  # noqa: BLE001 - onnxruntime and torch.export guards raise their own types
            raise UnsupportedModelError(
                f"exported {path} rejects a batch of {b} ({type(e).__name__}: {str(e).splitlines()[0]}): the "
                "exporter fixed the batch size for this model. Export with --static-batch (dynamic_batch=False)."
            ) from None
        diff = max(diff, d)
    return diff


def verify_export(
    model: nn.Module,
    path: str | os.PathLike[str],
    fmt: str,
    inputs: torch.Tensor,
    *,
    raise_above_tolerance: bool = False,
) -> float:
    """Run the exported file on `inputs` and return the largest absolute difference from `model`'s outputs.

    ONNX files run in onnxruntime (CPU); `torch.export` programs are loaded back with `torch.export.load`. Each
    output is compared with PyTorch's output of the same name, within 1e-4 + 1e-3 times that output's largest
    magnitude. A non-finite value in the export's output where PyTorch's is finite is a difference of infinity.

    Raises:
        TokenPruneError: the file returns other outputs or shapes than PyTorch, PyTorch's output is not finite, or
            (with `raise_above_tolerance`) one output differs beyond its tolerance; the message names the output.
    """
    with torch.inference_mode():
        reference = [(n, t.float().cpu()) for n, t in named_outputs(model.eval()(inputs), "the exported model")]
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise TokenPruneError(
                "verifying an ONNX export needs onnxruntime: pip install 'tokenprune[export]'."
            ) from None
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        values = session.run(None, {name: inputs.cpu().numpy()})
        output = [(o.name, torch.from_numpy(v)) for o, v in zip(session.get_outputs(), values)]
    else:
        program = torch.export.load(str(path))
        with torch.inference_mode():
            output = [(n, t.float().cpu()) for n, t in named_outputs(program.module()(inputs), str(path))]
    if [n for n, _ in output] != [n for n, _ in reference]:
        raise TokenPruneError(
            f"exported {path} returns outputs {[n for n, _ in output]}, PyTorch {[n for n, _ in reference]}."
        )
    diff = 0.0
    for (name, got), (_, expected) in zip(output, reference):
        if got.shape != expected.shape:
            raise TokenPruneError(
                f"exported {path} returns shape {list(got.shape)} for output {name}, PyTorch {list(expected.shape)}."
            )
        if not bool(expected.isfinite().all()):
            raise TokenPruneError(
                f"cannot verify {path}: PyTorch's own output {name} holds NaN or infinite values for these inputs, "
                "so no difference would mean anything; check the model's weights (a non-finite weight spreads)."
            )
        # reason: NaN compares false with everything, so max() and `d > tol` would call an all-NaN export exact.
        d = float((got.float() - expected).abs().max()) if got.numel() else 0.0
        d = d if math.isfinite(d) else math.inf
        tol = _tolerance(expected)
        if raise_above_tolerance and d > tol:
            raise TokenPruneError(
                f"exported {path} differs from PyTorch by {d:.3g} in output {name} at batch {inputs.shape[0]} "
                f"(tolerance {tol:.3g})."
            )
        diff = max(diff, d)
    return diff


def export(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    format: str = "onnx",
    dynamic_batch: bool = True,
    batch_size: int = 2,
    input_size: tuple[int, int, int] | None = None,
    verify: bool = True,
    backbone: bool = False,
) -> dict[str, Any]:
    """Export the eval (pruned) graph of a sparsified model and check it reproduces PyTorch's outputs.

    Args:
        model: a `tokenprune.sparsify` or `tokenprune.load` result (exported in eval mode: top-k + gather).
        path: the file to write (``.onnx`` or ``.pt2``).
        format: "onnx" or "torch-export".
        dynamic_batch: accept any batch size (default); False fixes it to `batch_size`.
        batch_size: batch of the example input used for tracing and verification.
        input_size: (C, H, W); default the size the model was sparsified at. The export only accepts this size.
        verify: run the exported file on random inputs (batch `batch_size`, and 1 and 3 with a dynamic batch)
            and compare with PyTorch.
        backbone: export the submodule `sparsify` rewrote in a model whose own forward does not trace (a
            detector's backbone; see the module docstring), on the batch the model makes from `input_size`.

    Returns:
        ``{"format", "file", "input_size" (of what was exported), "batch": "dynamic" | int, "max_abs_diff": float |
        None, "module": "" (the model) or the exported submodule's qualified name, "keep_ratios": the stages' keep
        ratios, fixed in the exported graph (`tokenprune.set_keep_ratios` changes them before export)}``.

    Raises:
        ConfigError: unknown format; `backbone` for a model sparsified whole. UnsupportedModelError: the exporter
        failed, or the model cannot be exported whole (without `backbone`). TokenPruneError: the exported file
        disagrees with PyTorch beyond tolerance.
    """
    from .nn.recorder import config_of

    if format not in FORMATS:
        raise ConfigError(f"format={format!r}; choose one of {', '.join(FORMATS)}.")
    model = model.eval()
    model, size, part = _select(model, _input_size(model, input_size), backbone)
    example = torch.randn(batch_size, *size)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TokenPruneError(f"cannot create the folder of {path}: {e.strerror or e}; choose another --out.") from None
    try:
        with warnings.catch_warnings():
            # reason: stages record their last decisions as attributes (for sparsity_state); an exported graph has
            # no such state, and torch.export warns about each of them.
            warnings.filterwarnings("ignore", message=".*were assigned during export")
            _write(model, example, path, format, dynamic_batch)
    except TokenPruneError:
        raise
    except OSError as e:  # a full disk or an unwritable file: not the model's fault
        raise TokenPruneError(f"cannot write {path}: {e.strerror or e}; free space or choose another --out.") from None
    except Exception as e:  # noqa: BLE001 - exporters raise many types
        raise UnsupportedModelError(
            f"{format} export failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); try "
            "--static-batch (dynamic_batch=False) or the other format."
        ) from None
    diff = None
    if verify:
        try:
            diff = _check(model, path, format, size, batch_size, dynamic_batch)
        except TokenPruneError:
            path.unlink(missing_ok=True)  # never leave a file behind that does not do what was asked
            raise
    return {
        "format": format,
        "file": str(path),
        "input_size": list(size),
        "batch": "dynamic" if dynamic_batch else batch_size,
        "max_abs_diff": diff,
        "module": part,
        "keep_ratios": [float(r) for r in config_of(model).keep_ratios],  # fixed in the exported graph
    }
