"""Nothing the user holds is changed except as documented (issue #20 item 7), and wrappers are refused up front (#21).

- `plan` and `sparsify` keep every submodule's own training flag (a frozen ``patch_embed.eval()`` stays frozen), in
  the user's model and in the returned sparse model;
- any exception inside ``sparsify(..., inplace=True)`` leaves the model exactly as it was: the same module objects
  under the same names, bitwise the same parameters and buffers, the same flags;
- a ``torch.compile``, ``nn.DataParallel`` or DDP wrapper is refused before anything runs it.
"""

from __future__ import annotations

import importlib

import pytest
import timm
import torch
from torch import nn

import tokenprune
import tokenprune.fx.plan
from tokenprune import UnsupportedModelError

entry = importlib.import_module("tokenprune.sparsify")  # the module; `tokenprune.sparsify` is the function

MODELS = {
    "deit": (
        lambda: timm.create_model("deit_tiny_patch16_224", depth=4, embed_dim=64, num_heads=2, img_size=64),
        "patch_embed",
    ),
    "convnext": (
        lambda: timm.create_model("convnext_tiny", depths=(1, 1, 3, 1), dims=(16, 32, 64, 128), num_classes=10),
        "stem",
    ),
}


def _model(kind: str) -> nn.Module:
    build, frozen = MODELS[kind]
    model = build().train()
    model.get_submodule(frozen).eval()  # a user's frozen stem
    return model


def _flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def _snapshot(model: nn.Module) -> dict:
    return {
        "modules": {name: id(m) for name, m in model.named_modules()},
        "tensors": {name: (id(t), t.detach().clone()) for name, t in model.state_dict(keep_vars=True).items()},
        "flags": _flags(model),
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["flags"] == before["flags"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, (ident, value) in before["tensors"].items():
        now_ident, now = after["tensors"][name]
        assert now_ident == ident and now.dtype == value.dtype and torch.equal(now, value), name


@pytest.mark.parametrize("kind", list(MODELS))
def test_plan_keeps_every_flag(kind):
    model = _model(kind)
    before = _snapshot(model)
    tokenprune.plan(model, example_inputs=torch.randn(2, 3, 64, 64))
    _assert_unchanged(model, before)


@pytest.mark.parametrize("kind", list(MODELS))
def test_sparsify_keeps_every_flag_of_the_user_model_and_the_result(kind):
    model = _model(kind)
    before = _snapshot(model)
    sparse = tokenprune.sparsify(model, 0.7, example_inputs=torch.randn(2, 3, 64, 64))
    _assert_unchanged(model, before)
    flags = _flags(sparse)
    assert {name: flags[name] for name in before["flags"] if name} == {k: v for k, v in before["flags"].items() if k}
    # The pass's own modules (stages, recorder, rewritten blocks) take the flag of what they stand in or sit in.
    new = [name for name in flags if name not in before["flags"] or name.startswith("tokenprune_")]
    assert new and all(flags[name] for name in new)
    assert sparse.training and not sparse.get_submodule(MODELS[kind][1]).training


def _fail(*args, **kwargs):
    raise RuntimeError("injected failure after the plan was applied")


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("where", ["self_check", "recorder", "apply"])
def test_inplace_failure_restores_the_model_exactly(kind, where, monkeypatch):
    model = _model(kind)
    before = _snapshot(model)
    if where == "self_check":  # after every module was installed
        monkeypatch.setattr(entry, "self_check", _fail)
    elif where == "recorder":  # after the self-check ran the model (and left its flags as it likes)
        monkeypatch.setattr(entry, "timm_feature_kwargs", _fail)
    else:  # halfway through installing: the second module fails
        calls, install = [], tokenprune.fx.plan.set_submodule

        def flaky(*args):
            calls.append(args)
            if len(calls) == 2:
                _fail()
            install(*args)

        monkeypatch.setattr(tokenprune.fx.plan, "set_submodule", flaky)
    with pytest.raises(RuntimeError, match="injected failure"):
        tokenprune.sparsify(model, 0.7, example_inputs=torch.randn(2, 3, 64, 64), inplace=True)
    _assert_unchanged(model, before)
    assert not any(name.startswith("tokenprune") for name, _ in model.named_modules())


@pytest.mark.parametrize("kind", list(MODELS))
def test_inplace_refusal_after_the_self_check_ran_restores_the_model_exactly(kind, monkeypatch):
    """The real self-check runs the applied model (and sets one training flag for all of it), then a refusal."""
    real = entry.self_check

    def refuse(*args, **kwargs):
        real(*args, **kwargs)
        raise UnsupportedModelError("injected refusal")

    monkeypatch.setattr(entry, "self_check", refuse)
    model = _model(kind)
    before = _snapshot(model)
    with pytest.raises(UnsupportedModelError, match="injected refusal"):
        tokenprune.sparsify(model, 0.7, example_inputs=torch.randn(2, 3, 64, 64), inplace=True)
    _assert_unchanged(model, before)


class _Tripwire(nn.Module):
    """Raises if anything runs it: the refusal must come before any forward (under dynamo, one forward compiles)."""

    def forward(self, x):
        raise AssertionError("the wrapped model ran")


def test_compiled_model_is_refused_before_any_forward():
    compiled = torch.compile(_Tripwire())
    compiled.forward = _Tripwire().forward  # not even dynamo may run: it compiles every hooked call (#21)
    for entry_point in (tokenprune.sparsify, tokenprune.plan):
        with pytest.raises(UnsupportedModelError, match=r"_Tripwire: .*OptimizedModule.*model\._orig_mod"):
            entry_point(compiled, example_inputs=torch.randn(2, 3, 64, 64))


def test_compiled_submodule_is_refused_naming_it():
    model = _model("deit").eval()
    model.blocks[1] = torch.compile(model.blocks[1])
    with pytest.raises(UnsupportedModelError, match=r"model\.blocks\.1 is wrapped in OptimizedModule.*_orig_mod"):
        tokenprune.sparsify(model)


def test_data_parallel_is_refused_naming_the_model():
    wrapped = nn.DataParallel(_model("deit").eval())
    with pytest.raises(UnsupportedModelError, match=r"deit_tiny_patch16_224: .*DataParallel.*model\.module"):
        tokenprune.sparsify(wrapped)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated; users still have such models
def test_torchscript_model_is_refused_with_what_to_pass():
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    with pytest.raises(UnsupportedModelError, match="TorchScript module.*Sparsify the Python model") as refused:
        tokenprune.sparsify(scripted, example_inputs=torch.randn(1, 3, 16, 16))
    assert "please report" not in str(refused.value)


@pytest.mark.parametrize("kind", ["deit", "convnext"])
def test_sparsify_under_inference_mode_returns_a_trainable_model(kind):
    """An evaluation script under `torch.inference_mode()` may sparsify too: the copy and the predictors must still be
    ordinary tensors, or the model could never be fine-tuned ("Inference tensors cannot be saved for backward")."""
    model = _model(kind)
    with torch.inference_mode():
        x = torch.randn(2, 3, 64, 64)  # an inference tensor as the example input too
        sparse = tokenprune.sparsify(model, 0.7, example_inputs=x)
    assert not any(p.is_inference() for p in sparse.parameters())
    sparse.train()(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for n, p in sparse.named_parameters() if "tokenprune_stage" in n)


def test_a_model_made_under_inference_mode_sparsifies_for_evaluation():
    """Its tensors are inference tensors, which only inference mode may touch (the analysis, the self-check's unit
    weights written into it and restored): the result is like the model, for evaluation, inside the mode or out."""
    with torch.inference_mode():
        model = _model("deit").eval()
    for inplace in (False, True):
        sparse = tokenprune.sparsify(model, 0.7, example_inputs=torch.randn(2, 3, 64, 64), inplace=inplace)
        with torch.inference_mode():
            assert sparse.eval()(torch.randn(2, 3, 64, 64)).shape[0] == 2


def test_not_a_module_is_refused_with_a_reason():
    for entry_point in (tokenprune.sparsify, tokenprune.plan):
        with pytest.raises(UnsupportedModelError, match="expects a torch.nn.Module, got str"):
            entry_point("deit_tiny_patch16_224")


def test_tracing_keeps_every_flag():
    """The pass traces each block in eval and in train mode; every submodule gets its own flag back."""
    from tokenprune.fx.tracing import trace

    model = _model("deit")
    before = _flags(model)
    trace(model.blocks[0])
    trace(model)
    assert _flags(model) == before
