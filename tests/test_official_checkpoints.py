"""Importing the authors' released DynamicViT checkpoints (`tokenprune.io.official`, docs/design.md §4.1).

A file in the official layout is written from random weights (backbone under timm's DeiT names, predictors as
``score_predictor.s.in_conv/out_conv``, wrapped as the official `save_model` wraps it, with the run's
``argparse.Namespace``), imported, and compared with a reference of the official evaluation forward written here in
plain PyTorch from that layout: per stage, the predictor's log-probabilities, the ``int(196 * rho^s)`` best patches by
keep score (official order: by score), the class token kept, gathered; the blocks on what is left. The imported model
must keep the same tokens and give the same logits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import tokenprune
from tokenprune.io.official import OFFICIAL_MODELS, is_official_file, load_official

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "num_classes": 5}


def _official_state(backbone: torch.nn.Module, stages: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The backbone's tensors and `stages` random predictors under the official names."""
    return {**backbone.state_dict(), **_predictors(backbone.embed_dim, stages, "score_predictor.", seed)}


def _predictors(dim: int, stages: int, prefix: str, seed: int) -> dict[str, torch.Tensor]:
    """`stages` random official predictors (`PredictorLG`, Linear layout) under `prefix`. Linear weights at unit gain
    (std 1/sqrt(fan-in)), so that keep scores spread over a few units, far apart against rounding, but not so far
    that log-softmax saturates and ties many tokens at log-probability 0."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "in_conv.0": [dim],
        "in_conv.1": [dim, dim],
        "out_conv.0": [dim // 2, dim],
        "out_conv.2": [dim // 4, dim // 2],
        "out_conv.4": [2, dim // 4],
    }
    state = {}
    for s in range(stages):
        for part, shape in shapes.items():
            weight = torch.randn(shape, generator=g) * (0.2 if len(shape) == 1 else shape[-1] ** -0.5)
            state[f"{prefix}{s}.{part}.weight"] = weight + (1.0 if part == "in_conv.0" else 0.0)
            state[f"{prefix}{s}.{part}.bias"] = torch.randn(shape[0], generator=g) * 0.1
    return state


def _reference_logits(
    backbone: torch.nn.Module, state: dict[str, torch.Tensor], locations: list[int], rho: float, images: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The official evaluation forward (VisionTransformerDiffPruning in eval mode), from the official layout: logits
    and, per stage, the kept patch indices (into the original 0..N-1 patch positions, sorted)."""

    def predictor(s: int, x: torch.Tensor) -> torch.Tensor:
        p = f"score_predictor.{s}."
        z = F.layer_norm(x, (x.shape[-1],), state[p + "in_conv.0.weight"], state[p + "in_conv.0.bias"])
        z = F.gelu(F.linear(z, state[p + "in_conv.1.weight"], state[p + "in_conv.1.bias"]))
        half = z.shape[-1] // 2
        z = torch.cat([z[..., :half], z[..., half:].mean(dim=1, keepdim=True).expand_as(z[..., half:])], dim=-1)
        for layer in ("out_conv.0", "out_conv.2"):
            z = F.gelu(F.linear(z, state[p + layer + ".weight"], state[p + layer + ".bias"]))
        z = F.linear(z, state[p + "out_conv.4.weight"], state[p + "out_conv.4.bias"])
        return F.log_softmax(z, dim=-1)

    b = images.shape[0]
    x = backbone.patch_embed(images)
    x = torch.cat([backbone.cls_token.expand(b, -1, -1), x], dim=1) + backbone.pos_embed
    n = x.shape[1] - 1
    where = torch.arange(n).expand(b, n)  # original position of each patch token still in x
    kept = []
    for i, block in enumerate(backbone.blocks):
        if i in locations:
            s = locations.index(i)
            score = predictor(s, x[:, 1:])[..., 0]
            order = torch.argsort(score, dim=1, descending=True)[:, : int(n * rho ** (s + 1))]
            x = torch.cat([x[:, :1], torch.gather(x[:, 1:], 1, order[..., None].expand(-1, -1, x.shape[-1]))], 1)
            where = torch.gather(where, 1, order)
            kept.append(where.sort(dim=1).values)
        x = block(x)
    return backbone.head(backbone.norm(x)[:, 0]), kept


def _save_official(path, state, **args) -> None:
    """As the official `save_model` writes a checkpoint: the model's state dict among the run's other records."""
    record = {"model": state, "epoch": 29, "best": 79.3}
    if args:
        record["args"] = argparse.Namespace(**args, lr=5e-4, drop_path=0.0, data_path="/data/imagenet")
    torch.save(record, path)


def _kept_patches(sparse: torch.nn.Module) -> list[torch.Tensor]:
    """Per stage, the kept patch positions [B, k], ascending, from the stage's decisions over the initial patches."""
    decisions = tokenprune.sparsity_state(sparse).decisions
    return [torch.stack([row.nonzero().flatten() for row in d[..., 0]]) for d in decisions]


@pytest.mark.parametrize("rho", [0.7, 0.5])
def test_an_official_file_keeps_the_official_tokens_and_logits(tmp_path, rho):
    """A run's checkpoint with its args (model and base_rate read from them), for a dense model given."""
    torch.manual_seed(0)
    backbone = timm.create_model("vit_tiny_patch16_224", **TINY).eval()
    state = _official_state(backbone, stages=3)
    path = tmp_path / "checkpoint-best.pth"
    _save_official(path, state, model="deit-tiny-custom", base_rate=rho)
    assert is_official_file(path)

    dense, sparse = load_official(path, model=timm.create_model("vit_tiny_patch16_224", **TINY))
    assert tokenprune.config_of(sparse).keep_ratios == pytest.approx([rho, rho**2, rho**3])
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, expected_kept = _reference_logits(backbone, state, [1, 2, 3], rho, images)
        got = sparse(images)
        torch.testing.assert_close(dense(images), backbone(images), rtol=0, atol=0)
    for s, (mine, theirs) in enumerate(zip(_kept_patches(sparse), expected_kept, strict=True)):
        assert torch.equal(mine, theirs), f"stage {s} keeps other tokens"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_released_deit_s_file_without_args_builds_deit_s_at_the_official_stages(tmp_path):
    """The released layout at full size: DeiT-S recognised by its width, blocks 3, 6, 9, 196 patches; the ratio,
    which such a file does not record, is required."""
    torch.manual_seed(0)
    backbone = timm.create_model("deit_small_patch16_224").eval()
    state = _official_state(backbone, stages=3, seed=2)
    path = tmp_path / "deit_s_0.7.pth"
    _save_official(path, state)
    with pytest.raises(tokenprune.ConfigError, match="does not record the keep ratio"):
        load_official(path)
    dense, sparse = load_official(path, ratio=0.7)
    config = tokenprune.config_of(sparse)
    assert (config.source["name"], config.locations) == ("deit_small_patch16_224", [3, 6, 9])
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, expected_kept = _reference_logits(backbone, state, [3, 6, 9], 0.7, images)
        got = sparse(images)
    assert [k.shape[1] for k in expected_kept] == [137, 96, 67]  # the official int(196 * 0.7^s)
    for mine, theirs in zip(_kept_patches(sparse), expected_kept, strict=True):
        assert torch.equal(mine, theirs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_official_deit_names_are_the_architectures_the_authors_build():
    """deit-256 is DeiT-S's depth and patch at width 256 with 4 heads (head dim 64, as DeiT-S and DeiT-B)."""
    for name, arch in OFFICIAL_MODELS.items():
        if arch.kind != "token":
            continue
        model = timm.create_model(arch.timm_name, **arch.kwargs, num_classes=0, pretrained=False)
        width = {"deit-256": 256, "deit-s": 384, "deit-b": 768}[name]
        assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (width, 12, width // 64)
        assert model.blocks[0].attn.qkv.bias is not None and arch.locations == (3, 6, 9)


def test_other_files_are_refused_naming_what_they_are(tmp_path):
    torch.manual_seed(0)
    backbone = timm.create_model("vit_tiny_patch16_224", **TINY)
    state = _official_state(backbone, stages=3)

    lvvit = {**state, "aux_head.weight": torch.zeros(2, 2)}
    _save_official(tmp_path / "aux.pth", lvvit, base_rate=0.7)
    with pytest.raises(tokenprune.CheckpointError, match="LV-ViT"):
        load_official(tmp_path / "aux.pth")

    _save_official(tmp_path / "lv.pth", state, model="lvvit-s", base_rate=0.7)
    with pytest.raises(tokenprune.CheckpointError, match="'lvvit-s' checkpoint.*model=") as info:
        load_official(tmp_path / "lv.pth")
    assert "lv.pth" in str(info.value)

    torch.save(backbone.state_dict(), tmp_path / "dense.pth")
    assert not is_official_file(tmp_path / "dense.pth")
    with pytest.raises(tokenprune.CheckpointError, match="no official DynamicViT predictors"):
        load_official(tmp_path / "dense.pth", ratio=0.7)

    two = {k: v for k, v in state.items() if not k.startswith("score_predictor.2.")}
    _save_official(tmp_path / "two.pth", two, base_rate=0.7)
    with pytest.raises(tokenprune.ConfigError, match="two.pth .2 official predictors.*2 keep_ratios for 3 locations"):
        load_official(tmp_path / "two.pth", model=timm.create_model("vit_tiny_patch16_224", **TINY))

    wrong = dict(state)
    wrong["score_predictor.1.out_conv.2.weight"] = torch.zeros(3, 3)
    _save_official(tmp_path / "wrong.pth", wrong, base_rate=0.7)
    with pytest.raises(tokenprune.CheckpointError, match="stage 1 predictor.*shape"):
        load_official(tmp_path / "wrong.pth", model=timm.create_model("vit_tiny_patch16_224", **TINY))


@pytest.mark.slow
def test_the_commands_take_an_official_file(tmp_path):
    """`convert` imports a released-layout DeiT-256 run checkpoint into a model file that loads back to the same
    model; `report` reads the file directly; model options that would change the authors' architecture exit 2."""
    from typer.testing import CliRunner

    from tokenprune.cli import app

    torch.manual_seed(0)
    arch = OFFICIAL_MODELS["deit-256"]
    backbone = timm.create_model(arch.timm_name, **arch.kwargs).eval()
    path = tmp_path / "deit256.pth"
    _save_official(path, _official_state(backbone, stages=3), model="deit-256", base_rate=0.7)
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(path), "--out", str(out), "--flops-only"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [s["tokens"] for s in report["stages"]] == [138, 97, 68] and report["ratio"] == 0.7
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(tokenprune.load(out / "model.safetensors")(images), load_official(path)[1](images))
    direct = tmp_path / "direct.json"
    result = runner.invoke(app, ["report", str(path), "--flops-only", "--json", str(direct)])
    assert result.exit_code == 0, result.output
    assert json.loads(direct.read_text())["sparse"] == report["sparse"]
    result = runner.invoke(app, ["convert", str(path), "--out", str(out), "--locations", "1,2,3"])
    assert result.exit_code == 2 and "official DynamicViT checkpoint" in result.output, result.output


class _Payload:
    """Rebuilding this object would call `_mark` (what a hostile pickle does with os.system)."""

    def __reduce__(self):
        return (_mark, ("ran",))


_MARKS: list[str] = []


def _mark(value: str) -> str:
    _MARKS.append(value)
    return value


def test_only_the_runs_args_are_read_beyond_tensors_and_nothing_is_executed(tmp_path):
    """The Namespace is the one class besides tensors and containers that the official reader rebuilds; any other
    object in the file (here one whose unpickling would call a function) refuses the whole file, nothing run."""
    torch.manual_seed(0)
    state = _official_state(timm.create_model("vit_tiny_patch16_224", **TINY), stages=3)
    path = tmp_path / "hostile.pth"
    torch.save({"model": state, "args": argparse.Namespace(model="deit-s", base_rate=0.7), "x": _Payload()}, path)
    assert is_official_file(path)
    with pytest.raises(tokenprune.CheckpointError, match="refused to load .*hostile.pth.*Nothing from it was executed"):
        load_official(path)
    assert _MARKS == []


# ---- ConvNeXt (AdaConvNeXt, "DynamicCNN") ------------------------------------------------------------------------


def _official_convnext_state(depths, dims, locations, classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in the official AdaConvNeXt layout (the ConvNeXt authors' names, fast paths in the third
    stage from its first pruning location on, 1x1-conv predictors). Linear and conv weights at unit gain, layer
    scales and fast-path scales near 1, so that no small scale hides a wrong name."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        return torch.randn(*shape, generator=g) * fan_in**-0.5

    def near_one(n):
        return 1.0 + 0.2 * torch.randn(n, generator=g)

    def small(n):
        return 0.1 * torch.randn(n, generator=g)

    s = {"downsample_layers.0.0.weight": w(dims[0], 3, 4, 4), "downsample_layers.0.0.bias": small(dims[0])}
    s |= {"downsample_layers.0.1.weight": near_one(dims[0]), "downsample_layers.0.1.bias": small(dims[0])}
    for i in range(1, 4):
        s[f"downsample_layers.{i}.0.weight"], s[f"downsample_layers.{i}.0.bias"] = (
            near_one(dims[i - 1]),
            small(dims[i - 1]),
        )
        s[f"downsample_layers.{i}.1.weight"] = w(dims[i], dims[i - 1], 2, 2)
        s[f"downsample_layers.{i}.1.bias"] = small(dims[i])
    for i, (depth, d) in enumerate(zip(depths, dims, strict=True)):
        for j in range(depth):
            p = f"stages.{i}.{j}."
            s |= {p + "dwconv.weight": w(d, 1, 7, 7), p + "dwconv.bias": small(d)}
            s |= {p + "norm.weight": near_one(d), p + "norm.bias": small(d), p + "gamma": near_one(d)}
            s |= {p + "pwconv1.weight": w(4 * d, d), p + "pwconv1.bias": small(4 * d)}
            s |= {p + "pwconv2.weight": w(d, 4 * d), p + "pwconv2.bias": small(d)}
            if i == 2 and j >= locations[0]:
                s |= {p + "fast_path.0.weight": near_one(d), p + "fast_path.0.bias": small(d)}
                s |= {p + "fast_path.1.weight": w(d, d), p + "fast_path.1.bias": small(d)}
                s[p + "fast_path_gamma"] = near_one(d)
    s |= {"norm.weight": near_one(dims[3]), "norm.bias": small(dims[3])}
    s |= {"head.weight": w(classes, dims[3]), "head.bias": small(classes)}
    d = dims[2]
    for k in range(len(locations)):
        p = f"score_predictor.{k}."
        s |= {p + "in_conv.0.weight": near_one(d), p + "in_conv.0.bias": small(d)}
        for part, (o, i) in {"in_conv.1": (d, d), "out_conv.0": (d // 2, d), "out_conv.2": (d // 4, d // 2),
                             "out_conv.4": (2, d // 4)}.items():  # fmt: skip
            s |= {p + part + ".weight": w(o, i, 1, 1), p + part + ".bias": small(o)}
    return s


def _reference_convnext(
    state: dict[str, torch.Tensor], depths, locations, ratios, images: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The official AdaConvNeXt evaluation forward from the official layout, in plain PyTorch: logits and, per
    stage, the locations (row-major, sorted) whose slow path runs."""

    def ln_first(x, prefix):  # LayerNorm over the channels of [B, C, H, W], eps 1e-6
        c = x.shape[1]
        return F.layer_norm(x.permute(0, 2, 3, 1), (c,), state[prefix + ".weight"], state[prefix + ".bias"], 1e-6)

    def predictor(k, x, ratio):
        p = f"score_predictor.{k}."
        z = ln_first(x, p + "in_conv.0").permute(0, 3, 1, 2)
        z = F.gelu(F.conv2d(z, state[p + "in_conv.1.weight"], state[p + "in_conv.1.bias"]))
        c = z.shape[1] // 2
        z = torch.cat([z[:, :c], z[:, c:].mean(dim=(2, 3), keepdim=True).expand_as(z[:, c:])], dim=1)
        for part in ("out_conv.0", "out_conv.2"):
            z = F.gelu(F.conv2d(z, state[p + part + ".weight"], state[p + part + ".bias"]))
        score = F.log_softmax(F.conv2d(z, state[p + "out_conv.4.weight"], state[p + "out_conv.4.bias"]), dim=1)
        order = torch.argsort(score[:, 0].flatten(1), dim=1, descending=True)
        k = int(order.shape[1] * ratio)
        return order[:, :k], order[:, k:]

    def block(x, p, idx):
        b, c, h, w = x.shape
        y = F.conv2d(x, state[p + "dwconv.weight"], state[p + "dwconv.bias"], padding=3, groups=c)
        y = y.permute(0, 2, 3, 1).reshape(b, h * w, c)

        def slow(t):
            t = F.layer_norm(t, (c,), state[p + "norm.weight"], state[p + "norm.bias"], 1e-6)
            t = F.linear(F.gelu(F.linear(t, state[p + "pwconv1.weight"], state[p + "pwconv1.bias"])),
                         state[p + "pwconv2.weight"], state[p + "pwconv2.bias"])  # fmt: skip
            return t * state[p + "gamma"]

        def fast(t):
            t = F.layer_norm(t, (c,), state[p + "fast_path.0.weight"], state[p + "fast_path.0.bias"], 1e-6)
            return (
                F.linear(t, state[p + "fast_path.1.weight"], state[p + "fast_path.1.bias"])
                * state[p + "fast_path_gamma"]
            )

        if idx is None:
            out = slow(y)
        else:
            out = torch.zeros_like(y)
            for i1, i2, row_y, row_out in zip(*idx, y, out, strict=True):
                row_out[i1], row_out[i2] = slow(row_y[i1]), fast(row_y[i2])
        return x + out.reshape(b, h, w, c).permute(0, 3, 1, 2)

    x = F.conv2d(images, state["downsample_layers.0.0.weight"], state["downsample_layers.0.0.bias"], stride=4)
    x = ln_first(x, "downsample_layers.0.1").permute(0, 3, 1, 2)
    kept, idx = [], None
    for i, depth in enumerate(depths):
        if i > 0:
            x = ln_first(x, f"downsample_layers.{i}.0").permute(0, 3, 1, 2)
            x = F.conv2d(x, state[f"downsample_layers.{i}.1.weight"], state[f"downsample_layers.{i}.1.bias"], stride=2)
        for j in range(depth):
            if i == 2 and j in locations:
                k = locations.index(j)
                idx = predictor(k, x, ratios[k])
                kept.append(idx[0].sort(dim=1).values)
            x = block(x, f"stages.{i}.{j}.", idx if i == 2 else None)
    pooled = F.layer_norm(x.mean(dim=(2, 3)), (x.shape[1],), state["norm.weight"], state["norm.bias"], 1e-6)
    return F.linear(pooled, state["head.weight"], state["head.bias"]), kept


def test_an_official_convnext_file_keeps_the_official_locations_and_logits(tmp_path):
    """A run's AdaConvNeXt checkpoint at rho = 0.7 (args.model convnext-t: blocks 1, 2, 3 of the third stage), on a
    small ConvNeXt given as the dense model: the official floats keep int(36 * (0.7 - 0.2)) = 17 locations at the
    second stage, one fewer than tokenprune's own schedule would."""
    depths, dims = (1, 1, 4, 1), (16, 32, 64, 128)
    state = _official_convnext_state(depths, dims, [1, 2, 3], classes=5)
    path = tmp_path / "checkpoint-best.pth"
    _save_official(path, state, model="convnext-t", base_rate=0.7)
    dense_model = timm.create_model("convnext_tiny", depths=depths, dims=dims, num_classes=5)
    dense, sparse = load_official(path, model=dense_model)
    images = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, expected_kept = _reference_convnext(state, depths, [1, 2, 3], [0.7, 0.7 - 0.2, 0.7 - 0.4], images)
        got = sparse(images)
        dense_logits = dense(images)
    assert [k.shape[1] for k in expected_kept] == [25, 17, 10]
    for s, (mine, theirs) in enumerate(zip(_kept_patches(sparse), expected_kept, strict=True)):
        assert torch.equal(mine, theirs), f"stage {s} keeps other locations"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got - dense_logits).abs().max() > 1e-2  # the fast paths changed something: the comparison has power


def test_a_released_convnext_t_file_without_args_is_recognised_by_its_shape(tmp_path):
    state = _official_convnext_state((3, 3, 9, 3), (96, 192, 384, 768), [1, 2, 3], classes=1000, seed=4)
    path = tmp_path / "convnext_t_0.7.pth"
    _save_official(path, state)
    dense, sparse = load_official(path, ratio=0.7)
    config = tokenprune.config_of(sparse)
    assert (config.source["name"], config.locations, config.decisions) == ("convnext_tiny", [1, 2, 3], "independent")
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        official = [0.7, 0.7 - 0.2, 0.7 - 0.4]  # main.py's SPARSE_RATIO
        expected, expected_kept = _reference_convnext(state, (3, 3, 9, 3), [1, 2, 3], official, images)
        got = sparse(images)
    assert [k.shape[1] for k in expected_kept] == [137, 97, 58]  # the official int(196 * (0.7 - 0.2 s))
    for mine, theirs in zip(_kept_patches(sparse), expected_kept, strict=True):
        assert torch.equal(mine, theirs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_the_official_tensors_resaved_as_safetensors_import_alike(tmp_path):
    """A file of the official tensors re-saved as safetensors (no args: the ratio given) is recognised from its header
    and imports to the same model; a tokenprune model file, which also holds predictors, is not taken for one."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = _official_state(timm.create_model("vit_tiny_patch16_224", **TINY), stages=3)
    _save_official(tmp_path / "run.pth", state, base_rate=0.7)
    save_file(state, tmp_path / "official.safetensors")
    assert is_official_file(tmp_path / "official.safetensors")
    images = torch.randn(2, 3, 32, 32)
    models = [
        load_official(tmp_path / name, ratio=0.7, model=tokenprune.create_model("vit_tiny_patch16_224", **TINY))[1]
        for name in ("run.pth", "official.safetensors")
    ]
    with torch.no_grad():
        torch.testing.assert_close(models[0](images), models[1](images), rtol=0, atol=0)
    tokenprune.save(models[1], tmp_path / "mine.safetensors")
    assert not is_official_file(tmp_path / "mine.safetensors")


# ---- Swin (AdaSwin, "DynamicSwin") -------------------------------------------------------------------------------


def _randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight at a scale that shows a misplaced tensor: matrices at unit gain, norm weights near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _official_swin_state(model: torch.nn.Module, locations, seed: int = 0) -> dict[str, torch.Tensor]:
    """A timm Swin's tensors written back under the Swin authors' names (each layer's downsample at its end, `head`,
    the relative-position index and shift-mask buffers they persist), plus AdaSwin's fast paths (`fastmlp.fc1`:
    LayerNorm, Linear) in the third layer from its first pruning location on and its predictors there."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        layer = key.split(".")[1] if key.startswith("layers.") else None
        if layer is not None and ".downsample." in key:
            key = key.replace(f"layers.{layer}.downsample.", f"layers.{int(layer) - 1}.downsample.", 1)
        state[key.replace("head.fc.", "head.", 1)] = value
    blocks = model.layers[2].blocks
    dim = blocks[0].norm1.normalized_shape[0]
    for j in range(len(blocks)):
        state[f"layers.2.blocks.{j}.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
        if j >= locations[0]:
            p = f"layers.2.blocks.{j}.fastmlp.fc1."
            state |= {p + "0.weight": 1.0 + 0.2 * torch.randn(dim, generator=g), p + "0.bias": torch.zeros(dim)}
            state |= {p + "1.weight": torch.randn(dim, dim, generator=g) * dim**-0.5, p + "1.bias": torch.zeros(dim)}
    state["layers.2.blocks.1.attn_mask"] = torch.zeros(4, 49, 49)
    return state | _predictors(dim, len(locations), "layers.2.score_predictor.", seed)


def _reference_swin(model, state, locations, ratios, images):
    """The official AdaSwin evaluation forward, with the original timm model's own layers for what AdaSwin leaves
    dense: in the third layer from the first pruning location on, attention on every location, then the MLP at the
    locations the latest stage kept and the file's `fastmlp` at the others."""
    b = images.shape[0]
    x = model.patch_embed(images)
    kept, idx = [], None
    for i, layer in enumerate(model.layers):
        x = layer.downsample(x)
        for j, block in enumerate(layer.blocks):
            if i != 2 or j < locations[0]:
                x = block(x)
                continue
            _, h, w, c = x.shape
            if j in locations:
                s = locations.index(j)
                p = f"layers.2.score_predictor.{s}."
                z = F.gelu(F.linear(F.layer_norm(x.reshape(b, h * w, c), (c,), state[p + "in_conv.0.weight"],
                                                 state[p + "in_conv.0.bias"]),
                                    state[p + "in_conv.1.weight"], state[p + "in_conv.1.bias"]))  # fmt: skip
                z = torch.cat(
                    [z[..., : c // 2], z[..., c // 2 :].mean(1, keepdim=True).expand_as(z[..., c // 2 :])], -1
                )
                for part in ("out_conv.0", "out_conv.2"):
                    z = F.gelu(F.linear(z, state[p + part + ".weight"], state[p + part + ".bias"]))
                score = F.log_softmax(F.linear(z, state[p + "out_conv.4.weight"], state[p + "out_conv.4.bias"]), -1)
                order = torch.argsort(score[..., 0], dim=1, descending=True)
                k = int(h * w * ratios[s])
                idx = (order[:, :k], order[:, k:])
                kept.append(idx[0].sort(dim=1).values)
            x = x + block._attn(block.norm1(x))
            t = x.reshape(b, h * w, c)
            out = torch.zeros_like(t)
            f = f"layers.2.blocks.{j}.fastmlp.fc1."
            for i1, i2, row, row_out in zip(*idx, t, out, strict=True):
                row_out[i1] = block.mlp(block.norm2(row[i1]))
                fast = F.layer_norm(row[i2], (c,), state[f + "0.weight"], state[f + "0.bias"], 1e-5)
                row_out[i2] = F.linear(fast, state[f + "1.weight"], state[f + "1.bias"])
            x = x + out.reshape(b, h, w, c)
    return model.forward_head(model.norm(x)), kept


def test_an_official_swin_file_keeps_the_official_locations_and_logits(tmp_path):
    """A released-layout Swin-T file (no args, recognised by its shape; rho given): renamed back to timm's names it
    is the model it was written from; sparsified before blocks 1, 2, 3 of the third layer it keeps the official
    locations (137, 97, 58 of 196) and gives the official logits, though its predictors normalise with epsilon 1e-6
    where AdaSwin's use 1e-5 (docs/design.md §4.1)."""
    torch.manual_seed(0)
    original = _randomized(timm.create_model("swin_tiny_patch4_window7_224"), seed=6).eval()
    state = _official_swin_state(original, [1, 2, 3])
    path = tmp_path / "swin_t_0.7.pth"
    _save_official(path, state)
    dense, sparse = load_official(path, ratio=0.7)
    for key, value in original.state_dict().items():
        assert torch.equal(dense.state_dict()[key], value), key
    config = tokenprune.config_of(sparse)
    assert (config.source["name"], config.locations) == ("swin_tiny_patch4_window7_224", [1, 2, 3])
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected, expected_kept = _reference_swin(original, state, [1, 2, 3], [0.7, 0.7 - 0.2, 0.7 - 0.4], images)
        got = sparse(images)
        assert (got - original(images)).abs().max() > 1e-2  # the fast paths changed something
    assert [k.shape[1] for k in expected_kept] == [137, 97, 58]
    for mine, theirs in zip(_kept_patches(sparse), expected_kept, strict=True):
        assert torch.equal(mine, theirs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_the_official_spatial_names_are_the_architectures_the_authors_build():
    """ConvNeXt-T/S/B and Swin-T/S/B as the authors' `main.py` builds them: third-stage depths 9, 27, 27 and 6, 18,
    18, widths 96, 96, 128; every official location inside the third stage."""
    expected = {"convnext-t": (96, 9), "convnext-s": (96, 27), "convnext-b": (128, 27),
                "swin-t": (96, 6), "swin-s": (96, 18), "swin-b": (128, 18)}  # fmt: skip
    for name, (width, depth) in expected.items():
        arch = OFFICIAL_MODELS[name]
        with torch.device("meta"):
            model = timm.create_model(arch.timm_name, **arch.kwargs)
        stage = model.stages[2] if name.startswith("convnext") else model.layers[2]
        first = model.stem[0] if name.startswith("convnext") else model.patch_embed.proj
        assert (first.out_channels, len(stage.blocks)) == (width, depth), name
        assert arch.kind == "spatial" and max(arch.locations) < depth


def test_a_bad_ratio_given_or_recorded_is_a_config_error(tmp_path):
    torch.manual_seed(0)
    state = _official_state(timm.create_model("vit_tiny_patch16_224", **TINY), stages=3)
    _save_official(tmp_path / "bad.pth", state, base_rate="0.7x")
    model = timm.create_model("vit_tiny_patch16_224", **TINY)
    with pytest.raises(tokenprune.ConfigError, match=r"bad.pth: args.base_rate='0.7x' is not a number"):
        load_official(tmp_path / "bad.pth", model=model)
    with pytest.raises(tokenprune.ConfigError, match="ratio=1.5 is out of range"):
        load_official(tmp_path / "bad.pth", ratio=1.5, model=model)


def test_an_imported_model_fine_tunes_further(tmp_path):
    """The harness takes an imported model as any sparsified model: here moved to rho 0.5 and trained one step,
    starting from the file's predictors (README, "The authors' checkpoints")."""
    from tokenprune.train import finetune

    torch.manual_seed(0)
    backbone = tokenprune.create_model("vit_tiny_patch16_224", **{**TINY, "num_classes": 4})
    state = _official_state(backbone, stages=3)
    _save_official(tmp_path / "run.pth", state, base_rate=0.7)
    dense, sparse = load_official(tmp_path / "run.pth", model=backbone)
    tokenprune.set_keep_ratios(sparse, ratio=0.5)
    recipe = ["data.source=synthetic", "data.num_classes=4", "data.synthetic_size=8", "data.workers=0",
              "optim.batch_size=8", "optim.epochs=1", "optim.warmup_epochs=0", "run.threads=1",
              f"run.output_dir={tmp_path / 'run'}"]  # fmt: skip
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    result = finetune(recipes / "fashion_mnist_cpu.yaml", model=sparse, teacher=dense, overrides=recipe)
    assert tokenprune.config_of(result.model).keep_ratios == [0.5, 0.25, 0.125]
    trained = tokenprune.selectors(result.model)[0].predictor.embed[1].weight
    assert not torch.equal(trained, state["score_predictor.0.in_conv.1.weight"])
    assert (tmp_path / "run" / "final.pt").is_file()
