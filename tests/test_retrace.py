"""A rewritten model traced again keeps tokenprune's inserted functions as single calls, and sparsifying leaves
nothing behind in torch.fx's process-wide tables (docs/design.md §2.2, `nn/leaf.py`).

Unpickling a `torch.fx.GraphModule` re-traces its code. The inserted functions (`refill`, `gather_locations`, the
masked softmaxes...) must come back as one call each, not inlined op by op. torch.fx's own way of getting that, an
``is_wrapped`` node, registered every compiled graph's globals in a table every later trace walks: a process slowed
down with each `sparsify` (`python examples/bench_repeated_sparsify.py --rounds 100`: 0.79 s -> 4.20 s a round
before the fix, docs/results.md).
"""

from __future__ import annotations

import gc
import pickle
from collections import Counter

import pytest
import timm
import torch
import torch.fx as fx
import torch.fx._symbolic_trace as symbolic_trace
import torchvision

import tokenprune
from tokenprune.measure.backbone import find_backbone
from tokenprune.nn import tokenops
from tokenprune.nn.leaf import is_one_call, one_call

# name -> (constructor, input side, a tokenprune function its rewritten graphs must call)
MODELS = {
    "deit_tiny": (lambda: timm.create_model("deit_tiny_patch16_224", img_size=32, depth=4), 32, "masked_sdpa"),
    "cait_xxs24": (  # class attention: keys are tokens, queries are not
        lambda: timm.create_model("cait_xxs24_224", img_size=32, depth=4),
        32,
        "masked_cross_attention",
    ),
    "eva02_tiny": (  # rotary embedding gathered with the kept tokens
        lambda: timm.create_model("eva02_tiny_patch14_224", img_size=56, depth=4),
        56,
        "gather_positions",
    ),
    "vit_features": (  # a dense head: every token refilled
        lambda: timm.create_model("vit_tiny_patch16_224", img_size=64, features_only=True, out_indices=(1, 3, 5)),
        64,
        "refill",
    ),
    "convnextv2_atto": (  # spatial; GRN sums the kept locations
        lambda: timm.create_model("convnextv2_atto"),
        64,
        "mask_locations",
    ),
    "swin_tiny": (  # spatial, and its own code calls a torch.fx-wrapped function (window_reverse)
        lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=64, depths=(1, 1, 3, 1)),
        64,
        "gather_locations",
    ),
    "tv_swin_t": (  # torchvision's wrapped relative position bias and shifted window attention
        lambda: torchvision.models.swin_t(),
        64,
        "gather_locations",
    ),
}
#: Models whose own code calls `torch.fx.wrap`-ed functions: torch.fx registers each compiled graph holding such a
#: call, a copy made by unpickling included.
LIBRARY_WRAPS = {"swin_tiny", "tv_swin_t"}


def _inserted(model: torch.nn.Module) -> list:
    """tokenprune's functions called in the model's graphs, once per call."""
    return [
        node.target
        for gm in model.modules()
        if isinstance(gm, fx.GraphModule)
        for node in gm.graph.nodes
        if node.op == "call_function" and getattr(node.target, "__module__", "").startswith("tokenprune.")
    ]


def _inserted_calls(model: torch.nn.Module) -> Counter:
    """How often each of tokenprune's functions is called in the model's graphs."""
    return Counter(fn.__name__ for fn in _inserted(model))


def _sparse(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    make, side, _ = MODELS[name]
    torch.manual_seed(0)
    x = torch.randn(2, 3, side, side)
    return tokenprune.sparsify(make().eval(), 0.7, example_inputs=x[:1]).eval(), x


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(x)
    return list(out) if isinstance(out, (list, tuple)) else [out]


@pytest.mark.parametrize("name", MODELS)
def test_unpickled_model_calls_the_inserted_functions_once_each(name):
    sparse, x = _sparse(name)
    calls = _inserted_calls(sparse)
    assert calls[MODELS[name][2]] > 0, calls
    assert [fn.__name__ for fn in _inserted(sparse) if not is_one_call(fn)] == []
    clone = pickle.loads(pickle.dumps(sparse)).eval()  # re-traces every GraphModule's code
    assert _inserted_calls(clone) == calls
    for execution in ("pruned", "masked"):
        tokenprune.set_execution(sparse, execution)
        tokenprune.set_execution(clone, execution)
        for a, b in zip(_outputs(clone, x), _outputs(sparse, x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def plain_refill(canvas, x, policy, index):
    """`refill` without `one_call`, as a function pickling can find by name."""
    return tokenops.refill.__wrapped__(canvas, x, policy, index)


def test_a_plain_function_would_be_inlined():
    """The check above can fail: with `refill` inserted as a plain function, unpickling inlines its body."""
    sparse, _ = _sparse("vit_features")
    for gm in (m for m in sparse.modules() if isinstance(m, fx.GraphModule)):
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is tokenops.refill:
                node.target = plain_refill
        gm.recompile()
    assert _calls_of("plain_refill", sparse) > 0
    assert _calls_of("plain_refill", pickle.loads(pickle.dumps(sparse))) == 0


def _calls_of(name: str, model: torch.nn.Module) -> int:
    graphs = [m.graph for m in model.modules() if isinstance(m, fx.GraphModule)]
    return sum(getattr(n.target, "__name__", None) == name for g in graphs for n in g.nodes if n.op == "call_function")


def test_one_call_finds_a_proxy_inside_a_list():
    """`cat_index` takes its parts as a list of tuples: a proxy anywhere in the arguments makes it one call."""
    joined = one_call(lambda parts: torch.cat([p for p, _ in parts], dim=1))

    class Joiner(torch.nn.Module):
        def forward(self, a, b):
            return joined([(a, 1), (b, 2)])

    gm = fx.symbolic_trace(Joiner())
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls] == [joined]
    a, b = torch.randn(2, 3), torch.randn(2, 4)
    torch.testing.assert_close(gm(a, b), torch.cat([a, b], dim=1))


@pytest.mark.skipif(not hasattr(symbolic_trace, "_wrapped_fns_to_patch"), reason="torch.fx has no wrap table")
@pytest.mark.parametrize("name", MODELS)
def test_torch_fx_wrap_table_is_left_as_it_was(name):
    """`sparsify` adds nothing to torch.fx's table of wrapped functions but for the graphs of the model it returns,
    which go with that model. Unpickling registers nothing for tokenprune's functions (it does for the models' own
    wrapped functions: torch.fx's design). Entries may also go meanwhile: a model an earlier test made, freed."""
    table = symbolic_trace._wrapped_fns_to_patch
    before = set(table)

    def added() -> Counter:
        return Counter(fn for _, fn in set(table) - before)

    sparse, _ = _sparse(name)
    graphs = {id(type(gm).forward.__globals__) for gm in sparse.modules() if isinstance(gm, fx.GraphModule)}
    assert {globals_id for globals_id, _ in set(table) - before} <= graphs  # none for graphs thrown away
    if name not in LIBRARY_WRAPS:
        assert not added()
        pickle.loads(pickle.dumps(sparse))
        assert not added()
    del sparse
    gc.collect()
    assert not added()


@pytest.mark.skipif(not hasattr(symbolic_trace, "_wrapped_fns_to_patch"), reason="torch.fx has no wrap table")
@pytest.mark.parametrize("name", sorted(LIBRARY_WRAPS))
def test_plan_leaves_the_wrap_table_as_it_was(name):
    """`plan` traces the model (the graphs register their wrapped functions) and returns no model: nothing stays."""
    build, size, _ = MODELS[name]
    table = symbolic_trace._wrapped_fns_to_patch
    before = set(table)
    tokenprune.plan(build().eval(), 0.7, example_inputs=torch.randn(1, 3, size, size))
    assert not set(table) - before


@pytest.mark.skipif(not hasattr(symbolic_trace, "_wrapped_fns_to_patch"), reason="torch.fx has no wrap table")
def test_backbone_probe_leaves_the_wrap_table_as_it_was():
    """Locating the backbone of a model that calls it on something other than its input traces the model once (to
    tell a detector that makes its own batch from a traceable wrapper); that graph is thrown away, so is its entry."""
    build, size, _ = MODELS["swin_tiny"]

    class Scaled(torch.nn.Module):  # calls its backbone on a new tensor: the hooks cannot find it, the trace runs
        def __init__(self):
            super().__init__()
            self.backbone = build()

        def forward(self, x):
            return self.backbone(x * 2)

    model = Scaled().eval()
    x = torch.randn(1, 3, size, size)
    chain = tokenprune.config_of(tokenprune.sparsify(model.backbone, 0.7, example_inputs=x)).chain
    table = symbolic_trace._wrapped_fns_to_patch
    before = set(table)
    assert find_backbone(model, [f"backbone.{name}" for name in chain], x) is None  # traceable: no batch of its own
    assert not set(table) - before
