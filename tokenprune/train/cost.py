"""The compute model behind learned keep ratios: chain MACs as a differentiable function of per-stage keep ratios.

`ComputeModel.calibrate` measures it on the real sparsified model with fvcore (`tokenprune.measure.profile_flops`,
the counter behind `tokenprune.profile`): one block per segment of the chain and one predictor per stage are profiled
at three token counts (or kept-location counts), and a quadratic c0 + c1 n + c2 n^2 is fitted through the three
points. Attention makes a token block quadratic in n; a spatial block is linear in the kept locations (slow path on
them, fast path on the others, depthwise conv or window attention on the whole map), which the fit recovers with
c2 ~ 0. Three points determine the quadratic, so whatever the block holds (MLP width, heads, windows, fused attention)
is counted as fvcore counts it. `ComputeModel.from_formula` keeps the former hand formula for tests and sketches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["CostCurve", "ComputeModel"]


@dataclass(frozen=True)
class CostCurve:
    """Multiply-adds of one module as c0 + c1 n + c2 n^2 in the count n of tokens (or kept locations) it sees."""

    c0: float
    c1: float = 0.0
    c2: float = 0.0

    def __call__(self, n: Tensor | float) -> Tensor | float:
        return self.c0 + self.c1 * n + self.c2 * n * n

    @classmethod
    def fit(cls, points: Sequence[tuple[float, float]]) -> CostCurve:
        """The quadratic through three (n, MACs) points; a constant for one point, a line for two."""
        if len(points) == 1:
            return cls(float(points[0][1]))
        xs = torch.tensor([p[0] for p in points], dtype=torch.float64)
        ys = torch.tensor([p[1] for p in points], dtype=torch.float64)
        degree = min(len(points) - 1, 2)
        vander = torch.stack([xs**d for d in range(degree + 1)], dim=1)
        coeffs = torch.linalg.lstsq(vander, ys[:, None]).solution[:, 0].tolist()
        return cls(*(float(c) for c in coeffs))


@dataclass
class ComputeModel:
    """Multiply-adds of a sparsified chain (blocks and predictors) as a function of its per-stage keep ratios.

    The chain is cut by the stages into segments: segment 0 (blocks before the first stage) always sees every token;
    segment s sees prefix + rho_s * patches of them (spatial: rho_s * H*W kept locations). Stage s's predictor sees
    what segment s - 1 saw.

    Attributes:
        locations: chain indices of the blocks each predictor precedes.
        depth: blocks in the chain.
        patches: prunable tokens (or spatial locations) at the chain's input.
        prefix: tokens that are never pruned (class, distillation, registers); 0 for spatial chains.
        blocks: cost of one block of each segment (S + 1 curves), as a function of the tokens it sees.
        predictors: cost of each stage's predictor (S curves), as a function of the tokens it sees.
        kind: "token" or "spatial" (for messages).
    """

    locations: list[int]
    depth: int
    patches: int
    prefix: int
    blocks: list[CostCurve]
    predictors: list[CostCurve]
    kind: str = "token"
    points: dict[str, list[tuple[int, int]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.locations or sorted(self.locations) != list(self.locations) or self.locations[-1] >= self.depth:
            raise ConfigError(f"locations {self.locations} must be increasing chain indices below depth {self.depth}.")
        if len(self.blocks) != len(self.locations) + 1 or len(self.predictors) != len(self.locations):
            raise ConfigError(
                f"a compute model of {len(self.locations)} stages needs {len(self.locations) + 1} block curves and "
                f"{len(self.locations)} predictor curves; got {len(self.blocks)} and {len(self.predictors)}."
            )

    # -- evaluation -----------------------------------------------------------------------------------------------
    def _counts(self, keep_ratios: Tensor) -> list[Tensor]:
        full = torch.tensor(float(self.prefix + self.patches), dtype=keep_ratios.dtype, device=keep_ratios.device)
        return [full] + [self.prefix + keep_ratios[s] * self.patches for s in range(len(self.locations))]

    def dense(self) -> float:
        """Multiply-adds of the dense chain (every block on every token, no predictors)."""
        full = float(self.prefix + self.patches)
        bounds = [0, *self.locations, self.depth]
        return float(sum((bounds[s + 1] - bounds[s]) * self.blocks[s](full) for s in range(len(self.blocks))))

    def macs(self, keep_ratios: Tensor) -> Tensor:
        """Multiply-adds of the sparse chain, predictors included, differentiable in `keep_ratios` [S]."""
        counts = self._counts(keep_ratios)
        bounds = [0, *self.locations, self.depth]
        total = counts[0].new_zeros(())
        for s in range(len(self.blocks)):
            total = total + (bounds[s + 1] - bounds[s]) * self.blocks[s](counts[s])
            if s > 0:
                total = total + self.predictors[s - 1](counts[s - 1])
        return total

    def ratio(self, keep_ratios: Tensor) -> Tensor:
        """Estimated sparse/dense compute of the chain (predictors included)."""
        return self.macs(keep_ratios) / self.dense()

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_formula(
        cls,
        kind: str,
        depth: int,
        locations: list[int],
        dim: int,
        patches: int,
        prefix: int = 0,
        mlp_ratio: float = 4.0,
    ) -> ComputeModel:
        """The hand formula (an approximation; the trainer uses `calibrate`).

        Token blocks on n tokens of width C: (4 + 2r) n C^2 + 2 n^2 C; predictors 1.625 C^2 + C/2 per scored patch.
        Spatial blocks (docs/design.md §1.2): 49 HW C (7x7 depthwise) + 2r C^2 per kept location + C^2 per other
        location.
        """
        c, r = float(dim), float(mlp_ratio)
        if kind == "spatial":
            hw = float(patches)
            block = CostCurve(49 * hw * c + hw * c * c, 2 * r * c * c - c * c)
            predictor = CostCurve(hw * (1.625 * c * c + c / 2))
            prefix = 0
        else:
            block = CostCurve(0.0, (4 + 2 * r) * c * c, 2 * c)
            per = 1.625 * c * c + c / 2
            predictor = CostCurve(-prefix * per, per)
        return cls(
            list(locations), depth, patches, prefix, [block] * (len(locations) + 1), [predictor] * len(locations), kind
        )

    @classmethod
    @torch.no_grad()
    def calibrate(cls, model: nn.Module, example: Tensor) -> ComputeModel:
        """Measure the cost model of a `tokenprune.sparsify` result with fvcore.

        One eval forward on `example` (every stage keeping everything, so each module's recorded input is full size)
        records the inputs of the first block of each segment and of each predictor; each is then profiled alone at
        the full, half and quarter token count. No random numbers are drawn and the model's modes, keep ratios and
        recorded state are left as they were.

        Args:
            model: the sparsified model.
            example: one input batch (a single image is enough), on the model's device.

        Raises:
            ConfigError: the model is not sparsified or its config lacks the chain's block names.
        """
        from ..nn.recorder import selectors
        from ..sparsify import find_config

        config = find_config(model)
        if config is None or not config.chain:
            raise ConfigError(
                f"{type(model).__name__} is not a tokenprune.sparsify result with a recorded chain, so its cost "
                "model cannot be measured; sparsify it first."
            )
        sels = selectors(model)
        locations, depth = list(config.locations), len(config.chain)
        starts = [0, *locations]
        spatial = config.kind == "spatial"
        seen: dict[str, tuple[tuple, dict]] = {}
        hooks = [
            model.get_submodule(config.chain[i]).register_forward_pre_hook(
                _recorder(seen, f"block{s}"), with_kwargs=True
            )
            for s, i in enumerate(starts)
        ]
        hooks += [
            sel.predictor.register_forward_pre_hook(_recorder(seen, f"stage{s}"), with_kwargs=True)
            for s, sel in enumerate(sels)
        ]
        modes = {m: m.training for m in model.modules()}
        ratios = [sel.keep_ratio for sel in sels]
        transient = [(sel, sel.last_decision, sel.last_index, sel.last_initial_patches) for sel in sels]
        try:
            model.eval()
            for sel in sels:
                sel.keep_ratio = 1.0
            model(example[:1])
        finally:
            for h in hooks:
                h.remove()
            for m, mode in modes.items():
                m.training = mode
            for sel, r, (_, d, i, n) in zip(sels, ratios, transient, strict=True):
                sel.keep_ratio, sel.last_decision, sel.last_index, sel.last_initial_patches = r, d, i, n

        x0 = seen["block0"][0][0]
        if spatial:
            patches, prefix = x0.numel() // (x0.shape[0] * x0.shape[sels[0].channel]), 0
        else:
            prefix = int(config.prefix_tokens)
            patches = int(x0.shape[1]) - prefix
        full = prefix + patches
        counts = sorted({full, prefix + max(1, math.ceil(patches / 2)), prefix + max(1, math.ceil(patches / 4))})
        points: dict[str, list[tuple[int, int]]] = {}
        for s in range(len(starts)):
            module = model.get_submodule(config.chain[starts[s]])
            resize = _spatial_block if spatial else _token_block
            points[f"block{s}"] = _profile(module, seen[f"block{s}"], counts if s else [full], resize, prefix, patches)
        for s, sel in enumerate(sels):
            resize = _spatial_predictor if spatial else _token_predictor
            points[f"stage{s}"] = _profile(
                sel.predictor, seen[f"stage{s}"], counts if s else [full], resize, prefix, patches
            )
        blocks = [CostCurve.fit(points[f"block{s}"]) for s in range(len(starts))]
        predictors = [CostCurve.fit(points[f"stage{s}"]) for s in range(len(sels))]
        return cls(locations, depth, patches, prefix, blocks, predictors, config.kind, points)


def _recorder(store: dict[str, tuple[tuple, dict]], key: str) -> Callable:
    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        store.setdefault(key, (args, kwargs))

    return hook


class _Call(nn.Module):
    """Calls `module` with fixed arguments, so fvcore can trace a module whose forward takes kwargs and ints."""

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.module, self.args, self.kwargs = module, args[1:], kwargs

    def forward(self, x: Tensor) -> Any:
        return self.module(x, *self.args, **self.kwargs)


def _token_block(args: tuple, kwargs: dict, n: int, prefix: int, patches: int) -> tuple[tuple, dict]:
    return (args[0][:, :n], *args[1:]), kwargs  # the first n tokens (prefix first); eval blocks take no policy


def _token_predictor(args: tuple, kwargs: dict, n: int, prefix: int, patches: int) -> tuple[tuple, dict]:
    return (args[0][:, : n - prefix], *args[1:]), kwargs  # a predictor scores the patch tokens only


def _spatial_block(args: tuple, kwargs: dict, n: int, prefix: int, patches: int) -> tuple[tuple, dict]:
    from ..fx.spatial import BLOCK_INPUTS

    if kwargs.get("tokenprune_keep") is None:
        return args, kwargs  # a block before the first stage: dense
    index = torch.arange(patches, device=args[0].device)[None]
    # reason: gathered execution, slow path at n kept locations and the fast path at the others
    return args, {**kwargs, **dict(zip(BLOCK_INPUTS, (None, index[:, :n], index[:, n:])))}


def _spatial_predictor(args: tuple, kwargs: dict, n: int, prefix: int, patches: int) -> tuple[tuple, dict]:
    # A later stage scores the whole map under the previous stage's mask of n kept locations.
    policy = torch.zeros(args[0].shape[0], patches, 1, device=args[0].device)
    policy[:, :n] = 1.0
    return (args[0], policy), {}


def _profile(
    module: nn.Module, call: tuple[tuple, dict], counts: list[int], resize: Callable, prefix: int, patches: int
) -> list[tuple[int, int]]:
    """(count, MACs per image) of `module` on its recorded input, resized by `resize` to each of `counts`."""
    from ..measure.flops import profile_flops

    out = []
    for n in counts:
        args, kwargs = resize(*call, n, prefix, patches)
        report = profile_flops(_Call(module, args, kwargs), args[0])
        out.append((n, report.total_macs // report.batch_size))
    return out
