"""The selection criteria of examples/scorer_criteria.py compute what they claim (the README's criteria table).

The script's hooks recompute each stage's scores from the block's own q, k, v; the class-attention criterion must
reproduce the library's scorer exactly, and the ink oracle must keep the patches with the most ink.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import tokenprune

timm = pytest.importorskip("timm")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "scorer_criteria.py"


@pytest.fixture(scope="module")
def criteria_module():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("scorer_criteria", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(SCRIPT.parent))


@pytest.fixture(scope="module")
def sparse(criteria_module):
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=48, depth=12,
        num_heads=3,
    ).eval()  # fmt: skip
    model = tokenprune.sparsify(
        vit, 0.7, locations=criteria_module.LOCATIONS, keep_ratios=criteria_module.KEEP,
        example_inputs=torch.randn(1, 1, 28, 28), scorer="attention",
    ).eval()  # fmt: skip
    return model, criteria_module.Criteria(model)


@torch.no_grad()
def _kept(model, criteria, name: str, x: torch.Tensor) -> list[torch.Tensor]:
    """Each stage's kept patches as indices into the input's patches [B, k]."""
    kept = []
    hooks = [
        s.register_forward_hook(lambda m, args, out: kept.append(out[2][:, m.prefix_tokens :] - m.prefix_tokens))
        for s in tokenprune.selectors(model)
    ]
    try:
        criteria.name = name
        assert torch.isfinite(model(x)).all()
    finally:
        for h in hooks:
            h.remove()
    return kept


def test_class_attention_hook_equals_the_library_scorer(sparse):
    model, criteria = sparse
    x = torch.randn(6, 1, 28, 28)
    library = _kept(model, criteria, "library", x)
    hooked = _kept(model, criteria, "class attention", x)
    for a, b in zip(library, hooked, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(library[0], _kept(model, criteria, "inverse class attention", x)[0])


def test_ink_oracle_keeps_the_inked_patches(sparse):
    model, criteria = sparse
    x = torch.zeros(2, 1, 28, 28)
    x[0, :, :16, :20] = 1.0  # rows 0-3, columns 0-4 of the 7x7 patches: 20 inked patches
    x[1, :, 12:, 8:] = 1.0  # rows 3-6, columns 2-6: 20 inked patches (row 3 half inked)
    ink = torch.nn.functional.unfold(x, 4, stride=4).sum(1)  # [B, 49]
    assert (ink > 0).sum(1).tolist() == [20, 20]
    stages = _kept(model, criteria, "ink oracle", x)
    assert [s.shape[1] for s in stages] == [34, 24, 16]
    for index in stages[:2]:  # 34 and 24 kept: every inked patch among them
        assert (ink.gather(1, index) > 0).sum(1).tolist() == [20, 20]
    top16 = ink.topk(16, dim=1).values.amin(1, keepdim=True)  # 16 kept: the most inked ones
    assert bool((ink.gather(1, stages[2]) >= top16).all())
