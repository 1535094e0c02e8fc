"""Nothing from a file reaches code that could execute or fetch: header allowlist refusals and a mutation fuzz.

Hostile-but-consistent files are written with a recomputed digest (the digest detects damage, not tampering), so
the checks of each header field are what refuses them.
"""

from __future__ import annotations

import json
import pickle
import random
import struct
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import tokenprune
from tokenprune.config import SparsifyConfig
from tokenprune.errors import CheckpointError
from tokenprune.io import read_metadata
from tokenprune.io.model_file import _digest

KWARGS = {"img_size": 32, "num_classes": 3}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A valid tokenprune file of timm's 0.4M-parameter test ViT at 32 x 32."""
    torch.manual_seed(0)
    dense = tokenprune.create_model("test_vit", **KWARGS).eval()
    sparse = tokenprune.sparsify(dense, 0.7, example_inputs=torch.randn(1, 3, 32, 32))
    return tokenprune.save(sparse, tmp_path_factory.mktemp("hostile") / "m.safetensors")


def _write(saved: Path, path: Path, *, meta: dict | None = None, source=..., config: dict | None = None) -> Path:
    """`saved` with changed metadata (None removes a field), source and config, re-digested."""
    tensors = load_file(str(saved))
    metadata = dict(read_metadata(saved))
    if source is not ...:
        metadata["source"] = json.dumps(source)
        data = json.loads(metadata["config"])
        data["source"] = source
        metadata["config"] = json.dumps(data)
    if config is not None:
        data = json.loads(metadata["config"])
        for key, value in config.items():
            if value is None and key != "source":
                data.pop(key, None)
            else:
                data[key] = value
        metadata["config"] = json.dumps(data)
    metadata["digest"] = _digest(metadata, tensors)
    for key, value in (meta or {}).items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    save_file(tensors, str(path), metadata=metadata)
    return path


def _source(**changes):
    source = {"library": "timm", "name": "test_vit", "kwargs": dict(KWARGS)}
    kwargs = changes.pop("kwargs", {})
    source.update(changes)
    source["kwargs"].update(kwargs)
    return source


def test_the_valid_file_loads(saved: Path):
    loaded = tokenprune.load(saved)
    assert tokenprune.config_of(loaded).source == _source()


HOSTILE_SOURCES = {
    "source.library": [_source(library="os"), _source(library="importlib"), _source(library=["timm"])],
    "source.name": [_source(name="hf-hub:timm/test_vit"), _source(name="timm/test_vit"), _source(name="../../x"),
                    _source(name="local-dir:/tmp/x"), _source(name="no_such_model_anywhere"), _source(name=7)],
    "source.kwargs.pretrained": [_source(kwargs={"pretrained": True})],
    "source.kwargs.checkpoint_path": [_source(kwargs={"checkpoint_path": "x"})],
    "source.kwargs.pretrained_cfg": [_source(kwargs={"pretrained_cfg": {"file": "x"}})],
    "source.kwargs.pretrained_cfg_overlay": [_source(kwargs={"pretrained_cfg_overlay": {"url": "x"}})],
    "source.kwargs.cache_dir": [_source(kwargs={"cache_dir": "x"})],
    "source.kwargs.weights": [_source(kwargs={"weights": "DEFAULT"})],
    "source.kwargs.act_layer": [_source(kwargs={"act_layer": "https://example.com/x"}),
                                _source(kwargs={"act_layer": "os.system"}), _source(kwargs={"act_layer": {"a": 1}}),
                                _source(kwargs={"act_layer": "/etc/passwd"})],
    "source.kwargs.__class__": [_source(kwargs={"__class__": 1})],
    "source.kwargs.embed_dim": [_source(kwargs={"embed_dim": 10**12}), _source(kwargs={"embed_dim": 1e300})],
    "source.kwargs.depth": [_source(kwargs={"depth": 10**5})],
    "source.kwargs.mlp_ratio": [_source(kwargs={"mlp_ratio": [1] * 10**4})],
    "source.module": [{**_source(), "module": "os"}],
    "source": [["timm", "test_vit"], "test_vit"],
}  # fmt: skip


@pytest.mark.parametrize("key", HOSTILE_SOURCES)
def test_hostile_sources_are_refused_naming_the_key(saved: Path, tmp_path: Path, key: str):
    for i, source in enumerate(HOSTILE_SOURCES[key]):
        path = _write(saved, tmp_path / f"{i}.safetensors", source=source)
        with pytest.raises(CheckpointError, match=f"'{key}"):
            tokenprune.load(path)


def test_absurd_input_sizes_are_refused_before_allocating(saved: Path, tmp_path: Path):
    for size in ([3, 10**6, 10**6], [3, 4096, 4096], [10**4, 32, 32], [3, 32], [3, 0, 32], [3, 32.5, 32]):
        path = _write(saved, tmp_path / "m.safetensors", config={"input_size": size})
        start = time.perf_counter()
        with pytest.raises(CheckpointError, match="'config.input_size'"):
            tokenprune.load(path)
        assert time.perf_counter() - start < 5
    # within bounds, but not the size the recorded architecture takes: refused before the example input is made
    path = _write(saved, tmp_path / "m.safetensors", config={"input_size": [3, 2048, 2048]})
    with pytest.raises(CheckpointError, match="'config.input_size'.*built for \\[32, 32\\]"):
        tokenprune.load(path)


def test_a_huge_architecture_is_refused_before_allocating(saved: Path, tmp_path: Path):
    # 60000-wide layers would need tens of GB; on the meta device they need nothing and their shapes do not fit.
    path = _write(saved, tmp_path / "m.safetensors", source=_source(kwargs={"embed_dim": 60000}))
    with pytest.raises(CheckpointError, match="does not fit its recorded architecture"):
        tokenprune.load(path)


OPTIONAL = ("scorer", "decisions", "fast_path")  # config fields newer than format 2; files without them load


def _mutations(saved: Path, tmp_path: Path, payload) -> list[tuple[str, Path]]:
    """(label, file) for every mutation of the fuzz test."""
    data = saved.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header_end = 8 + header_len
    rng = random.Random(0)
    out: list[tuple[str, Path]] = []

    def emit(label: str, content: bytes) -> None:
        path = tmp_path / f"{len(out)}.safetensors"
        path.write_bytes(content)
        out.append((label, path))

    for _ in range(60):
        emit("truncated", data[: rng.randrange(0, len(data))])
    # reason: JSON whitespace is insignificant, so bytes are replaced by non-whitespace bytes only.
    others = [b for b in range(256) if bytes([b]) not in b" \t\r\n"]
    for region, (low, high) in (("header byte", (0, header_end)), ("body byte", (header_end, len(data)))):
        for _ in range(80):
            content = bytearray(data)
            for _ in range(rng.choice((1, 1, 2, 8))):
                i = rng.randrange(low, high)
                content[i] = rng.choice([b for b in others if b != content[i]])
            emit(region, bytes(content))

    def write(label: str, **changes) -> None:
        path = _write(saved, tmp_path / f"{len(out)}.safetensors", **changes)
        out.append((label, path))

    metadata = read_metadata(saved)
    config = json.loads(metadata["config"])
    for key in metadata:
        write(f"header field {key} removed", meta={key: None})
    for key in config:
        if key not in OPTIONAL:  # older files had learned, nested predictors and scaled fast paths (tested)
            write(f"config.{key} removed", config={key: None})
    for key in ("library", "name", "kwargs"):
        write(f"source.{key} removed", source={k: v for k, v in _source().items() if k != key})
    wrong = ["x", None, {}, [], [[1]], -1, 1e308, True, "1" * 10000]
    for key, value in config.items():
        for bad in wrong:
            if type(bad) is not type(value) and not (key in ("source", *OPTIONAL) and bad is None):
                write(f"config.{key} = {str(bad)[:20]}", config={key: bad})
    for key in ("format", "format_version", "tokenprune", "source", "config", "digest"):
        for bad in ("", "x", "[1, 2]", "{", "9" * 100, "null", '"a"'):
            write(f"header field {key} = {bad[:10]}", meta={key: bad})
    for key, bad in (("locations", [1, 10**9]), ("locations", [3, 2, 1]), ("keep_ratios", [1e308] * 3),
                     ("keep_ratios", [0.5, 0.6, 0.7]), ("ratio", float("nan")), ("chain", ["b"] * 10**5),
                     ("prefix_tokens", 10**9), ("model_name", "x" * 10**5), ("kind", "graph"),
                     ("locations", list(range(1, 200))), ("input_size", [3, 10**9, 10**9]),
                     ("scorer", "random"), ("decisions", "random"), ("fast_path", "random")):  # fmt: skip
        write(f"config.{key} oversized", config={key: bad})
    for key, sources in HOSTILE_SOURCES.items():
        for source in sources:
            write(f"hostile {key}", source=source)
    # pickles that would run code, where a loader might unpickle them
    code = pickle.dumps({"state_dict": {"w": torch.zeros(1)}, "x": payload})
    emit("pickle as the file", code)
    torch_file = tmp_path / "torch.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": payload}, torch_file)
    emit("torch pickle as the file", torch_file.read_bytes())
    write("pickle in a header field", meta={"config": code.decode("latin-1")})
    emit("pickle appended to the body", data + code)
    emit("pickle replacing the body", data[:header_end] + code + data[header_end + len(code) :])
    return out


@pytest.mark.slow  # over 1.5 s on 2 cores: the full run covers it, the inner loop (-m 'not slow') skips it
def test_fuzz_418_mutations_each_give_a_checkpoint_error(saved: Path, tmp_path: Path, code_payload):
    """418 mutations of a saved file, each a CheckpointError, never another exception, and no pickled code runs:
    60 truncations at random points, 80 header and 80 body random-byte changes, 19 fields removed (every header,
    config and source field but the optional scorer, decisions and fast_path), 91 config fields of wrong types, 42
    unparsable or wrong header values, 14 oversized or unknown
    values, 27 hostile sources, 5 code-running pickles (as the file, in a header field, in or after the body)."""
    payload, marker = code_payload
    mutations = _mutations(saved, tmp_path, payload)
    outcomes: dict[str, int] = {}
    for label, path in mutations:
        try:
            tokenprune.load(path)
        except CheckpointError:
            outcomes["CheckpointError"] = outcomes.get("CheckpointError", 0) + 1
            continue
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{label}: {type(e).__name__}: {e}")
        pytest.fail(f"{label}: loaded without an error")
    assert len(mutations) == 418 and outcomes == {"CheckpointError": 418}
    assert not marker.exists()
    # Positive control: the payload does run code when plainly unpickled, so the marker would have shown it.
    pickle.loads(pickle.dumps(payload))
    assert marker.exists()


def test_a_spatial_file_from_before_the_decisions_field_loads_nested(tmp_path: Path):
    """Spatial stages decided nested before `decisions` existed; such a file must load as it was trained."""
    dense = tokenprune.create_model("convnext_atto", num_classes=4).eval()
    sparse = tokenprune.sparsify(dense, 0.7, example_inputs=torch.randn(1, 3, 64, 64))
    assert tokenprune.config_of(sparse).decisions == "independent"
    saved = tokenprune.save(sparse, tmp_path / "spatial.safetensors")
    older = _write(saved, tmp_path / "older.safetensors", config={"decisions": None})
    loaded = tokenprune.load(older)
    assert tokenprune.config_of(loaded).decisions == "nested"
    assert all(sel.nested for sel in tokenprune.selectors(loaded))
    assert not any(sel.nested for sel in tokenprune.selectors(tokenprune.load(saved)))


def test_a_swin_file_from_before_the_fast_path_field_loads_scaled(tmp_path: Path):
    """Every fast path had a layer scale and epsilon 1e-6 before `fast_path` existed (a Swin block has no scale of
    its own, so today's default gives it none): such a file must load with its scales, as it was trained."""

    from tokenprune.nn.asymmetric import AsymmetricPath

    kwargs = dict(img_size=64, embed_dim=32, depths=[1, 1, 4, 1], num_heads=[1, 2, 4, 8], window_size=4)
    dense = tokenprune.create_model("swin_tiny_patch4_window7_224", num_classes=4, **kwargs).eval()
    x = torch.randn(2, 3, 64, 64)

    def paths(model):
        return [m for m in model.modules() if isinstance(m, AsymmetricPath)]

    block = tokenprune.sparsify(dense, 0.7, example_inputs=x[:1])
    assert tokenprune.config_of(block).fast_path == "block" and all(p.fast.gamma is None for p in paths(block))
    scaled = tokenprune.sparsify(dense, 0.7, example_inputs=x[:1], fast_path="scaled")
    assert all(p.fast.gamma is not None and p.fast.norm.eps == 1e-6 for p in paths(scaled))
    saved = tokenprune.save(scaled, tmp_path / "scaled.safetensors")
    older = _write(saved, tmp_path / "older.safetensors", config={"fast_path": None})
    for path in (saved, older):
        loaded = tokenprune.load(path).eval()
        assert tokenprune.config_of(loaded).fast_path == "scaled"
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), scaled.eval()(x), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="config.fast_path"):
        tokenprune.load(_write(saved, tmp_path / "bad.safetensors", config={"fast_path": "sometimes"}))


def test_a_file_from_before_the_scorer_field_loads_with_learned_predictors(saved: Path, tmp_path: Path):
    older = _write(saved, tmp_path / "older.safetensors", config={"scorer": None})
    assert "scorer" not in json.loads(read_metadata(older)["config"])
    assert tokenprune.config_of(tokenprune.load(older)).scorer == "predictor"


def test_unknown_header_fields_are_refused(saved: Path, tmp_path: Path):
    with pytest.raises(CheckpointError, match=r"refused header field 'comment': unknown field"):
        tokenprune.load(_write(saved, tmp_path / "extra.safetensors", meta={"comment": "hello"}))


def test_a_tensor_of_the_wrong_kind_is_refused(saved: Path, tmp_path: Path):
    tensors = load_file(str(saved))
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name].to(torch.int32)
    metadata = dict(read_metadata(saved))
    metadata["digest"] = _digest(metadata, tensors)
    save_file(tensors, str(tmp_path / "int.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match=rf"1 tensors have a dtype .*{name} torch.int32 vs torch.float32"):
        tokenprune.load(tmp_path / "int.safetensors")
    tensors[name] = tensors[name].to(torch.float16)  # another precision of the same kind loads (half-saved models)
    metadata["digest"] = _digest(metadata, tensors)
    save_file(tensors, str(tmp_path / "half.safetensors"), metadata=metadata)
    assert tokenprune.load(tmp_path / "half.safetensors").state_dict()[name].dtype == torch.float32


def test_load_with_model_leaves_the_callers_model_as_it_was(saved: Path):
    torch.manual_seed(1)
    mine = tokenprune.create_model("test_vit", **KWARGS).train()
    before = {k: v.clone() for k, v in mine.state_dict().items()}
    modes = [m.training for m in mine.modules()]
    loaded = tokenprune.load(saved, model=mine)
    assert [m.training for m in mine.modules()] == modes  # still in training mode, every submodule
    after = mine.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not tokenprune.selectors(mine) and tokenprune.selectors(loaded)
    assert not loaded.training


def test_numpy_ratios_save_as_plain_floats_and_load_back(tmp_path: Path):
    np = pytest.importorskip("numpy")
    dense = tokenprune.create_model("test_vit", **KWARGS).eval()
    sparse = tokenprune.sparsify(dense, np.float32(0.75), example_inputs=torch.randn(1, 3, 32, 32))
    path = tokenprune.save(sparse, tmp_path / "np.safetensors")
    config = tokenprune.config_of(tokenprune.load(path))
    assert type(config.ratio) is float and config.ratio == pytest.approx(0.75)
    assert all(type(r) is float for r in config.keep_ratios)


_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.one_of(st.integers(-3, 40), st.floats(-1, 2), st.text(max_size=2)), max_size=5),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from([*SparsifyConfig.__dataclass_fields__, "extra"]), value=_JUNK)
@pytest.mark.slow  # over 1.5 s on 2 cores: the full run covers it, the inner loop (-m 'not slow') skips it
def test_any_config_field_value_loads_or_is_refused_naming_it(saved: Path, tmp_path: Path, key: str, value):
    assume(value is not None or key == "source")  # _write takes None as "remove the field" (tested elsewhere)
    path = _write(saved, tmp_path / "h.safetensors", **({"source": value} if key == "source" else {}),
                  config=None if key == "source" else {key: value})  # fmt: skip
    try:
        model = tokenprune.load(path)
    except CheckpointError as e:
        assert "config" in str(e) or "source" in str(e) or "does not fit" in str(e), str(e)
        return
    config = tokenprune.config_of(model)
    assert key != "extra", "an unknown field was ignored instead of refused"
    assert config.to_dict()[key] == value, "a field was loaded but not used as written"
    assert all(0 < r <= 1 and type(r) is float for r in config.keep_ratios)


def test_save_failures_are_checkpoint_errors_and_keep_the_old_file(saved: Path, tmp_path: Path, monkeypatch):
    import errno

    import safetensors.torch

    model = tokenprune.load(saved)
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(CheckpointError, match=r"cannot write \S+file/m\.safetensors"):
        tokenprune.save(model, tmp_path / "file" / "m.safetensors")
    target = tokenprune.save(model, tmp_path / "m.safetensors")
    before = target.read_bytes()

    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        tokenprune.save(model, target)
    assert target.read_bytes() == before and not list(tmp_path.glob("*.tmp"))
