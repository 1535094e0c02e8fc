"""A model's output as named tensors: one tensor, or a dict, list or tuple of them (feature pyramids, dense heads).

Models that return several feature maps (timm ``features_only=True``, torchvision ``create_feature_extractor``, a
backbone + FPN wrapper) are compared, exported and checked output by output; these helpers give every output a
stable name in the order the model returns them (docs/design.md §5.5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .errors import TokenPruneError

__all__ = ["named_outputs", "output_names", "outputs_close", "max_abs_diff"]

SINGLE_NAME = "logits"  # the name of a model's only output (what ONNX files of classifiers have always used)


def named_outputs(output: Any, what: str = "the model") -> list[tuple[str, torch.Tensor]]:
    """The tensors of a model output, in order, with names: ``logits`` for a single tensor, the keys of a dict,
    ``output0``, ``output1``, ... for a list or tuple. Nested containers are joined with ``.``.

    Raises:
        TokenPruneError: for an output that holds something other than tensors (named after `what`).
    """
    if isinstance(output, torch.Tensor):
        return [(SINGLE_NAME, output)]
    named: list[tuple[str, torch.Tensor]] = []

    def walk(value: Any, name: str) -> None:
        if isinstance(value, torch.Tensor):
            named.append((name, value))
        elif isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, f"{name}.{key}" if name else str(key))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{name}.{i}" if name else f"output{i}")
        else:
            raise TokenPruneError(
                f"{what} returns a {type(value).__name__} at {name or 'its top level'}; tokenprune handles outputs "
                "that are tensors or dicts, lists and tuples of tensors. Wrap the model so that it returns those."
            )

    walk(output, "")
    if not named:
        raise TokenPruneError(f"{what} returns an empty {type(output).__name__}; there is no output to work with.")
    return named


def output_names(output: Any, what: str = "the model") -> list[str]:
    """The names `named_outputs` gives, in order."""
    return [name for name, _ in named_outputs(output, what)]


def max_abs_diff(a: Any, b: Any, what: str = "the model") -> float:
    """Largest absolute difference between two outputs of the same structure and shapes; inf if either holds a
    non-finite value.

    Raises:
        TokenPruneError: when their names or shapes differ (the message names the first output that differs).
    """
    left, right = named_outputs(a, what), named_outputs(b, what)
    if [n for n, _ in left] != [n for n, _ in right]:
        raise TokenPruneError(f"{what}: outputs {[n for n, _ in left]} and {[n for n, _ in right]} differ.")
    diff = 0.0
    for (name, x), (_, y) in zip(left, right):
        if x.shape != y.shape:
            raise TokenPruneError(f"{what}: output {name} has shape {list(x.shape)} and {list(y.shape)}.")
        if x.numel():
            x, y = x.detach().float().cpu(), y.detach().float().cpu()
            if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
                return math.inf  # a NaN compares as no difference under max(): non-finite is never "equal"
            diff = max(diff, float((x - y).abs().max()))
    return diff


def outputs_close(a: Any, b: Any, *, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    """Whether two outputs have the same names and shapes and every tensor is `torch.allclose`."""
    try:
        left, right = named_outputs(a), named_outputs(b)
    except TokenPruneError:
        return False
    return [n for n, _ in left] == [n for n, _ in right] and all(
        x.shape == y.shape and torch.allclose(x, y, rtol=rtol, atol=atol) for (_, x), (_, y) in zip(left, right)
    )
