"""Modules and functions that the graph rewrite inserts. They know nothing of torch.fx, except that the functions
record themselves as one call when a rewritten graph is traced again (`leaf.one_call`)."""

from .masked import fused_masked_attention, masked_attention, masked_mha, masked_sdpa, masked_softmax
from .predictor import TokenPredictor
from .recorder import SparsityRecorder
from .select import TokenSelector
from .tokenops import masked_token_mean

__all__ = [
    "TokenPredictor",
    "TokenSelector",
    "SparsityRecorder",
    "fused_masked_attention",
    "masked_attention",
    "masked_mha",
    "masked_sdpa",
    "masked_softmax",
    "masked_token_mean",
]
