"""Operator handles for fvcore's jit-trace counter, in the paper's convention: one multiply-add counts as one.

fvcore's defaults miss the attention matmuls hidden inside fused attention ops (`aten::scaled_dot_product_attention`
and its backend variants, `aten::_native_multi_head_attention`), which is why a naive count of DeiT-S reads ~4.25 G
instead of the published 4.6 G. The handles here count them. Everything cheap (element-wise ops, norms, softmax,
top-k, gathers) is zeroed on purpose through `NEGLIGIBLE_OPS`, so that any op *not* listed anywhere is reported by
the analysis as uncounted instead of silently contributing zero.
"""

from __future__ import annotations

from collections.abc import Callable
from math import prod
from typing import Any

from ._fvcore import conv_flop_jit, einsum_flop_jit, get_shape, linear_flop_jit

__all__ = ["Handle", "COUNTED_HANDLES", "NEGLIGIBLE_OPS", "sdpa_macs", "native_mha_macs", "matmul_macs"]

Handle = Callable[[list[Any], list[Any]], Any]


def _shape(value: Any, op: str) -> list[int]:
    shape = get_shape(value)
    if shape is None:
        # reason: a handle must never guess; an incomplete type means the trace lost the shape.
        raise ValueError(f"{op}: the jit trace recorded no complete shape for an input; cannot count its MACs.")
    return list(shape)


def sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """MACs of scaled-dot-product attention: q @ k^T plus attn @ v.

    Covers `aten::scaled_dot_product_attention` and the backend ops it may dispatch to; all of them take
    query [..., L, E], key [..., S, E], value [..., S, Ev] as their first three inputs. Batch and head dims are read
    from the query (grouped-query attention shares key/value heads but still computes one score per query head).
    A causal mask is counted as full attention, like the dense kernels compute it.
    """
    q, k, v = (_shape(x, "scaled_dot_product_attention") for x in inputs[:3])
    rows = prod(q[:-1])  # batch x heads x L
    seq_k = k[-2]
    return rows * seq_k * q[-1] + rows * seq_k * v[-1]


def native_mha_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """MACs of `aten::_native_multi_head_attention` (nn.MultiheadAttention's fused eval path under no_grad).

    Inputs: query [B, L, E], key [B, S, E], value [B, S, E], embed_dim, num_heads, qkv_weight, ... Counts the input
    projections (q on L tokens, k and v on S tokens), both attention matmuls (summed over heads: E per score) and the
    output projection.
    """
    q, k = _shape(inputs[0], "_native_multi_head_attention"), _shape(inputs[1], "_native_multi_head_attention")
    embed = q[-1]
    rows_q, rows_k = prod(q[:-1]), prod(k[:-1])
    seq_k = k[-2] if len(k) >= 2 else 1
    projections = rows_q * embed * embed + 2 * rows_k * embed * embed + rows_q * embed * embed
    attention = 2 * rows_q * seq_k * embed
    return projections + attention


def matmul_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """MACs of matmul/mm/bmm with broadcasting: every output element is a dot product over the shared dim.

    fvcore's matmul handle multiplies the first operand's size by the last dim of the second, which is wrong when
    the second operand carries the broadcast batch dims.
    """
    a = _shape(inputs[0], "matmul")
    out = _shape(outputs[0], "matmul")
    return prod(out) * a[-1]


def _addmm_like_macs(inputs: list[Any], outputs: list[Any]) -> int:
    # reason: addmm/baddbmm take (bias, a, b, ...); the bias add is negligible, the product is a @ b.
    a = _shape(inputs[1], "addmm")
    out = _shape(outputs[0], "addmm")
    return prod(out) * a[-1]


_SDPA_OPS = (
    "aten::scaled_dot_product_attention",
    # backend ops, recorded when tracing code that calls them directly or when the dispatcher is traced below SDPA
    "aten::_scaled_dot_product_attention_math",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_fused_attention_overrideable",
)

#: op name -> handle for every op that is counted.
COUNTED_HANDLES: dict[str, Handle] = {
    "aten::linear": linear_flop_jit,
    "aten::_convolution": conv_flop_jit,
    "aten::conv1d": conv_flop_jit,
    "aten::conv2d": conv_flop_jit,
    "aten::einsum": einsum_flop_jit,
    "aten::matmul": matmul_macs,
    "aten::mm": matmul_macs,
    "aten::bmm": matmul_macs,
    "aten::addmm": _addmm_like_macs,
    "aten::baddbmm": _addmm_like_macs,
    "aten::_native_multi_head_attention": native_mha_macs,
    **dict.fromkeys(_SDPA_OPS, sdpa_macs),
}

#: ops deliberately counted as zero: element-wise, normalisation, reductions, selection and indexing. Their cost is
#: linear in the activation size, a few percent at most of a ViT's matmul cost, and the published figures leave them
#: out. Everything that is neither here, in COUNTED_HANDLES, nor in fvcore's own shape-only list is reported.
NEGLIGIBLE_OPS: tuple[str, ...] = tuple(
    f"aten::{name}"
    for name in (
        # element-wise arithmetic and activations
        "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "neg", "abs", "pow", "sqrt", "rsqrt",
        "exp", "log", "log2", "log1p", "reciprocal", "sign", "lerp", "addcmul", "addcdiv", "fill_", "masked_fill_",
        "gelu", "gelu_", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardswish", "hardsigmoid",
        "hardtanh", "hardtanh_", "leaky_relu", "elu", "softplus", "erf", "clamp_min", "clamp_max", "where",
        "dropout_", "feature_dropout", "alpha_dropout", "lt", "le", "ne", "logical_and", "logical_or", "logical_not",
        # normalisation
        "layer_norm", "group_norm", "batch_norm", "instance_norm", "rms_norm", "native_layer_norm", "norm",
        "linalg_vector_norm", "normalize",
        # softmax and reductions
        "softmax", "log_softmax", "_softmax", "_log_softmax", "mean", "sum", "amax", "amin", "argmax", "argmin",
        "min", "cumsum", "cumprod", "var", "std", "logsumexp", "all", "any",
        # pooling and resampling
        "adaptive_avg_pool1d", "adaptive_avg_pool2d", "avg_pool1d", "avg_pool2d", "max_pool1d", "max_pool2d",
        "max_pool2d_with_indices", "upsample_nearest2d", "upsample_bilinear2d", "upsample_bicubic2d",
        "grid_sampler", "pad", "reflection_pad2d", "replicate_pad2d",
        # selection, gathering, sorting (token pruning's top-k gather lives here)
        "topk", "sort", "argsort", "index_select", "take_along_dim", "scatter", "scatter_", "scatter_add",
        "scatter_add_", "masked_select", "masked_scatter", "index_add", "index_copy", "index_fill_",
        # shape and memory (beyond fvcore's own ignore list)
        "unflatten", "expand_as", "repeat", "repeat_interleave", "tile", "movedim", "swapaxes", "flip",
        "clone", "new_ones", "ones_like", "empty_like", "rand_like", "randn_like", "bernoulli_", "lift_fresh",
        "alias", "as_strided", "unfold", "view_as", "reshape_as", "chunk", "tensor_split", "meshgrid", "linspace",
        "scalar_tensor", "detach_", "resolve_conj", "resolve_neg", "_shape_as_tensor", "_unsafe_view", "numel",
        "floor", "ceil", "round", "trunc", "item", "__or__", "__xor__", "__not__", "bitwise_and", "bitwise_or",
    )
) + (
    # detectors' post-processing and pooling: box selection, and RoIAlign's bilinear sampling (like grid_sampler:
    # a few multiply-adds per sampled value, linear in the pooled size)
    "torchvision::nms", "torchvision::roi_align",
)  # fmt: skip
