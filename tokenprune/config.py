"""`SparsifyConfig`: everything needed to rebuild a sparsified model from the original one."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = ["SparsifyConfig", "DEFAULT_RATIO", "check_ratio", "default_locations", "default_keep_ratios"]


def check_ratio(ratio: float, what: str = "ratio") -> float:
    """Return `ratio` as a float, or raise `ConfigError` unless 0 < ratio <= 1."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}={ratio!r} is not a number; pass a keep ratio in (0, 1], e.g. 0.7.") from None
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise ConfigError(f"{what}={ratio!r} is out of range; a keep ratio must lie in (0, 1], e.g. 0.7.")
    return value


#: The base keep ratio rho when none is given: the paper's main setting (DynamicViT, Rao et al. 2021), whose
#: published DeiT and ConvNeXt figures tokenprune checks against (docs/design.md §7).
DEFAULT_RATIO = 0.7

#: How stages of a chain relate (`sparsify(..., decisions=)`): "auto" is "nested" for tokens, "independent" for maps.
DECISIONS = ("auto", "nested", "independent")

#: The form of a spatial block's fast path (`sparsify(..., fast_path=)`, docs/design.md §1.2): "block" follows the
#: block (a layer scale only where the block has one, its norm's epsilon: the official AdaConvNeXt/AdaSwin); "scaled"
#: gives every fast path a layer scale and epsilon 1e-6 (tokenprune's form before 2026-12-06: files without the key).
FAST_PATHS = ("block", "scaled")


def check_fast_path(fast_path: str, name: str) -> str:
    """`fast_path` if it is one of `FAST_PATHS`, else `ConfigError`."""
    if fast_path not in FAST_PATHS:
        raise ConfigError(f"{name}: fast_path={fast_path!r}; choose one of {', '.join(FAST_PATHS)}.")
    return fast_path


def resolve_decisions(decisions: str, kind: str, name: str) -> str:
    """The decision mode for a chain of `kind`, or `ConfigError` for an unknown one or independent token stages."""
    if decisions not in DECISIONS:
        raise ConfigError(f"{name}: decisions={decisions!r}; choose one of {', '.join(DECISIONS)}.")
    if decisions == "auto":
        return "independent" if kind == "spatial" else "nested"
    if kind == "token" and decisions == "independent":
        raise ConfigError(
            f"{name}: decisions='independent' needs a spatial chain; a token model's dropped tokens are gone, so its "
            "stages always choose among the tokens still there. Use decisions='auto'."
        )
    return decisions


def default_locations(depth: int, kind: str = "token") -> list[int]:
    """Chain indices of the blocks a predictor precedes (docs/design.md §1.1: D/4, D/2, 3D/4 -> [3, 6, 9] of 12)."""
    if kind == "spatial":
        # docs/design.md §1.2: ConvNeXt-T uses blocks 1, 2, 3 of its 9-block stage; deeper stages 3, 6, 9 (of 27).
        locations = [1, 2, 3] if depth < 12 else [depth // 9, 2 * depth // 9, 3 * depth // 9]
        return [loc for loc in locations if loc < depth]  # a chain of 2 or 3 blocks gets fewer stages
    locations = sorted({max(1, round(depth * q / 4)) for q in (1, 2, 3)})
    return [loc for loc in locations if loc < depth]


def default_keep_ratios(ratio: float, stages: int, kind: str = "token") -> list[float]:
    """Per-stage keep ratios: rho^s of the initial tokens for token chains, [rho, rho-0.2, rho-0.4] for spatial."""
    if kind == "spatial":
        return [round(ratio - 0.2 * s, 6) for s in range(stages)]
    return [ratio ** (s + 1) for s in range(stages)]


@dataclass
class SparsifyConfig:
    """How a model was sparsified. Saved with the model; enough to redo the rewrite on the original architecture.

    Attributes:
        ratio: the base keep ratio rho.
        locations: chain indices of the blocks each predictor precedes.
        keep_ratios: per-stage fraction of the initial patch tokens (or spatial locations) kept.
        kind: "token" (tokens removed in eval) or "spatial" (slow/fast paths, map kept whole).
        chain: qualified names of the chain's blocks, in order.
        prefix_tokens: tokens never pruned (class, distillation, register tokens).
        model_name: the timm/torchvision name when known, for reports and rebuilding.
        input_size: (C, H, W) of the example input the model was traced with.
        learned: whether `keep_ratios` were learned during fine-tuning.
        source: how to rebuild the original architecture, e.g. {"library": "timm", "name": ..., "kwargs": {...}};
            taken from the `tokenprune_source` attribute that `tokenprune.create_model` sets, else None.
        scorer: how stages rank tokens, "predictor" (learned) or "attention" (training-free).
        decisions: "nested" (each stage chooses among what the previous one kept: always so for tokens) or
            "independent" (each spatial stage chooses among all locations, the official spatial variant).
        fast_path: "block" or "scaled", the form of spatial fast paths (`FAST_PATHS`); files without it: "scaled".
    """

    ratio: float
    locations: list[int]
    keep_ratios: list[float]
    kind: str = "token"
    chain: list[str] = field(default_factory=list)
    prefix_tokens: int = 0
    model_name: str | None = None
    input_size: tuple[int, int, int] | None = None
    learned: bool = False
    source: dict[str, Any] | None = None
    scorer: str = "predictor"
    decisions: str = "nested"
    fast_path: str = "scaled"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values: numbers as Python floats/ints whatever `sparsify` was given (NumPy, tensors)."""
        data = asdict(self)
        data["ratio"] = float(self.ratio)
        data["keep_ratios"] = [float(r) for r in self.keep_ratios]
        data["locations"] = [int(i) for i in self.locations]
        data["prefix_tokens"] = int(self.prefix_tokens)
        data["input_size"] = [int(v) for v in self.input_size] if self.input_size else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsifyConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if known.get("input_size") is not None:
            known["input_size"] = tuple(known["input_size"])
        try:
            return cls(**known)
        except TypeError as e:
            raise ConfigError(f"malformed sparsify configuration {data!r}: {e}") from None
