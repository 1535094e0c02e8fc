"""Records the chain's final tokens and assembles `SparsityState` from the stages' decisions."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import TokenPruneError
from ..state import SparsityState
from .select import TokenSelector, drop_transient

__all__ = ["SparsityRecorder", "find_recorder", "model_state", "selectors"]


class SparsityRecorder(nn.Module):
    _transient = ("last_tokens", "last_policy")

    """Identity on the chain's output that remembers it (and its keep policy) for the losses.

    Args:
        chain_output: qualified name of the chain's last block.
        prefix_tokens: number of leading tokens never pruned.
    """

    def __init__(self, chain_output: str, prefix_tokens: int) -> None:
        super().__init__()
        self.config = None  # the SparsifyConfig, set by sparsify: a submodule's attribute survives deepcopy
        self.chain_output = chain_output
        self.prefix_tokens = prefix_tokens
        self.last_tokens: torch.Tensor | None = None
        self.last_policy: torch.Tensor | None = None

    __getstate__ = drop_transient

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None) -> torch.Tensor:
        self.last_tokens, self.last_policy = x, policy
        return x

    def state(self, selectors: list[TokenSelector]) -> SparsityState:
        """Assemble the state of the last forward from this recorder and the model's stages, in stage order."""
        if self.last_tokens is None:
            raise TokenPruneError("the sparsified model has not run a forward pass yet; call it on a batch first.")
        x, p = self.last_tokens, self.prefix_tokens
        batch = x.shape[0]
        decisions: list[torch.Tensor] = []
        position = None  # [B, n] initial patch position of each token kept so far (pruned execution)
        for sel in selectors:
            if sel.last_index is None:
                decisions.append(sel.last_decision)
                continue
            position = sel.last_index if position is None else position.gather(1, sel.last_index)
            mask = torch.zeros(batch, sel.last_initial_patches, 1, device=x.device)
            decisions.append(mask.scatter(1, position.unsqueeze(-1), 1.0))
        prefix_index = torch.arange(p, device=x.device).expand(batch, p)
        if position is None:
            index = torch.arange(x.shape[1], device=x.device).expand(batch, -1)
            mask = self.last_policy if self.last_policy is not None else torch.ones_like(x[..., :1])
        else:
            index = torch.cat([prefix_index, position + p], dim=1)
            mask = torch.ones_like(x[..., :1])
        ratios = torch.tensor([sel.keep_ratio for sel in selectors])
        return SparsityState(decisions, ratios, x, mask, index, p, self.chain_output)


def selectors(model: nn.Module) -> list[TokenSelector]:
    """The sparsification stages of `model`, in stage order (empty for a model that is not sparsified)."""
    return sorted((m for m in model.modules() if isinstance(m, TokenSelector)), key=lambda m: m.stage)


def model_state(model: nn.Module) -> SparsityState:
    """`SparsityState` of the last forward of `model`."""
    return find_recorder(model).state(selectors(model))


def find_recorder(model: nn.Module) -> SparsityRecorder:
    """The recorder of a sparsified model (DDP/compile wrappers are looked through via `modules()`)."""
    for module in model.modules():
        if isinstance(module, SparsityRecorder):
            return module
    raise TokenPruneError(
        f"{type(model).__name__} is not a sparsified model (no tokenprune recorder found); "
        "pass the result of tokenprune.sparsify(...)."
    )
