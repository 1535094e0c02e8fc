"""The pass checks its own output (docs/design.md §2.5): masked ≡ pruned, and keep-all ≡ the original.

Run on the example input in eval mode, after the plan is applied and before `sparsify` returns:

1. pruned execution (tokens gathered) and masked execution (tokens kept, attention masked) with the same top-k
   decisions must give the same outputs: training then optimises the model that is deployed;
2. with every keep ratio at 1.0 the sparsified model must give the original model's outputs: the rewrite of the
   blocks and the head changed nothing but the pruning.

A mismatch beyond float tolerance is an `UnsupportedModelError` that names the first block whose kept tokens differ
(or the head). Cost: three forwards of the sparsified model at the example's batch (two by default).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import TokenPruneError, UnsupportedModelError
from ..nn.recorder import selectors
from .discovery import Chain

__all__ = ["self_check", "max_difference"]

_RTOL, _ATOL = 1e-3, 1e-4


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def max_difference(a: object, b: object) -> float | None:
    """Largest difference between two outputs relative to tolerance (<= 1 means equal); None if shapes differ."""
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb)):
        return None
    worst = 0.0
    for x, y in zip(ta, tb):
        x, y = x.detach().float(), y.detach().float()
        scale = max(1.0, float(y.abs().max())) if y.numel() else 1.0
        err = ((x - y).abs() / (_ATOL * scale + _RTOL * y.abs())).max() if x.numel() else torch.tensor(0.0)
        worst = max(worst, float(err))
    return worst


def _run(model: nn.Module, example: torch.Tensor, execution: str, hooks: list[str]) -> tuple[object, dict]:
    for sel in selectors(model):
        sel.execution = execution
    seen: dict[str, torch.Tensor] = {}
    # A block that also returns attention scores for the next stage (scorer "attention") returns (tokens, scores).
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: seen.__setitem__(n, o[0] if isinstance(o, tuple) else o)
        )
        for n in hooks
    ]
    try:
        with torch.no_grad():
            return model(example), seen
    finally:
        for h in handles:
            h.remove()


def _first_divergence(chain: Chain, locations: list[int], pruned: dict, masked: dict, model: nn.Module) -> str:
    """The first later block whose kept tokens differ between the executions (token chains), else "the head"."""
    if chain.kind != "token":
        for name in chain.names[locations[0] :]:
            d = max_difference(masked.get(name), pruned.get(name))
            if d is None or d > 1:
                return f"block {name}"
        return "the head"
    stages = selectors(model)
    prefix = stages[0].prefix_tokens
    position = None
    stage_at = {loc: s for s, loc in enumerate(locations)}
    for i, name in enumerate(chain.names):
        if i in stage_at:
            idx = stages[stage_at[i]].last_index
            position = idx if position is None else position.gather(1, idx)
        if position is None or name not in pruned:
            continue
        full = masked[name]
        index = torch.cat([torch.arange(prefix).expand(full.shape[0], -1), position + prefix], dim=1)
        kept = full.gather(1, index.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
        d = max_difference(kept, pruned[name])
        if d is None or d > 1:
            return f"block {name}"
    return "the head"


def self_check(model: nn.Module, chain: Chain, locations: list[int], example: torch.Tensor, name: str) -> None:
    """Raise `UnsupportedModelError` unless masked ≡ pruned and keep-all ≡ the original on `example` (eval mode).

    The model's stages are left as they were (execution mode, keep ratios, training flag, nothing recorded).
    """
    stages = selectors(model)
    saved = [(s.execution, s.keep_ratio) for s in stages]
    training = model.training
    model.eval()
    hooks = chain.names[locations[0] :]
    try:
        try:
            pruned, pruned_blocks = _run(model, example, "pruned", hooks)
            masked, masked_blocks = _run(model, example, "masked", hooks)
            for s in stages:
                s.keep_ratio = 1.0
            keep_all, _ = _run(model, example, "pruned", [])
        except TokenPruneError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the rewritten graph raises, the user gets a reason
            raise UnsupportedModelError(
                f"{name}: the sparsified model fails on the example input ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); tokenprune refuses it rather than return a broken model."
            ) from e
        d = max_difference(masked, pruned)
        if d is None or d > 1:
            where = _first_divergence(chain, locations, pruned_blocks, masked_blocks, model)
            raise UnsupportedModelError(
                f"{name}: self-check failed: masked execution (training) and pruned execution (inference) give "
                f"different outputs for the same decisions ({'shapes differ' if d is None else f'{d:.3g}x tolerance'}"
                f"), first in {where}. tokenprune refuses rather than train one model and deploy another."
            )
        d = max_difference(keep_all, chain.reference)
        if d is None or d > 1:
            raise UnsupportedModelError(
                f"{name}: self-check failed: with every keep ratio at 1.0 the rewritten model does not reproduce the "
                f"original ({'shapes differ' if d is None else f'{d:.3g}x tolerance'}); tokenprune refuses it."
            )
    finally:
        for s, (execution, ratio) in zip(stages, saved):
            s.execution, s.keep_ratio = execution, ratio
        for m in model.modules():  # what the check's forwards recorded is not the user's first forward
            for attr in getattr(m, "_transient", ()):
                setattr(m, attr, None)
        model.train(training)
