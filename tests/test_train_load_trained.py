"""`load_trained`: the model a finetune run wrote to final.pt, rebuilt from the checkpoint alone.

It must be the run's model: same outputs as `finetune`'s result, every recorded sparsify field honoured (a rebuild
that dropped `decisions` or `fast_path` loads the same weights strictly into another computation), learned keep
ratios as fixed at the end, and a clear refusal for files that cannot give the run's model.
"""

from __future__ import annotations

import pytest
import timm
import torch
from tiny_runs import ONE_EPOCH, SYNTHETIC, TINY_VIT

import tokenprune
from tokenprune.errors import CheckpointError
from tokenprune.nn.recorder import SparsityRecorder
from tokenprune.train import finetune, load_trained, load_trained_original, load_weights
from tokenprune.train.api import load_trained_pair
from tokenprune.train.checkpoint import load_checkpoint, save_checkpoint

# Layer scale at 1 so that the fast paths matter: the check below must see a wrong rebuild, not a tiny residual.
TINY_CONVNEXT = [
    "model.name=convnext_atto",
    "model.kwargs={dims: [8, 16, 32, 64], depths: [1, 1, 3, 1], num_classes: 4, in_chans: 1, ls_init_value: 1.0}",
    "loss.kind=spatial",
    "data.img_size=32",
]
COMMON = [*SYNTHETIC, *ONE_EPOCH, "run.checkpoint_every=1"]


def _run(tmp_path, name, model, *extra):
    return finetune(None, overrides=[*model, *COMMON, f"run.output_dir={tmp_path / name}", *extra])


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_a_sparse_vit_run_is_rebuilt_exactly_with_learned_ratios(tmp_path):
    result = _run(tmp_path, "vit", TINY_VIT, "learned_ratios.enabled=true", "learned_ratios.target_flops=0.6")
    loaded = load_trained(tmp_path / "vit" / "final.pt")
    assert not loaded.training
    assert _same_outputs(loaded, result.model, torch.randn(3, 1, 16, 16))
    assert [s.keep_ratio for s in tokenprune.selectors(loaded)] == result.metrics["keep_ratios"]
    assert tokenprune.config_of(loaded).learned
    # Both sides of a report from one read: the same models as the two loaders give one at a time.
    x = torch.randn(3, 1, 16, 16)
    dense, sparse = load_trained_pair(tmp_path / "vit" / "final.pt")
    assert _same_outputs(sparse, loaded, x)
    assert _same_outputs(dense, load_trained_original(tmp_path / "vit" / "final.pt"), x)
    assert not tokenprune.selectors(dense) and not _same_outputs(dense, sparse, x)
    # The learned ratios are fixed only when the run ends: its last.pt cannot give the run's model.
    with pytest.raises(CheckpointError, match="being learned.*final.pt"):
        load_trained(tmp_path / "vit" / "last.pt")


@pytest.mark.parametrize(
    "decisions, fast_path",
    [("nested", "scaled"), ("independent", "block")],  # neither sparsify's defaults nor those of files without them
)
def test_every_recorded_sparsify_field_is_honoured(tmp_path, decisions, fast_path):
    """Spatial runs with either choice of decisions and fast path: rebuilt with them, the outputs are the run's.
    Rebuilt with only ratio/locations/keep ratios (what the proofs' reports did before), the same weights load
    strictly and compute something else: the failure this function exists to prevent."""
    result = _run(tmp_path, "cnx", TINY_CONVNEXT, f"sparsify.decisions={decisions}", f"sparsify.fast_path={fast_path}")
    path = tmp_path / "cnx" / "final.pt"
    loaded = load_trained(path)
    config = tokenprune.config_of(loaded)
    assert (config.kind, config.decisions, config.fast_path) == ("spatial", decisions, fast_path)
    x = torch.randn(2, 1, 32, 32)
    assert _same_outputs(loaded, result.model, x)

    dense = timm.create_model("convnext_atto", dims=[8, 16, 32, 64], depths=[1, 1, 3, 1], num_classes=4, in_chans=1)
    partial = tokenprune.sparsify(
        dense.eval(), config.ratio, locations=config.locations, keep_ratios=config.keep_ratios,
        example_inputs=torch.zeros(1, 1, 32, 32),
    )  # fmt: skip
    if (tokenprune.config_of(partial).decisions, tokenprune.config_of(partial).fast_path) != (decisions, fast_path):
        load_weights(partial, path)  # loads strictly: nothing in the weights tells the two computations apart
        assert not _same_outputs(partial, result.model, x)


def test_a_dense_run_gives_the_dense_model_and_model_replaces_the_architecture(tmp_path):
    result = _run(tmp_path, "dense", TINY_VIT, "sparsify.enabled=false")
    x = torch.randn(3, 1, 16, 16)
    loaded = load_trained(tmp_path / "dense" / "final.pt")
    assert not any(isinstance(m, SparsityRecorder) for m in loaded.modules())  # dense, as trained
    assert _same_outputs(loaded, result.model, x)
    own = timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=4, in_chans=1
    )
    before = {k: v.clone() for k, v in own.state_dict().items()}
    assert _same_outputs(load_trained(tmp_path / "dense" / "final.pt", model=own), result.model, x)
    assert all(torch.equal(v, before[k]) for k, v in own.state_dict().items())  # the caller's model is untouched


def test_files_that_cannot_give_the_runs_model_are_refused_by_name(tmp_path):
    _run(tmp_path, "vit", TINY_VIT)
    path = tmp_path / "vit" / "final.pt"
    other = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=48, depth=4, in_chans=1)
    with pytest.raises(CheckpointError, match=str(path)):
        load_trained(path, model=other)  # another architecture: refused, not mis-loaded
    damaged = tmp_path / "damaged.pt"
    data = load_checkpoint(path)
    save_checkpoint({**{k: v for k, v in data.items() if k != "format"}, "sparsify_config": [0.7]}, damaged)
    with pytest.raises(CheckpointError, match="sparsify_config is a list"):
        load_trained(damaged)
    foreign = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a tokenprune training checkpoint"):
        load_trained(foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_trained(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"torch checkpoint, not a tokenprune model file.*load_trained"):
        tokenprune.load(path)  # the model-file reader points to this function
