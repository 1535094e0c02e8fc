"""The self-check measured by mutations: every deliberate corruption of the applied rewrite must be refused.

Each model is a small random-weight configuration with timm's (or torchvision's) default layer-scale init — the tiny
values (1e-5, 1e-6) that hid wrong rewrites from an output-only check. Corruptions are applied to what `apply_plan`
installed (the graphs' calls and the inserted modules), not to the rule code: a wrapper around
`tokenprune.sparsify.apply_plan` calls the real one, then edits every `fx.GraphModule` of the result and wraps its
`TokenSelector`/`AsymmetricPath` modules. Each corruption must actually edit something in the models it is listed
for (so a test cannot pass vacuously), `sparsify` must raise `UnsupportedModelError` from the self-check, and the
un-corrupted model must be accepted (the control).

    python tests/test_selfcheck_mutations.py     # prints the mutation score, model x corruption
"""

from __future__ import annotations

import importlib
import inspect
import warnings

import pytest
import timm
import torch
import torch.fx as fx
import torchvision
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

import tokenprune
from tokenprune.errors import UnsupportedModelError
from tokenprune.nn import masked, tokenops
from tokenprune.nn.asymmetric import AsymmetricPath, gather_locations
from tokenprune.nn.select import TokenSelector

# reason: the package exports the function `sparsify` under the module's name
sparsify_module = importlib.import_module("tokenprune.sparsify")

# ---------------------------------------------------------------- models


def _tv_convnext():
    # torchvision's ConvNeXt with its default layer_scale 1e-6, three stages short and narrow.
    widths = [(16, 32, 1), (32, 64, 1), (64, 128, 4), (128, None, 1)]
    setting = [CNBlockConfig(*w) for w in widths]
    return ConvNeXt(setting, num_classes=10)


#: name -> (constructor, example input shape or None for the model's own)
MODELS = {
    "cait": (lambda: timm.create_model("cait_xxs24_224", img_size=64, depth=4), None),
    "deit3": (lambda: timm.create_model("deit3_small_patch16_224", img_size=64, depth=4), None),
    "eva02": (lambda: timm.create_model("eva02_tiny_patch14_224", img_size=56, depth=4), None),
    "beit": (
        lambda: timm.create_model("beit_base_patch16_224", img_size=64, depth=4, embed_dim=96, num_heads=3),
        None,
    ),
    "siglip_map": (
        lambda: timm.create_model("vit_base_patch16_siglip_224", img_size=64, depth=4, embed_dim=96, num_heads=3),
        None,
    ),
    "vit_gap": (lambda: timm.create_model("vit_medium_patch16_gap_256", img_size=64, depth=4), None),
    "vit_features": (  # the head needs every token: refilled
        lambda: timm.create_model("vit_small_patch16_224", img_size=64, depth=4, features_only=True, out_indices=(3,)),
        None,
    ),
    "convnext": (lambda: timm.create_model("convnext_atto", num_classes=10), (2, 3, 64, 64)),
    "tv_convnext": (_tv_convnext, (2, 3, 64, 64)),
    "swin": (
        lambda: timm.create_model(
            "swin_tiny_patch4_window7_224", img_size=112, embed_dim=48, depths=(1, 1, 4, 1), num_heads=(2, 2, 4, 4)
        ),
        None,
    ),
}
TOKEN = ["cait", "deit3", "eva02", "beit", "siglip_map", "vit_gap", "vit_features"]
SPATIAL = ["convnext", "tv_convnext", "swin"]

# ---------------------------------------------------------------- corruptions of the applied model


def _without_policy(fn):
    """`fn` with its `policy` argument forced to None: the plain operation, whatever was kept."""
    signature = inspect.signature(fn)

    def plain(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["policy"] = None
        return fn(*bound.args, **bound.kwargs)

    return plain


def _swap_calls(model, replacements) -> int:
    """Replace `call_function` targets in every graph of `model`; returns the number of nodes edited."""
    edited = 0
    for gm in [m for m in model.modules() if isinstance(m, fx.GraphModule)]:
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in replacements:
                node.target = replacements[node.target]
                edited += 1
        gm.recompile()
    return edited


def _wrap_modules(model, kind, make) -> int:
    """Give every module of type `kind` the forward `make(module, real_forward)`; returns how many."""
    found = [m for m in model.modules() if type(m) is kind]
    for m in found:
        m.forward = make(m, m.forward)
    return len(found)


def mask_removed(model) -> int:
    """Self-attention in later blocks ignores the keep policy (spatial: the masked mix ignores the mask)."""
    fns = (masked.masked_sdpa, masked.masked_mha, masked.masked_softmax, masked.masked_attention, tokenops.zero_dropped)
    edited = _swap_calls(model, {f: _without_policy(f) for f in fns})

    def make(m, real):
        return lambda entry, slow, mask=None, keep=None, drop=None: real(entry, slow, None, keep, drop)

    return edited + _wrap_modules(model, AsymmetricPath, make)


def head_unmasked(model) -> int:
    """Pooling and cross-attention over tokens read every token (masked mean -> plain mean)."""
    fns = (
        tokenops.masked_token_mean,
        tokenops.masked_token_sum,
        tokenops.masked_cross_attention,
        tokenops.masked_cross_softmax,
    )
    return _swap_calls(model, {f: _without_policy(f) for f in fns})


def gather_off_by_one(model) -> int:
    """Pruned execution gathers the token (location) one position after each kept one."""

    def shifted_gather(x, keep, channel, spatial):
        if keep is None:
            return gather_locations(x, keep, channel, spatial)
        total = x.numel() // (x.shape[0] * x.shape[channel])
        return gather_locations(x, (keep + 1) % total, channel, spatial)

    edited = _swap_calls(model, {gather_locations: shifted_gather})

    def make(sel, real):
        def forward(x, policy, index, initial_tokens, score=None):
            tokens, policy, position = real(x, policy, index, initial_tokens, score)
            if sel.last_index is None:
                return tokens, policy, position
            p = sel.prefix_tokens
            wrong = (sel.last_index + 1) % (x.shape[1] - p)
            kept = x[:, p:].gather(1, wrong.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            return torch.cat([x[:, :p], kept], dim=1), policy, position

        return forward

    return edited + _wrap_modules(model, TokenSelector, make)


def wrong_locations(model) -> int:
    """Each slow-path result is written back at another kept location (spatial, gathered execution)."""

    def make(m, real):
        def forward(entry, slow, mask=None, keep=None, drop=None):
            return real(entry, slow, mask, None if keep is None else keep.roll(1, dims=1), drop)

        return forward

    return _wrap_modules(model, AsymmetricPath, make)


def wrong_positions(model) -> int:
    """Position-indexed constants (rotary embeddings, relative position biases) gathered for the wrong tokens."""
    real = tokenops.gather_positions

    def rolled(value, index, dims, rank):
        return real(value, None if index is None else index.roll(1, dims=1), dims, rank)

    return _swap_calls(model, {real: rolled})


def refill_skipped(model) -> int:
    """Masked execution skips the refill: dropped tokens reach the head with their later values."""
    real = tokenops.refill

    def skipped(canvas, x, policy, index):
        return x if policy is not None else real(canvas, x, policy, index)

    return _swap_calls(model, {real: skipped})


def stage_unmasked(model) -> int:
    """Later stages decide on another basis in one execution: token stages in masked execution ignore the previous
    stages' decisions (their predictor reads dropped tokens, and their top-k may pick them again); independent
    spatial stages (the official default) choose among the previous stage's kept locations in gathered execution."""
    from tokenprune.nn.spatial_predictor import SpatialSelector

    def token(sel, real):
        return lambda x, policy, index, initial_tokens, score=None: real(x, None, index, initial_tokens, score)

    def spatial(sel, real):
        def forward(x, mask, keep):
            if sel.nested:
                return real(x, None, keep)
            sel.nested = keep is not None
            try:
                return real(x, mask, keep)
            finally:
                sel.nested = False

        return forward

    return _wrap_modules(model, TokenSelector, token) + _wrap_modules(model, SpatialSelector, spatial)


CORRUPTIONS = {
    "mask_removed": mask_removed,
    "head_unmasked": head_unmasked,
    "gather_off_by_one": gather_off_by_one,
    "wrong_locations": wrong_locations,
    "wrong_positions": wrong_positions,
    "refill_skipped": refill_skipped,
    "stage_unmasked": stage_unmasked,
}

#: Which corruption applies to which model (it edits something there).
APPLIES = {
    "mask_removed": TOKEN + SPATIAL,
    "head_unmasked": ["cait", "eva02", "beit", "siglip_map", "vit_gap"],
    "gather_off_by_one": TOKEN + SPATIAL,
    "wrong_locations": SPATIAL,
    "wrong_positions": ["eva02", "beit"],
    "refill_skipped": ["vit_features"],
    "stage_unmasked": TOKEN + SPATIAL,
}
CASES = [(m, c) for c, models in APPLIES.items() for m in models]


def _build(name):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    return model, (None if shape is None else torch.randn(*shape))


def _sparsify(model, example, monkeypatch=None, corruption=None) -> tuple[object, int]:
    """sparsify, with `corruption` applied to the applied model before the self-check; (result or error, edits)."""
    edits = [0]
    if corruption is not None:
        real = sparsify_module.apply_plan

        def corrupted(target, plan):
            applied = real(target, plan)
            edits[0] = corruption(applied.model)
            return applied

        monkeypatch.setattr(sparsify_module, "apply_plan", corrupted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return tokenprune.sparsify(model, 0.7, example_inputs=example), edits[0]
        except UnsupportedModelError as e:
            return e, edits[0]


@pytest.mark.parametrize("name", list(MODELS))
def test_control_is_accepted(name):
    model, example = _build(name)
    result, _ = _sparsify(model, example)
    assert not isinstance(result, Exception), str(result)
    assert tokenprune.selectors(result)


@pytest.mark.parametrize("name,corruption", CASES, ids=[f"{m}-{c}" for m, c in CASES])
def test_corruption_is_refused(name, corruption, monkeypatch):
    model, example = _build(name)
    result, edits = _sparsify(model, example, monkeypatch, CORRUPTIONS[corruption])
    assert edits > 0, f"{corruption} found nothing to corrupt in {name}"
    assert isinstance(result, UnsupportedModelError), f"{corruption} in {name} was accepted"
    assert "self-check failed" in str(result) or "fails on the example input" in str(result), str(result)


#: Models checked again in bf16: the check then runs on widened fp32 values, and must see every corruption still.
LOW_PRECISION = ["cait", "deit3", "eva02", "convnext", "swin"]
LOW_CASES = [(m, c) for m, c in CASES if m in LOW_PRECISION]


def _build_bf16(name):
    model, example = _build(name)
    return model.to(torch.bfloat16), (None if example is None else example.to(torch.bfloat16))


@pytest.mark.parametrize("name", LOW_PRECISION)
def test_control_is_accepted_in_bf16(name):
    model, example = _build_bf16(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result, _ = _sparsify(model, example)
    assert not isinstance(result, Exception), str(result)
    assert all(p.dtype == torch.bfloat16 for n, p in result.named_parameters() if "tokenprune" not in n)
    after = model.state_dict()  # the original was widened during the check and is back, bit for bit
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())


@pytest.mark.parametrize("name,corruption", LOW_CASES, ids=[f"{m}-{c}" for m, c in LOW_CASES])
def test_corruption_is_refused_in_bf16(name, corruption, monkeypatch):
    model, example = _build_bf16(name)
    result, edits = _sparsify(model, example, monkeypatch, CORRUPTIONS[corruption])
    assert edits > 0, f"{corruption} found nothing to corrupt in {name}"
    assert isinstance(result, UnsupportedModelError), f"{corruption} in {name} (bf16) was accepted"


def test_unit_scales_are_restored_bitwise_even_on_refusal(monkeypatch):
    """The check sets branch scales to 1; after a refusal (inplace) every parameter is as it was, bit for bit."""
    model, example = _build("deit3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = sparsify_module.apply_plan

    def corrupted(target, plan):
        applied = real(target, plan)
        mask_removed(applied.model)
        return applied

    monkeypatch.setattr(sparsify_module, "apply_plan", corrupted)
    with pytest.raises(UnsupportedModelError, match="self-check failed"):
        tokenprune.sparsify(model, 0.7, inplace=True)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())


def _score() -> None:
    """Print caught/total per model x corruption (run this file as a script)."""

    class Patch:
        def setattr(self, obj, attr, value):
            self.undo = (obj, attr, getattr(obj, attr))
            setattr(obj, attr, value)

    caught = total = 0
    for name in MODELS:
        model, example = _build(name)
        control, _ = _sparsify(model, example)
        row = [f"control {'accepted' if not isinstance(control, Exception) else 'REFUSED'}"]
        for corruption in CORRUPTIONS:
            if name not in APPLIES[corruption]:
                continue
            patch = Patch()
            model, example = _build(name)
            result, edits = _sparsify(model, example, patch, CORRUPTIONS[corruption])
            setattr(*patch.undo)
            total += 1
            caught += isinstance(result, UnsupportedModelError)
            row.append(f"{corruption} {'caught' if isinstance(result, UnsupportedModelError) else 'MISSED'}")
        print(f"{name:<13} " + ", ".join(row), flush=True)
    print(
        f"mutation score: {caught}/{total} (torch {torch.__version__}, timm {timm.__version__}, "
        f"torchvision {torchvision.__version__})"
    )


if __name__ == "__main__":
    _score()
