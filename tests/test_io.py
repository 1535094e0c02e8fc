"""Save/load of sparsified models, weight files read without executing code, and models created by name."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import tokenprune
from tokenprune import models
from tokenprune.errors import CheckpointError, ConfigError, TokenPruneError
from tokenprune.io import load_original, read_metadata, read_weights

NAME = "deit_tiny_patch16_224"
KWARGS = {"img_size": [32, 32], "depth": 4, "embed_dim": 48, "num_heads": 3, "num_classes": 4}


def tiny(**extra) -> torch.nn.Module:
    return tokenprune.create_model(NAME, **{**KWARGS, **extra}).eval()


def sparse_tiny(**kwargs) -> torch.nn.Module:
    return tokenprune.sparsify(tiny(), example_inputs=torch.randn(1, 3, 32, 32), **kwargs).eval()


# ---- create_model --------------------------------------------------------------------------------------------------


def test_create_model_records_its_source():
    model = tiny()
    assert model.tokenprune_source == {"library": "timm", "name": NAME, "kwargs": KWARGS}
    assert tokenprune.sparsify(model, example_inputs=torch.randn(1, 3, 32, 32)) is not None


def test_torchvision_names_resolve():
    assert models.resolve_library("vit_b_16") == "torchvision"
    model = tokenprune.create_model("squeezenet1_1", num_classes=3).eval()  # small; timm has no such name
    assert model.tokenprune_source == {"library": "torchvision", "name": "squeezenet1_1", "kwargs": {"num_classes": 3}}
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_unknown_name_lists_close_matches():
    with pytest.raises(ConfigError, match="deit_tiny_patch16_224"):
        tokenprune.create_model("deit_tiny_patch16_2244")


def test_bad_keyword_is_a_config_error():
    with pytest.raises(ConfigError, match="no_such_kwarg"):
        tokenprune.create_model(NAME, no_such_kwarg=1)


def test_pretrained_download_failure_points_to_checkpoint(monkeypatch):
    real = models._build

    def offline(library, name, pretrained, kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(library, name, pretrained, kwargs)

    monkeypatch.setattr(models, "_build", offline)
    with pytest.raises(CheckpointError, match="--checkpoint PATH"):
        tokenprune.create_model(NAME, pretrained=True, **KWARGS)


# ---- save / load ---------------------------------------------------------------------------------------------------


def test_save_load_round_trip_keeps_learned_keep_ratios(tmp_path: Path):
    sparse = sparse_tiny(ratio=0.7)
    for sel, keep in zip(tokenprune.selectors(sparse), (0.8, 0.6, 0.4)):
        sel.keep_ratio = keep  # as fine-tuning with learned ratios leaves them
    tokenprune.config_of(sparse).learned = True
    tokenprune.save(sparse, tmp_path / "m.safetensors")
    loaded = tokenprune.load(tmp_path / "m.safetensors")
    config = tokenprune.config_of(loaded)
    assert config.keep_ratios == [0.8, 0.6, 0.4] and config.learned and config.input_size == (3, 32, 32)
    assert not loaded.training
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded(x), sparse(x))


def test_load_original_is_the_dense_backbone(tmp_path: Path):
    dense = tiny()
    sparse = tokenprune.sparsify(dense, example_inputs=torch.randn(1, 3, 32, 32))
    tokenprune.save(sparse, tmp_path / "m.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(load_original(tmp_path / "m.safetensors")(x), dense(x))


def test_save_records_a_given_source_and_refuses_one_a_loader_would_refuse(tmp_path: Path):
    plain = timm.create_model(NAME, **KWARGS).eval()  # changed layers: its source cannot be inferred
    sparse = tokenprune.sparsify(plain, example_inputs=torch.randn(1, 3, 32, 32))
    hostile = {"library": "timm", "name": NAME, "kwargs": {**KWARGS, "pretrained": True}}
    with pytest.raises(ConfigError, match="source.kwargs.pretrained"):
        tokenprune.save(sparse, tmp_path / "m.safetensors", source=hostile)
    assert not (tmp_path / "m.safetensors").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenprune.save(sparse, tmp_path / "m.safetensors", source={"library": "timm", "name": NAME, "kwargs": KWARGS})
    assert tokenprune.config_of(tokenprune.load(tmp_path / "m.safetensors")).source["name"] == NAME


def test_save_refuses_a_dense_model(tmp_path: Path):
    with pytest.raises(TokenPruneError, match="not a sparsified model"):
        tokenprune.save(tiny(), tmp_path / "m.safetensors")


def test_load_refuses_foreign_truncated_and_missing_files(tmp_path: Path):
    save_file({"w": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a tokenprune model"):
        tokenprune.load(tmp_path / "plain.safetensors")
    tokenprune.save(sparse_tiny(), tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        tokenprune.load(tmp_path / "cut.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(CheckpointError, match="cut|text"):
        tokenprune.load(tmp_path / "text.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        tokenprune.load(tmp_path / "missing.safetensors")


# ---- plain weight files --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", [lambda s: s, lambda s: {"state_dict": s}, lambda s: {"model": s, "epoch": 1},
                                  lambda s: {f"module.{k}": v for k, v in s.items()}])  # fmt: skip
def test_checkpoint_wrappers_load(tmp_path: Path, wrap):
    source = tiny()
    torch.save(wrap(source.state_dict()), tmp_path / "w.pth")
    model = tokenprune.create_model(NAME, checkpoint=tmp_path / "w.pth", **KWARGS)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))


def test_safetensors_checkpoint_loads(tmp_path: Path):
    source = tiny()
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    model = tokenprune.create_model(NAME, checkpoint=tmp_path / "w.safetensors", **KWARGS)
    assert torch.equal(model.head.weight, source.head.weight)


def test_pickle_that_would_run_code_is_refused(tmp_path: Path, code_payload):
    payload, marker = code_payload
    for suffix, dump in ((".pth", lambda obj, f: torch.save(obj, f)), (".bin", pickle.dump)):
        path = tmp_path / f"evil{suffix}"
        with open(path, "wb") as f:
            dump({"state_dict": {"w": torch.zeros(1)}, "x": payload}, f)
        with pytest.raises(CheckpointError, match="Nothing from it was executed"):
            read_weights(path)
    assert not marker.exists()


def test_truncated_and_shapeless_pickles(tmp_path: Path):
    torch.save(tiny().state_dict(), tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        read_weights(tmp_path / "cut.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_weights(tmp_path / "list.pth")


def test_weights_for_another_architecture(tmp_path: Path):
    torch.save(tiny(num_classes=9).state_dict(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="shape mismatch.*head.weight"):
        tokenprune.create_model(NAME, checkpoint=tmp_path / "w.pth", **KWARGS)


def test_a_tokenprune_file_is_not_dense_weights(tmp_path: Path):
    tokenprune.save(sparse_tiny(), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="use it directly"):
        tokenprune.create_model(NAME, checkpoint=tmp_path / "m.safetensors", **KWARGS)


def test_version_1_files_without_digest_still_load(tmp_path: Path):
    from safetensors.torch import load_file

    sparse = sparse_tiny()
    tokenprune.save(sparse, tmp_path / "m.safetensors")
    meta = dict(read_metadata(tmp_path / "m.safetensors"))
    assert meta["format_version"] == "2"
    meta.pop("digest")
    meta["format_version"] = "1"
    save_file(load_file(str(tmp_path / "m.safetensors")), str(tmp_path / "v1.safetensors"), metadata=meta)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(tokenprune.load(tmp_path / "v1.safetensors")(x), sparse(x))
