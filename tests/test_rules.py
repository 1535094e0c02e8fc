"""Every rule of the op table proves itself (docs/design.md §2.3, §2.4), generated from `tokenprune.fx.rules.RULES`.

For each op of each rule: a tiny model whose blocks are `x + f(x)` at unit scale (no layer scale), with `f` a two-
or three-node function around the op, is sparsified; masked execution must equal pruned execution and keep-all must
equal the original. For each rule that reads an argument, a variant whose argument makes the op mix tokens (or
locations) must be refused, naming the op. Rules with a spatial side get a tiny ConvNeXt-like model. A table entry
without its cases fails `test_every_rule_and_op_has_cases`.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import timm.layers
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import tokenprune
from tokenprune import UnsupportedModelError
from tokenprune.fx.rules import MODULE_CALL, RULES, lookup
from tokenprune.fx.rules.table import key
from tokenprune.fx.selfcheck import max_difference
from tokenprune.fx.tracing import trace

C, GRID, PATCH = 16, 4, 8  # 16 patch tokens and a class token
N = GRID * GRID + 1


class Fn(nn.Module):
    """`f(self, x)` with a few constants and modules at hand: per-channel `c`, position-indexed `pos`, `w` [C, C],
    `wn` [N, N], `lin` (C -> C), `lin_n` (N -> N), and `mod`."""

    def __init__(self, fn: Callable, mod: nn.Module | None = None) -> None:
        super().__init__()
        self.fn, self.mod = fn, mod if mod is not None else nn.Identity()
        self.c = nn.Parameter(torch.rand(C) + 0.5)
        self.pos = nn.Parameter(torch.randn(1, N, C))
        self.w = nn.Parameter(torch.randn(C, C) / C**0.5)
        self.wn = nn.Parameter(torch.randn(N, N) / N**0.5)
        self.lin, self.lin_n = nn.Linear(C, C), nn.Linear(N, N)

    def forward(self, x):
        return self.fn(self, x)


class Block(nn.Module):
    """The op under test (`f`) on a residual branch, then a per-token MLP (C -> 4C -> C): without it a block of
    element-wise ops costs less than the predictors, and sparsify refuses a chain that pruning would not make
    cheaper."""

    def __init__(self, make: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.norm, self.f = nn.LayerNorm(C), make()
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C))

    def forward(self, x):
        x = x + self.f(self.norm(x))  # unit scale: no layer scale hides a difference
        return x + self.mlp(x)


class TinyViT(nn.Module):
    def __init__(self, make: Callable[[], nn.Module], depth: int = 3) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, C, PATCH, PATCH)
        self.cls = nn.Parameter(torch.randn(1, 1, C))
        self.blocks = nn.Sequential(*[Block(make) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(C), nn.Linear(C, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        return self.head(self.norm(self.blocks(x)).mean(1))


@dataclass(frozen=True)
class Case:
    """`fn(m, x)` (m: an `Fn`) around `op`; `mod` builds `m.mod`; `refused`: the message a mixing variant gets."""

    rule: str
    op: tuple
    fn: Callable
    mod: Callable[[], nn.Module] | None = None
    refused: str | None = None

    @property
    def id(self) -> str:
        target = self.op[1]
        name = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
        return f"{self.rule}-{name}" + ("-refused" if self.refused else "")


def _f(fn):
    return ("call_function", fn)


def _m(name):
    return ("call_method", name)


def _mod(t):
    return ("call_module", t)


def _a(name):
    return ("getattr", name)


def _sdpa(x, **kw):
    return F.scaled_dot_product_attention(x.unsqueeze(1), x.unsqueeze(1), x.unsqueeze(1), **kw).squeeze(1)


# reason: inputs that keep each unary op finite
_POSITIVE = {"sqrt", "rsqrt", "reciprocal", torch.sqrt, torch.rsqrt}
_UNARY_ARGS = {torch.clamp: dict(min=-1.0), "clamp": (-1.0, 1.0), "clamp_": (-1.0, 1.0), "type": (torch.float32,)}


def _unary_function(f):
    kwargs = _UNARY_ARGS.get(f, {})
    if f is F.dropout:
        return lambda m, x: F.dropout(x, 0.1, m.training)
    return lambda m, x: f(x.abs() + 0.5 if f in _POSITIVE else x, **kwargs)


def _unary_method(name):
    args = _UNARY_ARGS.get(name, ())
    if name in ("half", "bfloat16"):
        return lambda m, x: getattr(x, name)().float()
    return lambda m, x: getattr(x.abs() + 0.5 if name in _POSITIVE else x, name)(*args)


_BINARY = {
    operator.add: lambda m, x: x + m.pos,  # a position-indexed constant: gathered
    operator.sub: lambda m, x: x - m.c,
    operator.mul: lambda m, x: x * x.sigmoid(),
    operator.truediv: lambda m, x: x / m.c,
    operator.pow: lambda m, x: x**2,
    torch.add: lambda m, x: torch.add(x, m.pos),
    torch.sub: lambda m, x: torch.sub(x, m.c),
    torch.mul: lambda m, x: torch.mul(x, m.c),
    torch.div: lambda m, x: torch.div(x, m.c),
    torch.maximum: lambda m, x: torch.maximum(x, m.pos),
    torch.minimum: lambda m, x: torch.minimum(x, m.c),
    torch.where: lambda m, x: torch.where(x > 0, x, m.pos),
    "add": lambda m, x: x.add(m.c),
    "add_": lambda m, x: (x * 1).add_(m.pos),
    "sub": lambda m, x: x.sub(m.c),
    "sub_": lambda m, x: (x * 1).sub_(m.c),
    "mul": lambda m, x: x.mul(m.c),
    "mul_": lambda m, x: (x * 1).mul_(m.c),
    "div": lambda m, x: x.div(m.c),
    "div_": lambda m, x: (x * 1).div_(m.c),
    "pow": lambda m, x: x.pow(2),
    "masked_fill": lambda m, x: x.masked_fill(x > 1, 0.0),
    torch.addcmul: lambda m, x: torch.addcmul(m.c, m.c, x),  # ResMLP's affine
    "addcmul": lambda m, x: x.addcmul(m.pos, x, value=0.5),
    operator.gt: lambda m, x: x * (x > 0),
    operator.lt: lambda m, x: x * (x < m.pos),
    operator.ge: lambda m, x: x * (x >= m.c),
    operator.le: lambda m, x: x * (x <= 0),
    operator.eq: lambda m, x: x * (x == 0),
    operator.ne: lambda m, x: x * (x != m.pos),
}


def _token_cases() -> list[Case]:
    by_name = {r.name: r for r in RULES}
    cases = []
    for op in by_name["unary"].ops:
        kind, target = op
        if kind == "call_function":
            cases.append(Case("unary", op, _unary_function(target)))
        elif kind == "call_method":
            cases.append(Case("unary", op, _unary_method(target)))
        else:
            make = (lambda t: (lambda: t(0.1)) if t is nn.Dropout else t)(target)
            cases.append(Case("unary", op, lambda m, x: m.mod(x), mod=make))
    for op in by_name["binary"].ops:
        cases.append(Case("binary", op, _BINARY[op[1]]))
    cases.append(Case("binary", _f(operator.add), lambda m, x: x + torch.cat([x[:, 1:], x[:, :1]], 1),
                      refused="add.*different token sets"))  # fmt: skip
    return cases + [
        # a cast reads only the dtype and device of another tensor argument: a constant cast like the tokens is still
        # a constant (gathered where it meets them), and a dtype taken from another token set mixes nothing
        Case("cast", _m("to"), lambda m, x: x.to(torch.float32) + m.pos.to(x)),
        Case("cast", _m("type_as"), lambda m, x: x + m.pos.type_as(x)),
        Case("cast", _m("type_as"), lambda m, x: x.type_as(x[:, 1:]) * m.c),
        Case("metadata", _m("size"), lambda m, x: x * x.size(-1) ** -0.5),
        Case("metadata", _m("dim"), lambda m, x: x * x.dim()),
        Case("metadata", _a("shape"), lambda m, x: x.reshape(x.shape[0], x.shape[1], 2, -1).flatten(2)),
        Case("metadata", _a("ndim"), lambda m, x: x * x.ndim),
        Case("metadata", _a("dtype"), lambda m, x: x.to(x.dtype)),
        Case("metadata", _a("device"), lambda m, x: x.to(x.device)),
        # the token count sets the shape of the same tokens; used as a value it differs between the executions
        Case("metadata", _m("size"), lambda m, x: x.view(x.size(0), x.size(1) * 1, 2, -1).expand(x.shape[:2] + (2, -1))
             .flatten(2)),
        Case("metadata", _a("shape"), lambda m, x: x * torch.ones(x.shape[:1] + x.shape[2:]).unsqueeze(1)
             * x.shape[1:][1] ** -0.5),  # the batch and channel sizes used as values: not token counts
        Case("metadata", _a("shape"), lambda m, x: x - x.sum(1, keepdim=True) / x.shape[1],
             refused="getattr.*uses the token count \\(getitem.*\\) as a value"),
        Case("metadata", _m("size"), lambda m, x: x * (x.size(1) // 2), refused="size.*uses the token count"),
        Case("metadata", _a("shape"), lambda m, x: x * x.shape[-2:][0], refused="shape.*uses the token count"),
        Case("metadata", _a("shape"), lambda m, x: x + torch.arange(x.shape[1]).unsqueeze(-1),
             refused="uses the token count"),
        Case("glu", _mod(nn.GLU), lambda m, x: m.mod(torch.cat([x, x.sigmoid()], -1)), mod=lambda: nn.GLU(-1)),
        Case("glu", _f(F.glu), lambda m, x: F.glu(torch.cat([x, x.sigmoid()], -1), -1)),
        Case("glu", _f(F.glu), lambda m, x: torch.cat([x[:, :1], F.glu(x[:, 1:], 1).repeat(1, 2, 1)], 1),
             refused="glu.*token axis"),
        Case("glu", _mod(nn.GLU), lambda m, x: torch.cat([x[:, :1], m.mod(x[:, 1:]).repeat(1, 2, 1)], 1),
             mod=lambda: nn.GLU(1), refused="GLU.*token axis"),
        Case("linear", _mod(nn.Linear), lambda m, x: m.lin(x)),
        Case("linear", _f(F.linear), lambda m, x: F.linear(x, m.w)),
        Case("linear", _mod(nn.Linear), lambda m, x: m.lin_n(x.transpose(1, 2)).transpose(1, 2),
             refused="Linear.*mixes the token axis"),
        Case("linear", _f(F.linear), lambda m, x: F.linear(x.mT, m.wn).mT, refused="linear.*mixes the token axis"),
        Case("layer_norm", _mod(nn.LayerNorm), lambda m, x: m.mod(x), mod=lambda: nn.LayerNorm(C)),
        Case("layer_norm", _f(F.layer_norm), lambda m, x: F.layer_norm(x, (C,))),
        Case("layer_norm", _mod(nn.RMSNorm), lambda m, x: m.mod(x), mod=lambda: nn.RMSNorm(C)),
        Case("layer_norm", _f(F.rms_norm), lambda m, x: F.rms_norm(x, (C,))),
        Case("layer_norm", _f(F.layer_norm), lambda m, x: F.layer_norm(x, (N, C)),
             refused="layer_norm.*mixes the token axis"),
        Case("layer_norm", _mod(nn.LayerNorm), lambda m, x: m.mod(x), mod=lambda: nn.LayerNorm((N, C)),
             refused="LayerNorm.*mixes the token axis"),
        Case("layer_norm", _f(F.rms_norm), lambda m, x: F.rms_norm(x.mT, (N,)).mT,
             refused="rms_norm.*mixes the token axis"),
        Case("normalize", _f(F.normalize), lambda m, x: F.normalize(x, dim=-1)),
        Case("normalize", _f(F.normalize), lambda m, x: F.normalize(x), refused="normalize.*token axis"),
        Case("permute", _m("permute"), lambda m, x: m.lin(x.permute(0, 2, 1).permute(0, 2, 1))),
        Case("permute", _f(torch.permute), lambda m, x: torch.permute(torch.permute(x, (1, 0, 2)), (1, 0, 2))),
        Case("permute", _m("permute"), lambda m, x: m.lin_n(x.permute(0, 2, 1)).permute(0, 2, 1),
             refused="Linear.*mixes the token axis"),
        Case("transpose", _m("transpose"), lambda m, x: m.lin(x.transpose(1, 2).transpose(-1, -2))),
        Case("transpose", _f(torch.transpose), lambda m, x: torch.transpose(torch.transpose(x, 0, 1), 0, 1)),
        Case("transpose", _m("transpose"), lambda m, x: m.lin_n(x.transpose(1, 2)).transpose(1, 2),
             refused="Linear.*mixes the token axis"),
        Case("mT", _a("mT"), lambda m, x: m.lin(x.mT.mT)),
        Case("mT", _a("mH"), lambda m, x: m.lin(x.mH.mH)),
        Case("mT", _a("mT"), lambda m, x: x - (x.mT @ m.wn).mT, refused="matmul.*not the same tokens"),
        Case("mT", _a("mH"), lambda m, x: m.lin_n(x.mH).mH, refused="Linear.*mixes the token axis"),
        Case("T", _a("T"), lambda m, x: m.lin(x.T.T)),
        Case("T", _a("T"), lambda m, x: (x.T.mT @ m.wn).mT.T, refused="matmul.*not the same tokens"),
        Case("real", _a("real"), lambda m, x: m.lin(x.real)),
        Case("real", _a("data"), lambda m, x: m.lin(x.data)),
        Case("reshape", _m("reshape"), lambda m, x: x.reshape(x.shape[0], x.shape[1], 2, -1).flatten(2)),
        Case("reshape", _m("view"), lambda m, x: x.view(x.shape[0], x.shape[1], 2, -1).view(x.shape)),
        Case("reshape", _m("flatten"), lambda m, x: x.unsqueeze(2).flatten(2)),
        Case("reshape", _m("unflatten"), lambda m, x: torch.cat([x.unflatten(-1, (2, -1)).mean(2)] * 2, -1)),
        Case("reshape", _m("expand"), lambda m, x: x.unsqueeze(2).expand(-1, -1, 2, -1).mean(2)),
        Case("reshape", _m("unsqueeze"), lambda m, x: x.unsqueeze(0)[0]),
        Case("reshape", _m("squeeze"), lambda m, x: x.unsqueeze(2).squeeze(2)),
        Case("reshape", _f(torch.reshape),
             lambda m, x: torch.reshape(torch.reshape(x, (x.shape[0], x.shape[1], 2, -1)), x.shape)),
        Case("reshape", _f(torch.flatten), lambda m, x: torch.flatten(x.unsqueeze(-1), 2)),
        Case("reshape", _f(torch.unsqueeze), lambda m, x: torch.unsqueeze(x, 1).mean(1)),
        Case("reshape", _f(torch.squeeze), lambda m, x: torch.squeeze(x.unsqueeze(1), 1)),
        Case("reshape", _m("reshape"), lambda m, x: x + m.lin_n(x.reshape(x.shape[0], -1, N)).reshape(x.shape),
             refused="reshape.*reshapes the token axis"),
        Case("reshape", _m("reshape"), lambda m, x: x.reshape(x.shape[0], N, C), refused="fixed token count"),
        Case("reshape", _m("flatten"), lambda m, x: (m.wn @ x.flatten(0, 1).reshape(-1, N, C)) * 1,
             refused="flatten.*reshapes the token axis"),
        Case("getitem", _f(operator.getitem), lambda m, x: torch.cat([x[:, :1], x[:, 1:] * 2], 1)),
        Case("getitem", _f(operator.getitem), lambda m, x: x[..., :C] + x[:, :, None, :][:, :, 0]),
        Case("getitem", _f(operator.getitem), lambda m, x: x * x[:, 0, None].sigmoid()),
        Case("getitem", _f(operator.getitem), lambda m, x: torch.cat([x[:, 2:], x[:, :2]], 1),
             refused="getitem.*slices the token axis"),
        Case("getitem", _f(operator.getitem), lambda m, x: x + x[:, 3:4], refused="getitem.*slices the token axis"),
        Case("getitem", _f(operator.getitem), lambda m, x: x + x[:, 3, None], refused="getitem.*picks token 3"),
        Case("cat", _f(torch.cat), lambda m, x: torch.cat([x[:, :1], x[:, 1:]], 1)),
        Case("cat", _f(torch.concat), lambda m, x: torch.concat([x, x.sigmoid()], -1)[..., ::2]),
        Case("cat", _f(torch.concatenate), lambda m, x: torch.concatenate([x[:, :1] * 2, x[:, 1:]], 1)),
        Case("cat", _f(torch.cat), lambda m, x: torch.cat([x[:, :0], x[:, 0:] * 2], 1) + x),  # an empty part
        Case("cat", _f(torch.cat), lambda m, x: torch.cat([x[:, 1:], x[:, :1]], 1),
             refused="add.*different token sets"),
        Case("stack", _f(torch.stack), lambda m, x: torch.stack([x, x.sigmoid()], -1).mean(-1)),
        Case("stack", _f(torch.stack), lambda m, x: torch.stack(x.chunk(2, -1), -1).flatten(-2)),
        Case("stack", _f(torch.stack), lambda m, x: torch.stack([x, torch.cat([x[:, 1:], x[:, :1]], 1)]).mean(0),
             refused="stack.*different token sets"),
        Case("split", _m("chunk"), lambda m, x: torch.cat([x.chunk(2, -1)[1], x.chunk(2, -1)[0]], -1)),
        Case("split", _m("split"), lambda m, x: torch.cat([x.split(4, dim=-1)[1]] * 4, -1)),
        Case("split", _m("chunk"), lambda m, x: torch.cat(x.chunk(2, -1), -1) * torch.stack(x.unbind(0)).sigmoid()),
        Case("split", _m("tensor_split"), lambda m, x: torch.cat([x.tensor_split(2, -1)[0]] * 2, -1)),
        Case("split", _m("unbind"), lambda m, x: x * x.unbind(-1)[3].unsqueeze(-1)),
        Case("split", _f(torch.split), lambda m, x: torch.cat([torch.split(x, [4, C - 4], dim=-1)[1], x[..., :4]], -1)),
        Case("split", _f(torch.chunk), lambda m, x: torch.cat([torch.chunk(x, 2, -1)[1], x[..., : C // 2]], -1)),
        Case("split", _f(torch.tensor_split), lambda m, x: torch.cat([torch.tensor_split(x, 2, dim=-1)[0]] * 2, -1)),
        Case("split", _f(torch.unbind), lambda m, x: x * torch.unbind(x, -1)[3].unsqueeze(-1)),
        Case("split", _m("chunk"), lambda m, x: torch.cat([x[:, :1], x[:, 1:].chunk(2, 1)[1].repeat(1, 2, 1)], 1),
             refused="chunk.*splits the token axis"),
        Case("split", _f(torch.split), lambda m, x: torch.cat([x[:, :1], torch.split(x[:, 1:], 8, 1)[0]] * 2, 1)[:, :N],
             refused="split.*splits the token axis"),
        Case("reduction", _m("mean"), lambda m, x: x - x.mean(1, keepdim=True)),
        Case("reduction", _m("sum"), lambda m, x: x * x.sum(1, keepdim=True).sigmoid() + x.sum(-1, keepdim=True)),
        Case("reduction", _f(torch.mean), lambda m, x: x - torch.mean(x, 1, keepdim=True)),
        Case("reduction", _f(torch.sum), lambda m, x: x * torch.sum(x, dim=1, keepdim=True).sigmoid()),
        Case("reduction", _m("mean"), lambda m, x: x - x.mean((1, 2), keepdim=True), refused="mean.*other dims"),
        Case("softmax", _m("softmax"), lambda m, x: (x @ x.mT * C**-0.5).softmax(-1) @ x),
        Case("softmax", _f(F.softmax), lambda m, x: F.softmax(x, -1) + F.softmax(x @ x.mT, dim=-1) @ x),
        Case("softmax", _f(torch.softmax), lambda m, x: torch.softmax(m.pos[:, :1] @ x.mT, -1) @ x + x),
        Case("softmax", _mod(nn.Softmax), lambda m, x: m.mod(x @ x.mT) @ x, mod=lambda: nn.Softmax(-1)),
        Case("softmax", _m("softmax"), lambda m, x: x.softmax(1), refused="softmax.*not the last dim"),
        Case("softmax", _mod(nn.Softmax), lambda m, x: m.mod(x @ x.mT) @ x, mod=lambda: nn.Softmax(1),
             refused="Softmax.*not the last dim"),
        Case("matmul", _f(operator.matmul), lambda m, x: x @ m.w + x @ (x.mT @ x) / N),
        Case("matmul", _f(torch.matmul), lambda m, x: torch.matmul(x, m.w)),
        Case("matmul", _f(torch.bmm), lambda m, x: torch.bmm(x, m.w.expand(x.shape[0], -1, -1))),
        Case("matmul", _m("matmul"), lambda m, x: x.matmul(m.w)),
        Case("matmul", _m("bmm"), lambda m, x: x.bmm(m.w.expand(x.shape[0], -1, -1))),
        Case("matmul", _f(operator.matmul), lambda m, x: m.wn @ x, refused="matmul.*not the same tokens"),
        Case("sdpa", _f(F.scaled_dot_product_attention), lambda m, x: _sdpa(x)),
        Case("sdpa", _f(F.scaled_dot_product_attention), lambda m, x: _sdpa(x, is_causal=True),
             refused="scaled_dot_product_attention.*causal"),
        Case("mha", _mod(nn.MultiheadAttention), lambda m, x: m.mod(x, x, x, need_weights=False)[0],
             mod=lambda: nn.MultiheadAttention(C, 2, batch_first=True)),
        Case("mha", _mod(nn.MultiheadAttention), lambda m, x: m.mod(x, x.sigmoid(), x, need_weights=False)[0],
             mod=lambda: nn.MultiheadAttention(C, 2, batch_first=True), refused="MultiheadAttention.*self-attention"),
        Case("module_call", _mod(timm.layers.DropPath), lambda m, x: m.mod(m.lin(x)),
             mod=lambda: timm.layers.DropPath(0.2)),
        Case("module_call", _mod(torchvision.ops.StochasticDepth), lambda m, x: m.mod(m.lin(x)),
             mod=lambda: torchvision.ops.StochasticDepth(0.2, "row")),
        Case("module_call", _mod(_FlipInTraining), lambda m, x: m.mod(x), mod=lambda: _FlipInTraining(),
             refused="_FlipInTraining.*kept as one call.*not its input times a per-sample scale"),
        Case("module_call", _mod(_Untraceable), lambda m, x: m.mod(x), mod=lambda: _Untraceable(),
             refused="_Untraceable.*cannot be traced on its own"),
        Case("module_call", _mod(_ScaleFromValues), lambda m, x: m.mod(x), mod=lambda: _ScaleFromValues(),
             refused="_ScaleFromValues.*computed from the input's values"),
        Case("module_call", _mod(_PerTokenDrop), lambda m, x: m.mod(x), mod=lambda: _PerTokenDrop(),
             refused="_PerTokenDrop.*not one value per sample"),
    ]  # fmt: skip


class _FlipInTraining(nn.Module):
    """Reverses the token order in training only: a leaf (its code changes with the mode) that mixes tokens."""

    def forward(self, x):
        return x.flip(1) if self.training else x


class _Untraceable(nn.Module):
    """Control flow on values: torch.fx cannot trace it, so the trace keeps it a call that proves nothing."""

    def forward(self, x):
        return x - x.mean(1, keepdim=True) if x.sum() > 0 else x


class _ScaleFromValues(nn.Module):
    """x times a scale computed from x's token mean, in training only."""

    def forward(self, x):
        return x * x.mean(1, keepdim=True) if self.training else x


class _PerTokenDrop(nn.Module):
    """Drops whole tokens at random in training: a scale per token, not per sample."""

    def forward(self, x):
        return x * x.new_empty(x.shape[:2] + (1,)).bernoulli_(0.8) if self.training else x


TOKEN_CASES = _token_cases()
IMAGES = torch.randn(2, 3, GRID * PATCH, GRID * PATCH, generator=torch.Generator().manual_seed(0))


def _tiny_vit(case: Case) -> TinyViT:
    torch.manual_seed(0)
    return TinyViT(lambda: Fn(case.fn, case.mod() if case.mod else None)).eval()


def _keys(module: nn.Module, example: torch.Tensor) -> set:
    """The table keys of the ops in `module`'s traced graph (modules kept as calls included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # x.T on a 3-D tensor is deprecated
        gm = trace(module, name="case")
        ShapeProp(gm).propagate(example)
    return {key(n, gm) for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")}


def _tokens_after_norm(model: TinyViT) -> torch.Tensor:
    with torch.no_grad():
        x = model.patch(IMAGES).flatten(2).transpose(1, 2)
        return model.blocks[0].norm(torch.cat([model.cls.expand(2, -1, -1), x], 1))


def _exact(sparse: nn.Module, dense: nn.Module, x: torch.Tensor) -> None:
    """Masked == pruned (eval, same decisions) and keep-all == original, in units of the self-check's tolerance."""
    with torch.no_grad():
        pruned = tokenprune.set_execution(sparse, "pruned")(x)
        masked = tokenprune.set_execution(sparse, "masked")(x)
        tokenprune.set_execution(sparse, "auto")
        for s in tokenprune.selectors(sparse):
            s.keep_ratio = 1.0
        kept = sparse(x)
        original = dense(x)
    assert torch.isfinite(pruned).all() and torch.isfinite(masked).all()
    assert max_difference(masked, pruned) <= 1
    assert max_difference(kept, original) <= 1


@pytest.mark.parametrize("case", [c for c in TOKEN_CASES if not c.refused], ids=lambda c: c.id)
def test_token_rule_keeps_pruning_exact(case):
    model = _tiny_vit(case)
    assert case.op in _keys(model.blocks[1].f, _tokens_after_norm(model)), "the case does not exercise its op"
    assert lookup_name(model.blocks[1].f, case.op) == case.rule
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = tokenprune.sparsify(model, 0.5, example_inputs=IMAGES).eval()
        assert tokenprune.selectors(sparse)[0].last_initial_patches == GRID * GRID
        _exact(sparse, model, IMAGES)


@pytest.mark.parametrize("case", [c for c in TOKEN_CASES if c.refused], ids=lambda c: c.id)
def test_token_rule_refuses_a_mixing_variant(case):
    model = _tiny_vit(case)
    assert case.op in _keys(model.blocks[1].f, _tokens_after_norm(model)), "the case does not exercise its op"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnsupportedModelError, match=case.refused):
            tokenprune.sparsify(model, 0.5, example_inputs=IMAGES)


def lookup_name(module: nn.Module, op: tuple) -> str:
    """The name of the rule the table gives the first node of `module`'s graph with key `op`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = trace(module, name="case")
    node = next(n for n in gm.graph.nodes if n.op != "placeholder" and n.op != "output" and key(n, gm) == op)
    rule = lookup(gm, node)
    return rule.name if rule is not None else "none"


# -- spatial rules: a tiny ConvNeXt-like model, the op inside the per-location run after a depthwise conv --------------
HW = 8


class SpatialFn(Fn):
    """`fn(self, y)` on the depthwise conv's output [B, C, H, W], with a ConvNeXt MLP at hand: `mlp(t)` on a
    channels-last map, `convs(y)` (1x1 convs) on a channels-first one; `bn` (C), `bn_h` (H), `lin_w` (W -> W)."""

    def __init__(self, fn: Callable, mod: nn.Module | None = None) -> None:
        super().__init__(fn, mod)
        self.norm, self.up, self.down = nn.LayerNorm(C), nn.Linear(C, 4 * C), nn.Linear(4 * C, C)
        self.conv_up, self.conv_down = nn.Conv2d(C, 4 * C, 1), nn.Conv2d(4 * C, C, 1)
        self.bn, self.bn_h, self.lin_w = nn.BatchNorm2d(C), nn.BatchNorm2d(HW), nn.Linear(HW, HW)
        self.conv3 = nn.Conv2d(C, C, 3, padding=1)

    def mlp(self, t):
        return self.down(F.gelu(self.up(self.norm(t))))

    def grn(self, t, total):
        """ConvNeXt V2's global response norm of channels-last `t` given its per-sample `total` over the locations."""
        return t + self.c * (t * (total / (total.mean(-1, keepdim=True) + 1e-6)))


class SpatialBlock(nn.Module):
    def __init__(self, make: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.dw, self.f = nn.Conv2d(C, C, 3, padding=1, groups=C), make()

    def forward(self, x):
        return x + self.f(self.dw(x))  # unit scale


class TinyConvNeXt(nn.Module):
    def __init__(self, make: Callable[[], nn.Module], depth: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, C, 4, stride=4)
        self.blocks = nn.Sequential(*[SpatialBlock(make) for _ in range(depth)])
        self.head = nn.Linear(C, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _last(y):
    return y.permute(0, 2, 3, 1)


def _first(t):
    return t.permute(0, 3, 1, 2)


SPATIAL_CASES = [
    Case("unary", _mod(nn.GELU), lambda m, y: _first(m.down(m.mod(m.up(m.norm(_last(y)))))), mod=nn.GELU),
    Case("unary", _f(F.relu), lambda m, y: _first(m.down(F.relu(m.up(m.norm(_last(y))))))),
    Case("unary", _m("contiguous"), lambda m, y: _first(m.mlp(_last(y))).contiguous()),
    Case("binary", _f(operator.mul), lambda m, y: _first(m.mlp(_last(y)) * m.c)),  # a layer scale, per channel
    Case("binary", _f(operator.truediv), lambda m, y: _first(m.mlp(_last(y)) / 2.0)),  # a number operand
    Case("binary", _f(operator.mul), lambda m, y: _first(m.mlp(_last(y))) * m.pos[0, :HW, :HW],
         refused="no slow path"),  # fmt: skip
    Case("cast", _m("to"), lambda m, y: _first(m.mlp(_last(y).to(torch.float32)))),
    Case("cast", _m("type_as"), lambda m, y: _first(m.mlp(_last(y))).type_as(m.c)),
    Case("linear", _mod(nn.Linear), lambda m, y: _first(m.mlp(_last(y)))),
    Case("linear", _f(F.linear), lambda m, y: _first(F.linear(m.mlp(_last(y)), m.w))),
    Case("linear", _mod(nn.Linear), lambda m, y: m.lin_w(_first(m.mlp(_last(y)))), refused="no slow path"),
    Case("layer_norm", _mod(nn.LayerNorm), lambda m, y: _first(m.mlp(_last(y)))),
    Case("layer_norm", _f(F.layer_norm), lambda m, y: _first(m.down(F.gelu(m.up(F.layer_norm(_last(y), (C,))))))),
    Case("layer_norm", _f(F.layer_norm), lambda m, y: _first(F.layer_norm(m.mlp(_last(y)), (HW, HW, C))),
         refused="no slow path"),  # fmt: skip
    Case("normalize", _f(F.normalize), lambda m, y: _first(m.mlp(F.normalize(_last(y), dim=-1)))),
    Case("normalize", _f(F.normalize), lambda m, y: _first(F.normalize(m.mlp(_last(y)), dim=1)),
         refused="no slow path"),  # fmt: skip
    Case("batch_norm", _mod(nn.BatchNorm2d), lambda m, y: m.conv_down(F.relu(m.conv_up(m.bn(y))))),
    Case("batch_norm", _mod(nn.BatchNorm2d), lambda m, y: m.bn_h(_first(m.mlp(_last(y))).transpose(1, 2)).mT.mT
         .transpose(1, 2), refused="no slow path"),  # fmt: skip
    Case("batch_norm", _f(F.batch_norm), lambda m, y: m.conv_down(F.relu(m.conv_up(
        F.batch_norm(y, m.bn.running_mean, m.bn.running_var, m.bn.weight, m.bn.bias, False))))),
    Case("conv", _mod(nn.Conv2d), lambda m, y: m.conv_down(F.gelu(m.conv_up(y)))),
    Case("conv", _mod(nn.Conv2d), lambda m, y: m.conv3(m.conv_down(F.gelu(m.conv_up(y)))), refused="no slow path"),
    Case("permute", _m("permute"), lambda m, y: _first(m.mlp(_last(y)))),
    Case("permute", _f(torch.permute), lambda m, y: torch.permute(m.mlp(torch.permute(y, (0, 2, 3, 1))), (0, 3, 1, 2))),
    Case("permute", _m("permute"), lambda m, y: m.mlp(_last(y)).permute(0, 3, 2, 1), refused="mixes locations"),
    # sums over the locations (GRN): per sample, over the kept locations in both executions
    Case("reduction", _m("sum"), lambda m, y: _first(m.grn(m.mlp(_last(y)), (m.mlp(_last(y)) ** 2).sum((1, 2), True)))),
    Case("reduction", _f(torch.sum), lambda m, y: _first(m.mlp(m.grn(t := _last(y), torch.sum(t.abs(), (1, 2), True)))
         )),  # fmt: skip
    Case("reduction", _m("mean"), lambda m, y: _first(m.mlp((t := _last(y)) - t.mean(-1, keepdim=True)))),  # channels
    Case("reduction", _m("mean"), lambda m, y: _first(m.grn(t := m.mlp(_last(y)), t.abs().mean((1, 2), True))),
         refused="no slow path"),  # fmt: skip
    # statistics over the channels: a hand-written norm, per location (ConvNeXt RMS); over the locations they mix them
    Case("variance", _f(torch.var), lambda m, y: _first(m.mlp((t := _last(y)) * torch.rsqrt(torch.var(t, dim=-1,
         keepdim=True) + 1e-6)))),  # fmt: skip
    Case("variance", _m("var"), lambda m, y: _first(m.mlp((t := _last(y)) * (t.var(-1, keepdim=True) + 1e-6).rsqrt()))),
    Case("variance", _f(torch.std), lambda m, y: _first(m.mlp((t := _last(y)) / (torch.std(t, -1, keepdim=True) + 1)))),
    Case("variance", _m("std"), lambda m, y: _first(m.mlp((t := _last(y)) / (t.std(-1, keepdim=True) + 1.0)))),
    Case("variance", _m("var"), lambda m, y: _first(m.grn(t := m.mlp(_last(y)), t.var((1, 2), keepdim=True))),
         refused="no slow path"),  # fmt: skip
    Case("norm", _m("norm"), lambda m, y: _first(m.grn(t := m.mlp(_last(y)), t.norm(p=2, dim=(1, 2), keepdim=True)))),
    Case("norm", _f(torch.norm), lambda m, y: _first(m.grn(t := m.mlp(_last(y)), torch.norm(t, 1, (1, 2), True)))),
    Case("norm", _f(torch.linalg.vector_norm), lambda m, y: _first(m.grn(t := m.mlp(_last(y)),
         torch.linalg.vector_norm(t, float("inf"), (1, 2), True)))),  # fmt: skip
    Case("norm", _m("norm"), lambda m, y: _first(m.grn(t := m.mlp(_last(y)), t.norm(p=2, dim=(1,), keepdim=True))),
         refused="no slow path"),  # fmt: skip
    Case("module_call", _mod(timm.layers.DropPath), lambda m, y: m.mod(_first(m.mlp(_last(y)))),
         mod=lambda: timm.layers.DropPath(0.2)),
    Case("module_call", _mod(torchvision.ops.StochasticDepth), lambda m, y: m.mod(_first(m.mlp(_last(y)))),
         mod=lambda: torchvision.ops.StochasticDepth(0.2, "row")),
    Case("module_call", _mod(timm.layers.BatchNormAct2d), lambda m, y: m.conv_down(F.relu(m.conv_up(m.mod(y)))),
         mod=lambda: timm.layers.BatchNormAct2d(C)),  # a leaf whose own code acts per location
    Case("module_call", _mod(_FlipInTraining), lambda m, y: m.mod(_first(m.mlp(_last(y)))), mod=_FlipInTraining,
         refused="no slow path"),
]  # fmt: skip
MAPS = torch.randn(2, 3, 4 * HW, 4 * HW, generator=torch.Generator().manual_seed(1))


def _tiny_convnext(case: Case) -> TinyConvNeXt:
    torch.manual_seed(0)
    return TinyConvNeXt(lambda: SpatialFn(case.fn, case.mod() if case.mod else None)).eval()


@pytest.mark.parametrize("case", [c for c in SPATIAL_CASES if not c.refused], ids=lambda c: c.id)
def test_spatial_rule_keeps_gathering_exact(case):
    from tokenprune.nn.asymmetric import AsymmetricPath

    model = _tiny_convnext(case)
    with torch.no_grad():
        y = model.blocks[1].dw(model.stem(MAPS))
    assert case.op in _keys(model.blocks[1].f, y), "the case does not exercise its op"
    sparse = tokenprune.sparsify(model, 0.5, example_inputs=MAPS).eval()
    paths = [m for m in sparse.modules() if isinstance(m, AsymmetricPath)]
    assert paths, "no block was given a slow path"
    for p in paths:
        if p.fast.gamma is None:  # no layer scale (Swin): give its Linear weight
            nn.init.normal_(p.fast.proj.weight, std=0.1)
        else:
            nn.init.constant_(p.fast.gamma, 0.5)  # a fast path of weight, so a misplaced one would show
    path_nodes = {n.name for n in sparse.blocks[1].graph.nodes}
    assert "fast_path" in path_nodes
    _exact(sparse, model, MAPS)


@pytest.mark.parametrize("case", [c for c in SPATIAL_CASES if c.refused], ids=lambda c: c.id)
def test_spatial_rule_refuses_a_mixing_variant(case):
    model = _tiny_convnext(case)
    with torch.no_grad():
        y = model.blocks[1].dw(model.stem(MAPS))
    assert case.op in _keys(model.blocks[1].f, y), "the case does not exercise its op"
    with pytest.raises(UnsupportedModelError, match=case.refused):
        tokenprune.sparsify(model, 0.5, example_inputs=MAPS)


def test_every_rule_and_op_has_cases():
    """A table entry without cases fails here: every op of a token rule has an exact case, every spatial rule an
    exact spatial case, every op of a spatial-only rule a spatial case, and every rule that reads an argument a
    refused variant on each side it has."""
    token_ops = {(c.rule, c.op) for c in TOKEN_CASES if not c.refused}
    spatial_ops = {(c.rule, c.op) for c in SPATIAL_CASES if not c.refused}
    token_refused = {c.rule for c in TOKEN_CASES if c.refused}
    spatial_refused = {c.rule for c in SPATIAL_CASES if c.refused}
    for rule in (*RULES, MODULE_CALL):
        if rule.token is not None:
            missing = [op for op in rule.ops if (rule.name, op) not in token_ops]
            assert not missing, f"rule {rule.name}: no exact token case for {missing}"
            assert any(r == rule.name for r, _ in token_ops), f"rule {rule.name}: no token case"
        if rule.spatial is not None:
            assert any(r == rule.name for r, _ in spatial_ops), f"rule {rule.name}: no spatial case"
            if rule.token is None:
                missing = [op for op in rule.ops if (rule.name, op) not in spatial_ops]
                assert not missing, f"rule {rule.name}: no exact spatial case for {missing}"
        if rule.reads and rule.token is not None:
            assert rule.name in token_refused, f"rule {rule.name} reads {rule.reads}: no token variant is refused"
        if rule.reads and rule.spatial is not None:
            assert rule.name in spatial_refused, f"rule {rule.name} reads {rule.reads}: no spatial variant is refused"


class _GridHead(TinyViT):
    """Its head folds the patch tokens back into their 4 x 4 grid for a convolution: it needs every token."""

    def __init__(self) -> None:
        super().__init__(lambda: Fn(lambda m, x: m.lin(x)))
        self.conv = nn.Conv2d(C, 10, GRID)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = self.blocks(torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1))
        return self.conv(x[:, 1:].transpose(1, 2).reshape(x.shape[0], C, GRID, GRID)).flatten(1)


def test_head_refill_is_chosen_by_the_refusal_and_described():
    """The head's refill route follows from its walk's structured refusal (the node that needs every token), and
    the plan says so; a head the rules keep exact is not refilled."""
    torch.manual_seed(0)
    model = _GridHead().eval()
    described = tokenprune.plan(model, 0.5, example_inputs=IMAGES).describe()
    assert "head: needs every token (an op that needs every token at reshape: call_method 'reshape'" in described
    _exact(tokenprune.sparsify(model, 0.5, example_inputs=IMAGES).eval(), model, IMAGES)
    pooled = tokenprune.plan(_tiny_vit(TOKEN_CASES[0]), 0.5, example_inputs=IMAGES).describe()
    assert "needs every token" not in pooled and "head: mean: mean over tokens counts kept tokens only" in pooled
