"""Finding the chain of blocks to sparsify, and the prefix tokens. The one place that decides what a chain is.

A *chain* is the longest run of calls to modules of one type, each mapping a tensor to one of the same shape, where
each call's output is the next call's input; runs of composite modules (blocks) win over runs of single layers. In a
ViT that is the transformer blocks ([B, N, C] -> [B, N, C]); in ConvNeXt or Swin, the blocks of the longest stage
([B, C, H, W] or [B, H, W, C], told apart by which dims are the image's grid). The rule is structural: no class names,
no attribute names.
"""

from __future__ import annotations

import itertools
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from ..errors import UnsupportedModelError

__all__ = ["SHAPE_ONLY", "Call", "Chain", "find_chain", "prefix_token_count", "depends_on"]


@dataclass
class Call:
    """One recorded module call whose first input and output are tensors of the same shape."""

    name: str
    module: nn.Module
    args: tuple
    kwargs: dict
    output: torch.Tensor
    order: int  # when the call started: outer modules start before the modules inside them


@dataclass
class Chain:
    """The blocks to sparsify, in order, with the example shape flowing through them."""

    calls: list[Call]
    layout: str  # "BNC" for token chains, "BCHW", "BHWC" or "BLC" (locations of `grid`, row-major) for spatial ones
    kind: str = field(init=False)
    reference: object = None  # the model's output on the example, before any change (for the self-check)
    grid: tuple[int, int] | None = None  # (H, W) of a "BLC" chain's locations

    def __post_init__(self) -> None:
        self.kind = "token" if self.layout == "BNC" else "spatial"

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.calls]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.calls[0].output.shape)

    @property
    def channel(self) -> int:
        """The channel dim of the chain's tensors."""
        return {"BCHW": 1, "BHWC": 3}.get(self.layout, 2)

    def as_locations(self, image: tuple[int, int]) -> Chain | None:
        """This token chain as a spatial chain over its tokens ("BLC"), when they are exactly the locations of the
        image's grid at one stride, row-major (no class token); else None."""
        if self.layout != "BNC":
            return None
        (height, width), n = image, self.shape[1]
        for s in range(1, max(image) + 1):
            for h, w in itertools.product((height // s, -(-height // s)), (width // s, -(-width // s))):
                if h * w == n:
                    return Chain(self.calls, "BLC", self.reference, (h, w))
        return None


@dataclass
class _Seen:
    """One module call seen in the first forward: where it sits and which tensors it links, not the tensors."""

    name: str
    module: nn.Module
    input: int  # key of its first input tensor (`_Keys`)
    output: int  # key of its output tensor
    order: int  # when the call started: outer modules start before the modules inside them
    nth: int  # which call of this module it is (a module may run several times)
    call: Call | None = None  # the call with its tensors, while they fit in KEEP_BYTES


#: Bytes of call outputs the first forward may keep so that the chain's calls need no second forward. Beyond it every
#: kept tensor is let go and a second forward records only the chain's calls (`_replay`): MobileNetV5 at 768² would
#: otherwise hold 13 GB of outputs at once (a plain forward peaks at 2.7 GB).
KEEP_BYTES = 1 << 30


class _Keys:
    """One number per tensor object, without keeping the tensor alive: a freed tensor's id may be reused, so an id
    counts as the same tensor only while a weak reference to it still returns that object."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[weakref.ref, int]] = {}
        self._next = itertools.count()

    def __call__(self, t: torch.Tensor) -> int:
        entry = self._seen.get(id(t))
        if entry is None or entry[0]() is not t:
            entry = self._seen[id(t)] = (weakref.ref(t), next(self._next))
        return entry[1]


def _same_shape_calls(model: nn.Module, example: torch.Tensor) -> tuple[list[_Seen], object]:
    """Every module call whose first input and output are tensors of one shape (3 or 4 dims), in call order, and the
    model's output; each with its tensors (`_Seen.call`) unless their outputs together outgrow `KEEP_BYTES`."""
    seen: list[_Seen] = []
    started: dict[int, tuple[int, int]] = {}
    counter, keys, runs = itertools.count(), _Keys(), {}
    held = 0  # bytes of the outputs kept
    keeping = True  # until they outgrow KEEP_BYTES

    def pre_hook(module, args):
        runs[id(module)] = runs.get(id(module), -1) + 1
        started[id(module)] = (next(counter), runs[id(module)])

    def hook(name):
        def fn(module, args, kwargs, output):
            nonlocal held, keeping
            x = args[0] if args else None
            if (
                isinstance(x, torch.Tensor)
                and isinstance(output, torch.Tensor)
                and output is not x  # identities (Dropout in eval, nn.Identity) are not blocks
                and output.shape == x.shape
                and output.dim() in (3, 4)
            ):
                order, nth = started[id(module)]
                seen.append(_Seen(name, module, keys(x), keys(output), order, nth))
                if keeping:
                    seen[-1].call = Call(name, module, args, kwargs, output, order)
                    held += output.nbytes
                    if held > KEEP_BYTES:
                        keeping = False
                        for c in seen:
                            c.call = None

        return fn

    with _hooked(model, pre_hook, hook), torch.no_grad():
        output = model(example)
    return sorted(seen, key=lambda c: c.order), output


def _replay(model: nn.Module, example: torch.Tensor, run: list[_Seen], name: str) -> list[Call]:
    """The calls of `run` with their arguments and outputs, from a second forward that keeps only those.

    Raises:
        UnsupportedModelError: the second forward did not make those calls (a forward that changes between runs).
    """
    wanted = {(id(c.module), c.nth): c for c in run}
    calls: dict[int, Call] = {}
    runs: dict[int, int] = {}
    modules = {id(c.module) for c in run}

    def pre_hook(module, args):
        runs[id(module)] = runs.get(id(module), -1) + 1

    def hook(name):
        def fn(module, args, kwargs, output):
            c = wanted.get((id(module), runs[id(module)]))
            if c is not None:
                calls[id(c)] = Call(c.name, module, args, kwargs, output, c.order)

        return fn

    with _hooked(model, pre_hook, hook, lambda m: id(m) in modules), torch.no_grad():
        model(example)
    if len(calls) < len(run):
        missing = next(c.name for c in run if id(c) not in calls)
        raise UnsupportedModelError(
            f"{name}: run twice on the same example in eval mode, its forward called {missing} the first time but "
            "not the second; the analysis needs a forward that does the same every time. Make the model "
            "deterministic in eval mode (or pass a smaller example_inputs, which needs no second run)."
        )
    return [calls[id(c)] for c in run]


@contextmanager
def _hooked(model: nn.Module, pre_hook, hook, where=lambda m: True):
    handles = []
    for name, module in model.named_modules():
        if name and where(module):
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(hook(name), with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _downsampled(size: tuple[int, int], image: tuple[int, int]) -> bool:
    """Whether a (h, w) grid is the image's (H, W) divided by one stride s (rounded either way, as convolutions and
    padded patch embeddings round)."""
    (h, w), (height, width) = size, image
    return any(
        h in (height // s, -(-height // s)) and w in (width // s, -(-width // s)) for s in range(1, max(image) + 1)
    )


def _layout(call: Call, image: tuple[int, int]) -> str:
    """ "BNC" for tokens; for a map, the layout whose spatial dims are the image's grid at one stride.

    A map [B, a, b, c] is [B, C, H, W] when (b, c) is the image grid at some stride and [B, H, W, C] when (a, b) is;
    when both fit (a square image whose map has as many channels as rows), the block's first layer with a feature
    count (LayerNorm, Linear, convolution) names the channel dim: the dim of the block's input that this layer reads
    as features, found by running the block (`_channel_dim`), or failing that (the layer reads something computed
    from the input) its feature count.
    """
    shape = tuple(call.output.shape)
    if len(shape) == 3:
        return "BNC"
    last, first = _downsampled(shape[1:3], image), _downsampled(shape[2:4], image)
    if last != first:
        return "BHWC" if last else "BCHW"
    if (dim := _channel_dim(call)) in (1, 3):
        return "BCHW" if dim == 1 else "BHWC"
    channels = next((c for m in call.module.modules() if (c := _features(m)) is not None), None)
    return "BHWC" if channels == shape[3] and channels != shape[1] else "BCHW"


def _channel_dim(call: Call) -> int | None:
    """The dim of the block's input that the first layer with a feature count to run reads as its features, when that
    layer reads the input itself or a permutation of it (a channels-last block's LayerNorm reads its last dim; a
    channels-first block may permute to channels-last first); None otherwise. Runs the block once, in eval mode."""
    x = call.args[0] if call.args else None
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return None
    first: list[tuple[nn.Module, torch.Tensor]] = []

    def record(module, args):
        if not first and args and isinstance(args[0], torch.Tensor):
            first.append((module, args[0]))

    handles = [m.register_forward_pre_hook(record) for m in call.module.modules() if _features(m) is not None]
    try:
        with torch.no_grad():
            call.module(*call.args, **call.kwargs)
    finally:
        for h in handles:
            h.remove()
    if not first:
        return None
    layer, seen = first[0]
    features = 1 if isinstance(layer, nn.modules.conv._ConvNd) else seen.dim() - 1
    for order in itertools.permutations(range(1, 4)):
        moved = x.permute(0, *order)
        if seen.shape == moved.shape and torch.equal(seen, moved):
            return order[features - 1]
    return None


def _features(module: nn.Module) -> int | None:
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1])
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels
    return None


def find_chain(model: nn.Module, example: torch.Tensor, name: str = "the model") -> Chain | None:
    """Run `model` on `example` and return its longest chain of same-type blocks (None if shorter than 2), found from
    the calls' shapes and links; a second forward records the chain's own calls where the first could not keep them
    (`KEEP_BYTES`)."""
    seen, output = _same_shape_calls(model, example)
    by_input: dict[int, list[_Seen]] = {}
    for c in seen:
        by_input.setdefault(c.input, []).append(c)

    def successor(c: _Seen) -> _Seen | None:
        # The outermost same-type call that consumes c's output (a block's first sub-module consumes it too).
        nxt = [d for d in by_input.get(c.output, []) if not d.name.startswith(c.name + ".")]
        nxt = [d for d in nxt if type(d.module) is type(c.module)]
        return min(nxt, key=lambda d: d.order) if nxt else None

    best: list[_Seen] = []
    heads = {id(c) for c in seen} - {id(s) for c in seen if (s := successor(c)) is not None}
    for c in seen:
        if id(c) not in heads:
            continue
        run = [c]
        while (s := successor(run[-1])) is not None:
            run.append(s)
        if _rank(run) > _rank(best):
            best = run
    if len(best) < 2:
        return None
    calls = [c.call for c in best] if all(c.call is not None for c in best) else _replay(model, example, best, name)
    return Chain(calls, _layout(calls[0], tuple(example.shape[-2:])), output)


def _rank(run: list[_Seen]) -> tuple[bool, int]:
    # reason: blocks are composite (modules with submodules); a run of single layers is not a chain of blocks, even
    # when it is as long (Swin with depths (1, 1, 2, 1): patch_embed.norm -> layers.0.blocks.0.norm1 is a run of 2).
    return (bool(run) and next(run[0].module.children(), None) is not None, len(run))


# reason: torch.concat and torch.concatenate are aliases of torch.cat that models use too.
_CATS = {torch.cat, getattr(torch, "concat", torch.cat), getattr(torch, "concatenate", torch.cat)}
SHAPE_ONLY = {("call_function", getattr), ("call_method", "size"), ("call_method", "dim")}


def depends_on(node: fx.node.Argument, roots: set[fx.Node]) -> bool:
    """Whether the *value* of `node` (a node, or an argument structure holding nodes such as a tuple (H, W)) depends
    on any of `roots` (reading only a shape does not count)."""
    seen: set[fx.Node] = set()
    stack: list[fx.Node] = []
    fx.node.map_arg(node, stack.append)
    while stack:
        n = stack.pop()
        if n in roots:
            return True
        if n in seen or (n.op, n.target) in SHAPE_ONLY:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def prefix_token_count(chain_input: fx.Node, image: fx.Node) -> int | None:
    """Count the leading tokens that do not come from the image (class, distillation, register tokens).

    They enter as operands of a concatenation along the token dimension that precede the image-derived operand.
    Returns None when image-independent tokens follow the image tokens (a layout the selectors do not handle).
    """
    seen: set[fx.Node] = set()
    stack = [chain_input]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target in _CATS:
            tensors = n.args[0] if n.args else n.kwargs["tensors"]
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
            rank = len(n.meta["tensor_meta"].shape)
            if dim % rank == 1 and depends_on(n, {image}):
                image_parts = [depends_on(t, {image}) for t in tensors]
                first = image_parts.index(True)
                if not all(image_parts[first:]):
                    return None
                return sum(t.meta["tensor_meta"].shape[1] for t in tensors[:first])
        stack.extend(a for a in n.all_input_nodes if (a.op, a.target) not in SHAPE_ONLY)
    return 0
