"""Save/load for the models users actually have: made by timm.create_model, by torchvision's builders, or their own.

A table of models x the round-trip property (the loaded model gives the saved model's outputs), at small input sizes
where the architecture takes one. The slow ones (`pytest -m slow`) are the models of tests/test_sparsify.py and
tests/test_spatial.py.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from timm.models.vision_transformer import Block
from torch import nn

import tokenprune
from tokenprune.errors import CheckpointError
from tokenprune.io import SourceWarning, load_original

# name -> (constructor as a user writes it, input side, expected recorded source as (library, name, kwargs))
MODELS = {
    "test_vit": (  # timm's own 0.4M-parameter ViT for tests
        lambda: timm.create_model("test_vit", img_size=32, num_classes=7),
        32,
        ("timm", "test_vit", {"img_size": [32, 32], "num_classes": 7}),
    ),
    "test_convnext": (lambda: timm.create_model("test_convnext"), 32, ("timm", "test_convnext", {})),  # spatial
    "vit_tiny_patch16_224.augreg_in21k": (  # a tag other than the default: its pretrained_cfg (mean 0.5, 21843 classes)
        lambda: timm.create_model("vit_tiny_patch16_224.augreg_in21k", img_size=32),
        32,
        ("timm", "vit_tiny_patch16_224.augreg_in21k", {"img_size": [32, 32]}),
    ),
}
SLOW_MODELS = {  # the models of the core and spatial tables
    "deit_tiny_distilled_patch16_224": (
        lambda: timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, num_classes=7),
        32,
        ("timm", "deit_tiny_distilled_patch16_224", {"img_size": [32, 32], "num_classes": 7}),
    ),
    "timm_convnext_atto": (lambda: timm.create_model("convnext_atto"), 32, ("timm", "convnext_atto", {})),
    "tv_swin_t": (lambda: torchvision.models.swin_t(num_classes=3), 64, ("torchvision", "swin_t", {"num_classes": 3})),
    "deit_small_patch16_224": (
        lambda: timm.create_model("deit_small_patch16_224", img_size=48),
        48,
        ("timm", "deit_small_patch16_224", {"img_size": [48, 48]}),
    ),
    "vit_base_patch16_224": (
        lambda: timm.create_model("vit_base_patch16_224", img_size=32),
        32,
        ("timm", "vit_base_patch16_224", {"img_size": [32, 32]}),
    ),
    "vit_medium_patch16_gap_256": (
        lambda: timm.create_model("vit_medium_patch16_gap_256", img_size=32),
        32,
        ("timm", "vit_medium_patch16_gap_256", {"img_size": [32, 32]}),
    ),
    "tv_vit_b_16": (
        lambda: torchvision.models.vit_b_16(image_size=32, num_classes=5),
        32,
        ("torchvision", "vit_b_16", {"image_size": 32, "num_classes": 5}),
    ),
    "timm_convnext_tiny": (lambda: timm.create_model("convnext_tiny"), 64, ("timm", "convnext_tiny", {})),
    "tv_convnext_tiny": (lambda: torchvision.models.convnext_tiny(), 64, ("torchvision", "convnext_tiny", {})),
    "timm_swin_tiny": (
        lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=64),
        64,
        ("timm", "swin_tiny_patch4_window7_224", {"img_size": [64, 64]}),
    ),
}
TABLE = [*MODELS, *(pytest.param(name, marks=pytest.mark.slow) for name in SLOW_MODELS)]


def _randomize(model: nn.Module) -> nn.Module:
    # torchvision zero-initialises classifiers and timm its fast paths' scales: give every weight a value.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.mark.parametrize("name", TABLE)
def test_round_trip_of_library_models(name: str, tmp_path: Path):
    make, side, (library, arch, kwargs) = {**MODELS, **SLOW_MODELS}[name]
    torch.manual_seed(0)
    dense = make().eval()
    assert not hasattr(dense, "tokenprune_source")  # made by the library, as a user would
    x = torch.randn(2, 3, side, side)
    sparse = _randomize(tokenprune.sparsify(dense, 0.7, example_inputs=x[:1])).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SourceWarning)  # the architecture must be recognised: no warning
        tokenprune.save(sparse, tmp_path / "m.safetensors")
    loaded = tokenprune.load(tmp_path / "m.safetensors")
    assert tokenprune.config_of(loaded).source == {"library": library, "name": arch, "kwargs": kwargs}
    if hasattr(dense, "pretrained_cfg"):  # what timm's data pipeline reads: the same mean, std and crop
        assert loaded.pretrained_cfg == dense.pretrained_cfg
    backbone = {k: v for k, v in sparse.state_dict().items() if k in dense.state_dict()}
    dense.load_state_dict(backbone, strict=True)  # the randomized weights
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sparse(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(load_original(tmp_path / "m.safetensors")(x), dense(x), rtol=0, atol=1e-6)


class _OwnModel(nn.Module):
    """A user's own ViT-like module: no library knows how to build it."""

    def __init__(self, dim: int = 24, depth: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 8, 8)
        self.blocks = nn.Sequential(*(Block(dim, num_heads=2) for _ in range(depth)))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(tokens).mean(1))


def _own_pair():
    torch.manual_seed(0)
    dense = timm.create_model("deit_tiny_patch16_224", img_size=32, depth=4, embed_dim=48, num_heads=3).eval()
    return dense, tokenprune.sparsify(dense, 0.7, example_inputs=torch.randn(1, 3, 32, 32)).eval()


def test_changed_model_saves_with_one_warning_and_loads_with_model(tmp_path: Path):
    """timm.create_model with changed layers (depth, width): no source can be inferred from its name and shapes."""
    dense, sparse = _own_pair()
    path = tmp_path / "m.safetensors"
    with pytest.warns(SourceWarning, match=r"model=") as record:
        tokenprune.save(sparse, path)
    assert len([w for w in record if issubclass(w.category, SourceWarning)]) == 1
    with pytest.raises(CheckpointError, match=r"model="):
        tokenprune.load(path)
    fresh = timm.create_model("deit_tiny_patch16_224", img_size=32, depth=4, embed_dim=48, num_heads=3).eval()
    before = copy.deepcopy(fresh.state_dict())
    loaded = tokenprune.load(path, model=fresh)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())  # the caller's model is untouched
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sparse(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(load_original(path, model=fresh)(x), dense(x), rtol=0, atol=1e-6)


def test_a_users_own_module_round_trips_with_model(tmp_path: Path):
    torch.manual_seed(0)
    dense = _OwnModel().eval()
    sparse = tokenprune.sparsify(dense, 0.7, locations=[1, 2], example_inputs=torch.randn(1, 3, 32, 32)).eval()
    with pytest.warns(SourceWarning):
        tokenprune.save(sparse, tmp_path / "m.safetensors")
    loaded = tokenprune.load(tmp_path / "m.safetensors", model=_OwnModel())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sparse(x), rtol=0, atol=1e-6)


def test_model_of_another_architecture_is_refused(tmp_path: Path):
    _, sparse = _own_pair()
    with pytest.warns(SourceWarning):
        tokenprune.save(sparse, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="does not fit"):
        tokenprune.load(tmp_path / "m.safetensors", model=_OwnModel(dim=48))


def test_changed_pooling_is_not_mistaken_for_the_named_architecture(tmp_path: Path):
    """Shapes alone would match test_vit; the outputs do not, so save must not record it."""
    torch.manual_seed(0)
    # reason: without fc_norm, average pooling keeps every parameter of the token-pooled model
    dense = timm.create_model("test_vit", img_size=32, global_pool="avg", fc_norm=False).eval()
    sparse = _randomize(tokenprune.sparsify(dense, 0.7, example_inputs=torch.randn(1, 3, 32, 32))).eval()
    with pytest.warns(SourceWarning):
        tokenprune.save(sparse, tmp_path / "m.safetensors")
    loaded = tokenprune.load(tmp_path / "m.safetensors", model=dense)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sparse(x), rtol=0, atol=1e-6)
