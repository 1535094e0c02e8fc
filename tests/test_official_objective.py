"""The fine-tuning objective equals the paper's, computed from its equations in plain PyTorch (docs/design.md §3.1).

One training step of the real harness (`finetune` on a tiny DeiT-style ViT: class token, final LayerNorm) is
intercepted; the reference recomputes the total from that forward's own logits and decisions with nothing from
`tokenprune.train.losses`:

    L = CE(y, p) + 2 * (1/S) sum_s mean_b (mean_i D_s(i) - rho_s)^2 + 0.5 * KL(p_t || p_s)
        + 0.5 * mean over kept patch tokens and channels of (LN(t_s) - LN_teacher(t_t))^2

with LN the model's final LayerNorm written out, (x - mean) / sqrt(var + eps) * weight + bias, and the teacher's
tokens from its own `forward_features` (the official code's `mse_token=True`, tokens after the final norm).
"""

from __future__ import annotations

import pytest
import torch

import tokenprune
from tokenprune.train import finetune
from tokenprune.train.trainer import Trainer

TINY = [
    "model.name=vit_tiny_patch16_224",
    "model.kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 4, num_heads: 2, num_classes: 4, in_chans: 1}",
    "sparsify.locations=[1,2,3]",
    "data.source=synthetic",
    "data.num_classes=4",
    "data.synthetic_size=8",
    "data.workers=0",
    "optim.batch_size=8",
    "optim.epochs=1",
    "optim.warmup_epochs=0",
    "run.threads=1",
]


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _reference(trainer: Trainer, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    student, teacher = trainer.student, trainer.teacher
    state = tokenprune.sparsity_state(student)
    rho = tokenprune.config_of(student).keep_ratios
    with torch.no_grad():
        t_logits = teacher(x)
        t_tokens = teacher.forward_features(x)  # timm: the tokens after the final norm
    log_p = logits.float().log_softmax(-1)
    ce = -log_p.gather(1, y[:, None]).mean()
    ratio = sum(((d.float().mean((1, 2)) - r) ** 2).mean() for d, r in zip(state.decisions, rho, strict=True))
    ratio = ratio / len(rho)
    log_t = t_logits.float().log_softmax(-1)
    kl = (log_t.exp() * (log_t - log_p)).sum() / x.shape[0]
    norm = teacher.norm  # the student's final norm holds the same values before the first update
    s_tokens = _layer_norm(state.final_tokens.float(), norm.weight, norm.bias, norm.eps)
    kept = state.decisions[-1][..., 0] > 0.5  # D_S over the patch tokens (the class token is never compared)
    diff = (s_tokens[:, 1:] - t_tokens[:, 1:].float())[kept]
    token = (diff**2).mean()
    parts = {"ce": ce, "ratio": ratio, "kl": kl, "distill": token}
    parts["total"] = ce + 2.0 * ratio + 0.5 * kl + 0.5 * token
    return {k: float(v) for k, v in parts.items()}


def test_one_batch_loss_equals_the_paper_objective(tmp_path, monkeypatch):
    seen = []
    original = Trainer._forward_loss

    def capture(self, x, y):
        logits = []
        hook = self.student.register_forward_hook(lambda _m, _i, out: logits.append(out))
        try:
            out, kept = original(self, x, y)
        finally:
            hook.remove()
        if not seen:
            got = {k: float(v.detach()) for k, v in out.parts.items()} | {"total": float(out.total.detach())}
            seen.append((got, _reference(self, x, y, logits[0])))
        return out, kept

    monkeypatch.setattr(Trainer, "_forward_loss", capture)
    finetune(None, overrides=[*TINY, f"run.output_dir={tmp_path / 'run'}"])
    got, reference = seen[0]
    assert all(reference[k] > 0 for k in reference), reference  # every term is in play
    for name, value in reference.items():  # term by term: a small term cannot hide in the total
        assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-9), name
