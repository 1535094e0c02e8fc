"""The two measurements behind docs/design.md's choices where tokenprune's spatial variant differs from the official
DynamicViT code (raoyongming/DynamicViT, models/dyconvnext.py and models/dyswin.py). Random weights (no pretrained
weights needed); CPU, about a minute.

1. **Training mix** (design.md §1.2): the official AdaConvNeXt trains two full streams (slow and fast) and mixes them
   by each stage's mask before every block; tokenprune keeps one map, slow path where kept and fast path elsewhere,
   which equals its gathered inference exactly. Both mixes are re-implemented here on timm's ConvNeXt-T layout (layer
   scales at 1, 112x112 input, batch 4, float64, stages before blocks 1, 2, 3 of stage 3 keeping 0.7/0.5/0.3) with
   the same weights and the same hard masks; printed: how far the logits are apart, top-1 agreement, and the cosine
   between the gradients of (logits . probe) with respect to each stage's mask.
2. **Swin fast-path init** (design.md §3.1): a freshly sparsified Swin-T's change from the dense model with
   tokenprune's init (the official truncated normal 0.02 times 1e-6, no scale) and with the official init.

    python examples/spatial_fidelity.py
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F

import tokenprune
from tokenprune.nn.asymmetric import AsymmetricPath, FastPath

LOCATIONS, RATIOS = [1, 2, 3], [0.7, 0.5, 0.3]


class TwoMixes:
    """Stage 3 of a ConvNeXt-T run with either mix; the rest of the network as timm has it."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = timm.create_model("convnext_tiny", num_classes=100).double().eval()
        with torch.no_grad():
            for block in self.model.modules():
                if isinstance(getattr(block, "gamma", None), torch.nn.Parameter):
                    block.gamma.fill_(1.0)
        self.blocks = list(self.model.stages[2].blocks)
        self.fast = [FastPath(384, 1.0).double() for _ in self.blocks]
        for f in self.fast:
            torch.nn.init.trunc_normal_(f.proj.weight, std=0.02)

    def slow(self, block, y):
        z = block.mlp(block.norm(y.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return z * block.gamma.reshape(1, -1, 1, 1)

    def fast_path(self, i, y):
        return self.fast[i](y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def stem(self, x):
        m = self.model
        return self.blocks[0](m.stages[2].downsample(m.stages[1](m.stages[0](m.stem(x)))))

    def head(self, x):
        return self.model.forward_head(self.model.norm_pre(self.model.stages[3](x)))

    @staticmethod
    def mask_at(masks, i):
        return masks[max(j for j, loc in enumerate(LOCATIONS) if loc <= i)]

    def one_map(self, x, masks):
        """tokenprune: one map; the slow path where kept, the fast path elsewhere."""
        x = self.stem(x)
        for i in range(1, len(self.blocks)):
            m = self.mask_at(masks, i)
            y = self.blocks[i].conv_dw(x)
            x = x + self.slow(self.blocks[i], y) * m + self.fast_path(i, y) * (1 - m)
        return self.head(x)

    def two_streams(self, x, masks):
        """The official training forward: a slow and a fast stream, mixed by the mask before every block."""
        x1 = x2 = self.stem(x)
        for i in range(1, len(self.blocks)):
            m = self.mask_at(masks, i)
            y = self.blocks[i].conv_dw(x1 * m + x2 * (1 - m))
            a, b = y * m + x1 * (1 - m), y * (1 - m) + x2 * m
            x1, x2 = x1 + self.slow(self.blocks[i], a), x2 + self.fast_path(i, b)
        return self.head(x1 * masks[-1] + x2 * (1 - masks[-1]))


def _masks(batch: int, nested: bool) -> list[torch.Tensor]:
    out, previous = [], None
    for r in RATIOS:
        score = torch.rand(batch, 49)
        if nested and previous is not None:  # top-k among the locations the previous stage kept
            score = score.masked_fill(previous == 0, -1)
        previous = torch.zeros(batch, 49).scatter(1, score.topk(int(r * 49), dim=1).indices, 1.0)
        out.append(previous.reshape(batch, 1, 7, 7).requires_grad_(True))
    return out


def training_mix() -> None:
    torch.set_default_dtype(torch.float64)
    mixes = TwoMixes()
    x, probe = torch.randn(4, 3, 112, 112), torch.randn(4, 100)
    print("| masks | logits, official mix vs one map (relative) | top-1 agreement | cosine of mask gradients |")
    print("|---|---|---|---|")
    for label, nested, same in (("independent per stage", False, False), ("nested", True, False),
                                ("one mask for all stages", False, True)):  # fmt: skip
        torch.manual_seed(1)
        masks = _masks(4, nested)
        if same:
            masks = [masks[0]] * 3
        ours, theirs = mixes.one_map(x, masks), mixes.two_streams(x, masks)
        wrt = masks[: 1 if same else 3]
        g_ours = torch.autograd.grad((ours * probe).sum(), wrt)
        g_theirs = torch.autograd.grad((theirs * probe).sum(), wrt)
        rel = ((theirs - ours).norm() / ours.norm()).item()
        agree = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
        cos = ", ".join(
            f"{F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item():.3f}" for a, b in zip(g_ours, g_theirs)
        )
        print(f"| {label} | {rel:.3f} | {agree:.2f} | {cos} |")
    torch.set_default_dtype(torch.float32)


@torch.no_grad()
def swin_init() -> None:
    torch.manual_seed(0)
    dense = timm.create_model("swin_tiny_patch4_window7_224").eval()
    x = torch.randn(4, 3, 224, 224)
    sparse = tokenprune.sparsify(dense, 0.7, example_inputs=x[:2]).eval()
    reference = dense(x)
    print("| fast-path init | logits change (relative) | top-1 agreement with dense |")
    print("|---|---|---|")
    for init in ("tokenprune: official x 1e-6", "official: truncated normal 0.02"):
        if init.startswith("official"):
            for m in sparse.modules():
                if isinstance(m, AsymmetricPath):
                    torch.nn.init.trunc_normal_(m.fast.proj.weight, std=0.02)
        y = sparse(x)
        rel = ((y - reference).norm() / reference.norm()).item()
        agree = (y.argmax(-1) == reference.argmax(-1)).float().mean().item()
        print(f"| {init} | {rel:.2f} | {agree:.2f} |")


if __name__ == "__main__":
    training_mix()
    print()
    swin_init()
