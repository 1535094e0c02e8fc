"""Records the chain's final tokens and assembles `SparsityState` from the stages' decisions.

`tokenprune.state` is the public view of it: the model's forward returns what the original model returned, so
training losses (docs/design.md §3.1) read the decisions of the last forward here instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SparsifyConfig
from ..errors import TokenPruneError
from .select import TokenSelector, drop_transient

__all__ = ["DistillationPoint", "SparsityState", "SparsityRecorder", "find_recorder", "model_state", "selectors"]


@dataclass(frozen=True)
class DistillationPoint:
    """Where feature distillation reads a model (docs/design.md §3.1): the output of the module `module`, normalised
    per location by the LayerNorm `norm` over the channel dim `channel` where one is named (ConvNeXt's head norm,
    which the model itself applies after pooling). The same point is read on the student and on the teacher, each
    normalised by its own norm, as the official DynamicViT code does.
    """

    module: str
    norm: str | None = None
    channel: int = -1

    def features(self, root: nn.Module, output: torch.Tensor) -> torch.Tensor:
        """`output` of the module, normalised by `root`'s module named `norm` (unchanged when there is none)."""
        if self.norm is None:
            return output
        norm = root.get_submodule(self.norm)
        x = output.movedim(self.channel, -1)
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps).movedim(-1, self.channel)


@dataclass
class SparsityState:
    """Decisions of the last forward pass of a sparsified model.

    Attributes:
        decisions: one tensor per stage, [B, N_patches, 1], the stage's keep decision over the *initial* patch
            tokens (1 = kept). In train mode these are hard Gumbel-softmax samples with straight-through gradients,
            already multiplied by the earlier stages' decisions (docs/design.md §1.1, D_s). In pruned (eval)
            execution they are the top-k masks, without gradient.
        keep_ratios: the per-stage target fraction of initial patch tokens, as a float tensor [S] (a learned
            parameter's current value when keep ratios are learned).
        final_tokens: the output of the chain's last block, [B, N_final, C]. In masked execution N_final equals the
            initial token count; in pruned execution only kept tokens remain.
        final_mask: [B, N_final, 1] keep mask of `final_tokens` (prefix tokens are 1). In pruned execution all ones.
        final_index: [B, N_final] position of each final token in the initial sequence (prefix tokens included), so
            a teacher's tokens can be compared at the same positions.
        prefix_tokens: number of leading tokens that are never pruned.
        chain_output: qualified name of the chain's last block; hook the same name on the teacher to get its tokens.
        final_norm: qualified name of the model's final norm when it is the only reader of the chain's output and
            normalises each token on its own (a LayerNorm or RMSNorm over channels, as in ViT/DeiT); None otherwise.
            Token distillation compares tokens after it, as the official DynamicViT code does (docs/design.md §3.1).
        final_normed: `final_tokens` after `final_norm` (same positions), or None when there is no final norm.
            Spatial models: the final-stage map the head pools, normalised as `final_map` says, or None.
        final_map: spatial models: where the final-stage map is read and how it is normalised (qualified names in
            the whole model, so a teacher is hooked by them); None for token models and for models whose output is
            not pooled from one map (`features_only` backbones), which distil the chain's output.
    """

    decisions: list[torch.Tensor]
    keep_ratios: torch.Tensor
    final_tokens: torch.Tensor | None
    final_mask: torch.Tensor | None
    final_index: torch.Tensor | None
    prefix_tokens: int
    chain_output: str
    final_norm: str | None = None
    final_normed: torch.Tensor | None = None
    final_map: DistillationPoint | None = None


class SparsityRecorder(nn.Module):
    _transient = ("last_tokens", "last_policy", "last_normed")

    """Identity on the chain's output that remembers it (and its keep policy) for the losses; called a second time
    (``normed=True``) on the final norm's output where the model has one.

    Args:
        chain_output: qualified name of the chain's last block.
        prefix_tokens: number of leading tokens never pruned.
        final_norm: qualified name of the per-token norm that alone reads the chain's output, or None.
    """

    def __init__(self, chain_output: str, prefix_tokens: int, final_norm: str | None = None) -> None:
        super().__init__()
        self.config = None  # the SparsifyConfig, set by sparsify: a submodule's attribute survives deepcopy
        self.chain_output = chain_output
        self.prefix_tokens = prefix_tokens
        self.final_norm = final_norm
        self.last_tokens: torch.Tensor | None = None
        self.last_policy: torch.Tensor | None = None
        self.last_normed: torch.Tensor | None = None

    __getstate__ = drop_transient

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None, normed: bool = False) -> torch.Tensor:
        if normed:
            self.last_normed = x
        else:
            self.last_tokens, self.last_policy, self.last_normed = x, policy, None
        return x

    def state(self, selectors: list[TokenSelector], root: nn.Module | None = None) -> SparsityState:
        """Assemble the state of the last forward from this recorder and the model's stages, in stage order.

        Args:
            selectors: the model's stages.
            root: the sparsified module that holds this recorder (its module names are the recorder's).
        """
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
        normed = self.last_normed
        if normed is not None and normed.shape[:2] != x.shape[:2]:
            normed = None  # a head that needs every token refilled them before the norm (pruned execution)
        return SparsityState(decisions, ratios, x, mask, index, p, self.chain_output, self.final_norm, normed)


def selectors(model: nn.Module) -> list[TokenSelector]:
    """The sparsification stages of `model`, in stage order (empty for a model that is not sparsified)."""
    return sorted((m for m in model.modules() if isinstance(m, TokenSelector)), key=lambda m: m.stage)


def model_state(model: nn.Module) -> SparsityState:
    """`SparsityState` of the last forward of `model`."""
    recorder = find_recorder(model)
    root = next((m for m in model.modules() if any(c is recorder for c in m.children())), None)
    return recorder.state(selectors(model), root)


def config_of(model: nn.Module) -> SparsifyConfig:
    """The `SparsifyConfig` of a sparsified model, with keep ratios as the stages currently hold them."""
    config = find_recorder(model).config
    config.keep_ratios = [sel.keep_ratio for sel in selectors(model)]
    return config


def find_config(model: nn.Module) -> SparsifyConfig | None:
    """`config_of(model)` for a sparsified model, None for any other (DDP wrappers are looked through)."""
    return config_of(model) if selectors(model) else None


def find_recorder(model: nn.Module) -> SparsityRecorder:
    """The recorder of a sparsified model (DDP/compile wrappers are looked through via `modules()`)."""
    for module in model.modules():
        if isinstance(module, SparsityRecorder):
            return module
    raise TokenPruneError(
        f"{type(model).__name__} is not a sparsified model (no tokenprune recorder found); "
        "pass the result of tokenprune.sparsify(...)."
    )
