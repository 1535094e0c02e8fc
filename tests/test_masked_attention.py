"""The fused masked attention (SDPA forward, recomputing backward) against the explicit reference `masked_attention`,
and `masked_sdpa` with an `attn_mask` against plain SDPA over the kept tokens only (docs/design.md §1.1, §2.3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokenprune.nn.masked import fused_masked_attention, masked_attention, masked_mha, masked_sdpa

B, H, N, D = 2, 3, 7, 8
KEEP = [[1, 0, 1, 1, 0, 1, 0], [0, 1, 1, 0, 1, 1, 0]]  # 4 kept per row; token 1 dropped in row 0, token 0 in row 1


def _inputs(mask_kind: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """q, k, v with a dropped key that out-scores every kept one in every row (an attention sink), a policy, a mask."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    k[0, :, 1] = q[0].mean(dim=-2) * 30.0  # dropped key 1 of row 0
    k[1, :, 0] = q[1].mean(dim=-2) * 30.0  # dropped key 0 of row 1
    policy = torch.tensor(KEEP, dtype=torch.float32).unsqueeze(-1)
    mask = None
    if mask_kind == "additive":  # a relative-position-like bias, shared by the batch
        mask = torch.randn(1, H, N, N, generator=g)
    elif mask_kind == "bool":  # True = attend; the diagonal open so every kept query keeps a key
        mask = (torch.rand(B, 1, N, N, generator=g) > 0.3) | torch.eye(N, dtype=torch.bool)
    out = {"q": q.to(dtype), "k": k.to(dtype), "v": v.to(dtype), "policy": policy}
    if mask is not None:
        out["attn_mask"] = mask
    return out


def _leaves(inputs: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Fresh leaves requiring grad (boolean masks excepted), optionally cast."""
    out = {}
    for name, t in inputs.items():
        t = t.detach().clone()
        if t.is_floating_point():
            t = (t if dtype is None or name == "policy" else t.to(dtype)).requires_grad_(True)
        out[name] = t
    return out


def _run(fn, inputs: dict[str, torch.Tensor], upstream: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    kwargs = {"attn_mask": inputs["attn_mask"]} if "attn_mask" in inputs else {}
    out = fn(inputs["q"], inputs["k"], inputs["v"], inputs["policy"], **kwargs)
    (out.float() * upstream).sum().backward()
    return out, {name: t.grad for name, t in inputs.items() if t.requires_grad}


@pytest.mark.parametrize("mask_kind", ["none", "additive", "bool"])
def test_fused_matches_explicit_values_and_gradients(mask_kind):
    """fp32: the same output and the same gradients for q, k, v, the policy (the gate's straight-through gradient,
    capped for the dominating dropped keys) and an additive mask."""
    base = _inputs(mask_kind)
    upstream = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(1))
    fused, fused_grads = _run(fused_masked_attention, _leaves(base), upstream)
    explicit, explicit_grads = _run(masked_attention, _leaves(base), upstream)
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == explicit_grads.keys() >= {"q", "k", "v", "policy"}
    for name, grad in explicit_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # Bounded: each (row, head) contributes at most |upstream| / Z; unbounded it would be about exp(30 * |q|^2).
    assert torch.isfinite(fused_grads["policy"]).all() and fused_grads["policy"].abs().max() < 1e3
    assert fused_grads["policy"][0, 1].abs() > 0  # the dominating dropped key still gets a (bounded) gradient


@pytest.mark.parametrize("mask_kind", ["none", "additive"])
def test_fused_bf16_matches_fp32_reference(mask_kind):
    """bf16 inputs: outputs and gradients in bf16, close to the explicit path in fp32 on the same (bf16) values."""
    base = _inputs(mask_kind, dtype=torch.bfloat16)
    upstream = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(1))
    fused, fused_grads = _run(fused_masked_attention, _leaves(base), upstream)
    reference, reference_grads = _run(masked_attention, _leaves(base, torch.float32), upstream)
    assert fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), reference, rtol=2e-2, atol=2e-2)
    for name, grad in reference_grads.items():
        got = fused_grads[name]
        assert got.dtype == (torch.float32 if name in ("policy", "attn_mask") else torch.bfloat16)
        # bf16 keeps 8 bits and SDPA's bf16 backward rounds its intermediates: compare at the gradient's scale
        scale = grad.abs().max().item()
        torch.testing.assert_close(got.float(), grad, rtol=2e-2, atol=4e-2 * scale, msg=lambda m, n=name: f"{n}: {m}")


def test_fused_gradients_are_true_gradients_for_q_k_v_and_bias():
    """In float64 the recomputing backward is the derivative of its forward for everything but the gate."""
    base = _inputs("additive", dtype=torch.float64)
    q, k, v, bias = (base[n].requires_grad_(True) for n in ("q", "k", "v", "attn_mask"))
    bias = bias.double().detach().requires_grad_(True)
    k = (k / 30.0).detach().requires_grad_(True)  # moderate scores: finite differences need smooth softmaxes
    policy = base["policy"].double()
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: fused_masked_attention(q, k, v, policy, attn_mask=b), (q, k, v, bias), atol=1e-6
    )


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_masked_sdpa_uses_fused_path_without_dropout_and_explicit_with(dropout_p):
    base = _inputs("additive")
    upstream = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(1))

    def sdpa(q, k, v, policy, attn_mask):
        torch.manual_seed(3)
        return masked_sdpa(q, k, v, policy, attn_mask=attn_mask, dropout_p=dropout_p)

    def explicit(q, k, v, policy, attn_mask):
        torch.manual_seed(3)
        return masked_attention(q, k, v, policy, attn_mask=attn_mask, dropout_p=dropout_p)

    out, grads = _run(sdpa, _leaves(base), upstream)
    assert ("_GateGradient" in type(out.grad_fn).__name__) == (dropout_p == 0.0)
    ref, ref_grads = _run(explicit, _leaves(base), upstream)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["additive", "bool"])
def test_masked_sdpa_with_attn_mask_equals_sdpa_over_kept_tokens(mask_kind):
    """Masked execution with a mask or bias == SDPA on the kept tokens with the kept rows and columns of the mask:
    what pruned execution computes once it gathers the side input with the tokens (docs/design.md §2.3)."""
    base = _inputs(mask_kind)
    q, k, v, policy, mask = (base[n] for n in ("q", "k", "v", "policy", "attn_mask"))
    masked = masked_sdpa(q, k, v, policy, attn_mask=mask)
    for b in range(B):
        kept = policy[b, :, 0].nonzero()[:, 0]
        m = mask[min(b, mask.shape[0] - 1)][:, kept][:, :, kept]
        pruned = F.scaled_dot_product_attention(q[b, :, kept], k[b, :, kept], v[b, :, kept], attn_mask=m)
        torch.testing.assert_close(masked[b, :, kept], pruned, rtol=1e-5, atol=1e-5)


def test_masked_sdpa_without_policy_is_sdpa_and_refuses_causal_or_gqa_with_one():
    base = _inputs("bool")
    q, k, v, policy, mask = (base[n] for n in ("q", "k", "v", "policy", "attn_mask"))
    torch.testing.assert_close(
        masked_sdpa(q, k, v, None, attn_mask=mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    )
    with pytest.raises(NotImplementedError, match="is_causal"):
        masked_sdpa(q, k, v, policy, is_causal=True)
    with pytest.raises(NotImplementedError, match="GQA"):
        masked_sdpa(q, k, v, policy, enable_gqa=True)


def test_masked_mha_fused_matches_explicit():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(24, 3, batch_first=True)
    x = torch.randn(B, N, 24, requires_grad=True)
    policy = torch.tensor(KEEP, dtype=torch.float32).unsqueeze(-1).requires_grad_(True)
    out, weights = masked_mha(mha, x, x, x, policy)
    assert weights is None
    out.square().sum().backward()
    grads = x.grad.clone(), policy.grad.clone()
    x.grad = policy.grad = None
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).reshape(B, N, 3, 3, 8).permute(2, 0, 3, 1, 4)
    ref = mha.out_proj(masked_attention(*qkv.unbind(0), policy).transpose(1, 2).reshape(B, N, 24))
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grads[0], x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1], policy.grad, rtol=1e-4, atol=1e-5)
