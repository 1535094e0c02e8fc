"""The one cost model behind decisions: chain multiply-adds as a differentiable function of per-stage keep ratios.

`ComputeModel.calibrate` measures it on the real sparsified model with fvcore (`profile_flops`, the counter behind
`tokenprune.profile`): every block of the chain and every predictor is profiled alone at three token counts (or
kept-location counts) and a quadratic c0 + c1 n + c2 n^2 is fitted through the three points. Attention makes a token
block quadratic in n; a spatial block is linear in the kept locations (slow path on them, fast path on the others,
depthwise conv or window attention on the whole map), which the fit recovers with c2 ~ 0. Three points determine the
quadratic, so whatever the block holds (MLP width, heads, windows, fused attention) is counted as fvcore counts it.
Blocks that are alike (same class, code, parameter and input shapes) are profiled once.

Two decisions read it: `tokenprune.sparsify` refuses a model that pruning would not make cheaper (`refuse_costlier`),
and learned keep ratios are trained against its estimate (`tokenprune.train.ratios`). `ComputeModel.from_formula`
keeps a hand formula for tests and sketches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, UnsupportedModelError
from ..fx.spatial import BLOCK_INPUTS
from .backbone import eval_forward
from .flops import profile_flops

__all__ = ["CostCurve", "ComputeModel", "refuse_costlier"]


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
        blocks: cost of each block of the chain (`depth` curves), as a function of the tokens it sees.
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
        if len(self.blocks) != self.depth or len(self.predictors) != len(self.locations):
            raise ConfigError(
                f"a compute model of {self.depth} blocks and {len(self.locations)} stages needs {self.depth} block "
                f"curves and {len(self.locations)} predictor curves; got {len(self.blocks)} and {len(self.predictors)}."
            )

    # -- evaluation -----------------------------------------------------------------------------------------------
    def segment(self, block: int) -> int:
        """The segment of chain index `block`: how many stages run before it."""
        return sum(loc <= block for loc in self.locations)

    def _counts(self, keep_ratios: Tensor) -> list[Tensor]:
        full = torch.tensor(float(self.prefix + self.patches), dtype=keep_ratios.dtype, device=keep_ratios.device)
        return [full] + [self.prefix + keep_ratios[s] * self.patches for s in range(len(self.locations))]

    def dense(self) -> float:
        """Multiply-adds of the dense chain (every block on every token, no predictors)."""
        full = float(self.prefix + self.patches)
        return float(sum(curve(full) for curve in self.blocks))

    def macs(self, keep_ratios: Tensor) -> Tensor:
        """Multiply-adds of the sparse chain, predictors included, differentiable in `keep_ratios` [S]."""
        counts = self._counts(keep_ratios)
        total = counts[0].new_zeros(())
        for i, curve in enumerate(self.blocks):
            total = total + curve(counts[self.segment(i)])
        for s, curve in enumerate(self.predictors):
            total = total + curve(counts[s])
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
        return cls(list(locations), depth, patches, prefix, [block] * depth, [predictor] * len(locations), kind)

    @classmethod
    @torch.no_grad()
    def calibrate(cls, model: nn.Module, example: Tensor) -> ComputeModel:
        """Measure the cost model of a `tokenprune.sparsify` result with fvcore.

        Three eval forwards on `example[:1]`, with every stage keeping all, half and a quarter of the patch tokens (or
        locations), record the real inputs of every chain block and predictor, whatever else the model passes them
        (rotary embeddings gathered with the tokens, a spatial block's kept and dropped indices); each is then
        profiled alone at each token count it saw (blocks before the first stage and the first predictor at the full
        count only) and fitted. No random numbers are drawn and the model's modes, keep ratios and recorded state are
        left as they were.

        Args:
            model: the sparsified model.
            example: one input batch (a single image is enough), on the model's device.

        Raises:
            ConfigError: the model is not sparsified or its config lacks the chain's block names.
        """
        from ..nn.recorder import find_config, selectors

        config = find_config(model)
        if config is None or not config.chain:
            raise ConfigError(
                f"{type(model).__name__} is not a tokenprune.sparsify result with a recorded chain, so its cost "
                "model cannot be measured; sparsify it first."
            )
        sels = selectors(model)
        locations, depth = list(config.locations), len(config.chain)
        modules = [model.get_submodule(name) for name in config.chain] + [sel.predictor for sel in sels]
        runs = [_record_inputs(model, example[:1], modules, keep) for keep in (1.0, 0.5, 0.25)]
        spatial = config.kind == "spatial"
        x0 = runs[0][0][0][0]
        if spatial:
            patches, prefix = x0.numel() // x0.shape[sels[0].channel], 0
        else:
            prefix = int(config.prefix_tokens)
            patches = int(x0.shape[1]) - prefix
        full = prefix + patches

        def seen(call: tuple[tuple, dict]) -> int:  # what the first block after a stage sees
            return int(call[1][BLOCK_INPUTS[1]].shape[1]) if spatial else int(call[0][0].shape[1])

        counts = [seen(run[locations[0]]) for run in runs]
        profiled: dict[tuple, int] = {}

        def measure(k: int, at_full: bool) -> list[tuple[int, int]]:
            out: dict[int, int] = {}
            for n, run in zip(counts, runs[:1] if at_full else runs, strict=False):
                key = _signature(modules[k], run[k])
                if key not in profiled:
                    profiled[key] = _profile(modules[k], run[k])
                out.setdefault(full if at_full else n, profiled[key])
            return sorted(out.items())

        points = {f"block{i}": measure(i, i < locations[0]) for i in range(depth)}
        points.update({f"stage{s}": measure(depth + s, s == 0) for s in range(len(sels))})
        curves = [CostCurve.fit(points[f"block{i}"]) for i in range(depth)]
        predictors = [CostCurve.fit(points[f"stage{s}"]) for s in range(len(sels))]
        return cls(locations, depth, patches, prefix, curves, predictors, config.kind, points)


def refuse_costlier(compute: ComputeModel, keep_ratios: Sequence[float], chain: Sequence[str], where: str) -> None:
    """Refuse a sparsified chain that pruning does not make cheaper, by the calibrated cost model.

    Two ways to fail, each an `UnsupportedModelError` naming the block or the figures: a block after the first stage
    that costs no less on half its tokens (or kept locations) than on all of them, whatever the keep ratio (RegNet's
    single 1x1 conv tail, where the fast path costs what the slow path does); or a chain whose blocks and predictors
    at `keep_ratios` cost at least what the dense chain does (a keep ratio of 1, or stages too late to pay for their
    predictors).
    """
    for i, name in enumerate(chain):
        pts = dict(compute.points.get(f"block{i}", ()))
        if len(pts) < 2:
            continue  # before the first stage: dense
        full, half = max(pts), sorted(pts)[-2]
        if pts[half] >= pts[full]:
            spatial = compute.kind == "spatial"
            hint = (
                "Spatial sparsification pays off for blocks with a wide per-location MLP (ConvNeXt, Swin: 8 C^2 per "
                "location)." if spatial else "Token pruning pays off for blocks whose cost grows with the tokens they "
                "see (attention, a per-token MLP); sparsify a chain of such blocks (`locations=`)."
            )  # fmt: skip
            raise UnsupportedModelError(
                f"{where}: block {name} costs {pts[full]:,} multiply-adds on all {full} "
                f"{'kept locations' if spatial else 'tokens'} and {pts[half]:,} on {half}; pruning it would not save "
                f"compute, so tokenprune refuses. {hint}"
            )
    keep = torch.tensor(list(keep_ratios), dtype=torch.float64)
    sparse, dense = float(compute.macs(keep)), compute.dense()
    if sparse >= dense:
        ratios = ", ".join(f"{r:g}" for r in keep_ratios)
        raise UnsupportedModelError(
            f"{where}: at keep ratios [{ratios}] the sparsified chain would cost {sparse:,.0f} multiply-adds per "
            f"image, predictors included, against {dense:,.0f} for the dense chain; it would not save compute, so "
            "tokenprune refuses. Choose lower keep ratios or earlier locations."
        )


def _record_inputs(model: nn.Module, example: Tensor, modules: list[nn.Module], keep: float) -> list:
    """The (args, kwargs) each of `modules` is called with in one eval forward with every stage keeping `keep` of
    the patch tokens. The model's modes, keep ratios and what its stages and recorder remember of the last forward
    (`sparsity_state`) are put back afterwards."""
    from ..nn.recorder import selectors

    seen: dict[int, tuple[tuple, dict]] = {}
    hooks = [m.register_forward_pre_hook(_recorder(seen, k), with_kwargs=True) for k, m in enumerate(modules)]
    remembered = [
        (m, name, getattr(m, name))
        for m in model.modules()
        for name in (*getattr(m, "_transient", ()), "keep_ratio", "last_initial_patches")
        if hasattr(m, name)
    ]
    try:
        for sel in selectors(model):
            sel.keep_ratio = keep
        eval_forward(model, example, hooks)
    finally:
        for m, name, value in remembered:
            setattr(m, name, value)
    return [seen[k] for k in range(len(modules))]


def _signature(module: nn.Module, call: tuple[tuple, dict]) -> tuple:
    """What decides a module's cost: its class and code, its parameter and buffer shapes and its input shapes."""

    def frozen(value: Any) -> Any:
        if isinstance(value, Tensor):
            return ("tensor", tuple(value.shape), value.dtype)
        if isinstance(value, (list, tuple)):
            return tuple(frozen(v) for v in value)
        if isinstance(value, dict):
            return tuple(sorted((k, frozen(v)) for k, v in value.items()))
        return repr(value)

    return (
        type(module).__qualname__,
        getattr(module, "code", None),
        tuple((n, tuple(t.shape)) for n, t in [*module.named_parameters(), *module.named_buffers()]),
        frozen(call),
    )


def _recorder(store: dict[int, tuple[tuple, dict]], key: int) -> Callable:
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


def _profile(module: nn.Module, call: tuple[tuple, dict]) -> int:
    """Multiply-adds per image of `module` on a recorded call."""
    args, kwargs = call
    report = profile_flops(_Call(module, args, kwargs), args[0])
    return report.total_macs // report.batch_size
