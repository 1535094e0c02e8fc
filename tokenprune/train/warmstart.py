"""Predictor warm start: learned predictors first imitate the training-free attention scorer (docs/design.md §3.4).

Freshly inserted predictors score tokens at random, and the DynamicViT objective needs many steps to move them (the
CE gradient through the masked attention is small and noisy). The attention scorer (`nn/scorer.py`) gives a usable
ranking with no training. A warm start trains only the predictors, backbone frozen, to reproduce the attention
scorer's decisions: a *guide* (the teacher sparsified with ``scorer="attention"`` at the student's stages and keep
ratios) runs masked with its top-k decisions; each student predictor sees the guide's input to its stage (tokens
and keep policy: the backbone is the teacher's, so these are the student's own stage inputs under the guide's
decisions) and is trained with the negative log-likelihood of the guide's keep/drop decision over the tokens still
kept. Then fine-tuning starts from predictors that already rank like attention.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..errors import ConfigError
from ..models import copy_model
from .distributed import DistInfo, all_reduce_sum

__all__ = ["warm_start", "decision_nll"]


def decision_nll(log_probs: torch.Tensor, decision: torch.Tensor, alive: torch.Tensor | None) -> torch.Tensor:
    """Mean NLL of (keep, drop) log-probabilities [B, N, 2] for the decisions [B, N, 1] over alive tokens [B, N, 1]."""
    nll = -(decision * log_probs[..., :1] + (1.0 - decision) * log_probs[..., 1:])
    if alive is None:
        return nll.mean()
    alive = alive.to(nll.dtype)
    return (nll * alive).sum() / alive.sum().clamp_min(1.0)


def _agreement(log_probs: torch.Tensor, decision: torch.Tensor, alive: torch.Tensor | None) -> float:
    """Fraction of the guide's kept tokens that the predictor's own top-k (same k, among alive tokens) keeps too."""
    score = log_probs[..., 0]
    if alive is not None:
        score = score.masked_fill(alive[..., 0] == 0, float("-inf"))
    kept = decision[..., 0] > 0.5
    k = int(kept.sum(dim=1).max())
    if k == 0:
        return 1.0
    mine = torch.zeros_like(kept).scatter(1, score.topk(k, dim=1).indices, True)
    return float((mine & kept).sum() / kept.sum())


def warm_start(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    lr: float,
    info: DistInfo,
    log: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train `student`'s predictors for `steps` batches to reproduce the attention scorer's decisions.

    Args:
        student: a sparsified model with learned predictors (``scorer="predictor"``).
        teacher: the dense model it was sparsified from (its backbone is the student's at this point).
        batches: training batches (labels are not used); cycled if shorter than `steps`.
        steps: optimizer steps.
        lr: AdamW learning rate of the predictors.
        info: the process's place in a distributed job (gradients are averaged across ranks).
        log: called as ``log(step, values)`` every 20 steps and at the end.

    Returns:
        The last step's ``loss`` and ``agreement`` (fraction of the guide's kept tokens the predictors' top-k keeps).
    """
    from ..nn.recorder import selectors
    from ..sparsify import config_of, set_execution, sparsify

    config = config_of(student)
    if config.scorer != "predictor":
        raise ConfigError("a warm start trains learned predictors; this student uses the attention scorer.")
    stages = selectors(student)
    device = next(student.parameters()).device
    example = torch.zeros(1, *config.input_size, device=device)
    guide = sparsify(
        copy_model(teacher).eval(),
        config.ratio,
        locations=config.locations,
        keep_ratios=config.keep_ratios,
        example_inputs=example,
        scorer="attention",
    ).eval()
    set_execution(guide, "masked")  # full-length tokens, the guide's top-k decisions as policies
    seen: dict[int, tuple] = {}
    handles = [
        sel.register_forward_pre_hook(lambda _m, args, s=s: seen.__setitem__(s, args[:2]))
        for s, sel in enumerate(selectors(guide))
    ]
    params = [p for sel in stages for p in sel.predictor.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    result: dict[str, float] = {}
    try:
        step = 0
        while step < steps:
            empty = True
            for x, _ in batches:
                empty = False
                with torch.no_grad():
                    guide(x.to(device, non_blocking=True))
                losses, agree = [], []
                for s, sel in enumerate(stages):
                    tokens, policy = seen[s]
                    p = sel.prefix_tokens
                    alive = None if policy is None else policy[:, p:]
                    decision = selectors(guide)[s].last_decision
                    log_probs = sel.predictor(tokens[:, p:], alive)
                    losses.append(decision_nll(log_probs, decision, alive))
                    agree.append(_agreement(log_probs.detach(), decision, alive))
                loss = torch.stack(losses).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if info.enabled:
                    for param in params:
                        if param.grad is not None:
                            all_reduce_sum(param.grad, info).div_(info.world)
                optimizer.step()
                step += 1
                result = {"loss": float(loss.detach()), "agreement": sum(agree) / len(agree)}
                if log is not None and (step % 20 == 0 or step == steps):
                    log(step, result)
                if step >= steps:
                    break
            if empty:
                raise ConfigError("the warm start got no training batches.")
    finally:
        for h in handles:
            h.remove()
        for sel in stages:
            sel.last_decision = sel.last_index = None
    return result
