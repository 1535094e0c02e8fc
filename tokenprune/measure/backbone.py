"""Which submodule of a model is its backbone, so that FLOPs can be shown for backbone and head separately.

The rule (docs/design.md §5.5), structural and the same for dense and sparsified models: the backbone is the
outermost proper submodule that contains every block of the sparsified chain *and* is called on the image itself.
Everything else the model computes — an FPN, a segmentation or detection head, upsampling — is the head, and the
inserted predictors count with the backbone (they are part of sparsifying it). When no such submodule exists (a
timm classifier or ``features_only`` model, whose stem and stages are siblings), the whole model is the backbone
and there is no split.

"Called on the image" is read from the FX graph's module stacks for a `torch.fx.GraphModule` (a sparsified model
inlines the modules it traced through, so they are never called as modules), and from forward pre-hooks otherwise.

A model whose own forward cannot be traced (a torchvision detector: its transform resizes and normalises the images
and batches them anew) calls its backbone on the image batch it made, not on the input: there the backbone is the
outermost such submodule called on an image batch of the input's form (4-D, floating, the input's batch size and
channels), which is the part `tokenprune.sparsify` rewrites in such a model. A traceable wrapper that normalises
its input before the backbone still gets no split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

__all__ = ["Backbone", "locate_backbone", "find_backbone", "detector_workload", "eval_forward", "image_batch_inputs"]


def _ancestors(chain: Sequence[str]) -> list[str]:
    """Proper, non-root modules containing every chain block, outermost first."""
    parts = [name.split(".") for name in chain]
    common: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    # a single-block chain's common prefix is the block itself; a backbone must contain the blocks, not be one
    if len(chain) == 1:
        common = common[:-1]
    return [".".join(common[: i + 1]) for i in range(len(common))]


def _called_on_image_graph(model: fx.GraphModule, candidates: list[str]) -> set[str]:
    images = [n for n in model.graph.nodes if n.op == "placeholder"][:1]
    found: set[str] = set()
    for node in images[0].users if images else ():
        scopes = set((node.meta.get("nn_module_stack") or {}).keys())
        if node.op == "call_module":
            scopes.add(str(node.target))
        found |= scopes & set(candidates)
    return found


def _called_on_image_hooks(model: nn.Module, candidates: list[str], inputs: torch.Tensor) -> set[str]:
    found: set[str] = set()
    handles = []
    for name in candidates:
        module = model.get_submodule(name)

        def hook(_m, args, kwargs=None, name=name):
            if args and args[0] is inputs:
                found.add(name)

        handles.append(module.register_forward_pre_hook(hook))
    eval_forward(model, inputs, handles)
    return found


def eval_forward(model: nn.Module, inputs: torch.Tensor, handles: list) -> None:
    """One eval-mode forward without gradients for what the `handles`' hooks record; then the hooks are removed and
    every module's training flag is restored."""
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in training.items():
            module.training = mode


def image_batch_inputs(
    model: nn.Module, inputs: torch.Tensor, candidates: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """The submodules called on an image batch of `inputs`' form in one eval forward (first argument a 4-D floating
    tensor with the input's batch size and channels, as a detector's transform makes it), outermost first, each with
    that argument of its first call. The one reading of "called on the images" for models whose forward does not
    trace, shared by `tokenprune.sparsify` (where to rewrite) and `find_backbone` (where to split the FLOPs).

    Args:
        model: the model.
        inputs: an image batch [B, C, H, W] it runs on.
        candidates: qualified names to watch; default every proper submodule.
    """
    names = [n for n, _ in model.named_modules() if n] if candidates is None else list(candidates)
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:

        def hook(_m, args, name=name):
            x = args[0] if args else None
            if (
                isinstance(x, torch.Tensor)
                and x.is_floating_point()
                and x.dim() == 4
                and x.shape[:2] == inputs.shape[:2]
            ):
                seen.setdefault(name, x.detach().clone())

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    eval_forward(model, inputs, handles)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}  # pre-order: a parent before its children
    return dict(sorted(seen.items(), key=lambda item: order[item[0]]))


def _traces(model: nn.Module, chain: Sequence[str]) -> bool:
    """Whether tokenprune's tracer traces `model` with the chain's blocks as leaves (as the graph pass does)."""
    from ..errors import UnsupportedModelError
    from ..fx.tracing import released_fx_wraps, trace

    try:
        with released_fx_wraps():  # a graph thrown away: torch.fx's table as it was
            trace(model, leaves=[model.get_submodule(name) for name in chain])
    except UnsupportedModelError:
        return False
    return True


@dataclass(frozen=True)
class Backbone:
    """Where a model's backbone is and what it is called on.

    Attributes:
        name: the backbone's qualified module name.
        batch: the image batch the model made itself and called the backbone on (a detector's transform resizes
            and batches the images anew), or None when the backbone is called on the model's input. A model that
            makes its own batch cannot be traced (or exported) whole; its backbone is timed and exported on that
            batch's shape.
    """

    name: str
    batch: torch.Tensor | None = None


def locate_backbone(model: nn.Module, chain: Sequence[str], inputs: torch.Tensor) -> Backbone | None:
    """The backbone of `model` by the rule in this module's docstring, or None (no split).

    Args:
        model: a dense model or its sparsified version (the chain's blocks keep their names in both).
        chain: qualified names of the chain's blocks (`SparsifyConfig.chain`).
        inputs: an image batch the model runs on (one forward for a model that is not a GraphModule).
    """
    names = {name for name, _ in model.named_modules()}
    candidates = [c for c in _ancestors(list(chain)) if c in names] if chain else []
    if not candidates:
        return None
    if isinstance(model, fx.GraphModule):
        called = _called_on_image_graph(model, candidates)
    else:
        called = _called_on_image_hooks(model, candidates, inputs)
    found = next((c for c in candidates if c in called), None)
    if found is not None:
        return Backbone(found)
    if not isinstance(model, fx.GraphModule) and inputs.dim() == 4 and not _traces(model, chain):
        batches = image_batch_inputs(model, inputs, candidates)
        found = next((c for c in candidates if c in batches), None)
        if found is not None:
            return Backbone(found, batches[found])
    return None


def find_backbone(model: nn.Module, chain: Sequence[str], inputs: torch.Tensor) -> str | None:
    """The qualified name of `model`'s backbone (`locate_backbone`), or None (no split)."""
    found = locate_backbone(model, chain, inputs)
    return found.name if found is not None else None


def detector_workload(model: nn.Module, inputs: torch.Tensor) -> dict[str, Any] | None:
    """What a torchvision detector's head cost depends on, read in one eval forward on `inputs`; None for a model
    that is not one.

    A one-stage detector (FCOS, RetinaNet) runs its head on every location of every pyramid level, so its head cost
    depends only on the size its transform resizes to (``min_size``/``max_size``); a two-stage detector (Faster
    R-CNN) also runs its box head on every proposal the RPN kept, a number that depends on the image and the
    weights. Read through torchvision's detection API: the ``transform`` (``min_size``, ``max_size``), the RPN's
    post-NMS limit, ``roi_heads`` (called with the proposals) and the per-image detection limit.

    Returns:
        ``{"min_size", "max_size", "proposal_limit" (None for one-stage), "detection_limit", "proposals" (per image
        in this forward; None for one-stage), "detections" (per image in this forward)}``.
    """
    transform = getattr(model, "transform", None)
    if transform is None or not hasattr(transform, "min_size") or not hasattr(transform, "max_size"):
        return None
    rpn, roi_heads = getattr(model, "rpn", None), getattr(model, "roi_heads", None)
    proposals: list[int] = []
    handles = []
    if roi_heads is not None:
        # reason: torchvision's RoIHeads.forward(features, proposals, image_shapes, targets): one tensor per image.
        handles.append(roi_heads.register_forward_pre_hook(lambda _m, args: proposals.extend(len(p) for p in args[1])))
    outputs: list[Any] = []
    handles.append(model.register_forward_hook(lambda _m, _i, out: outputs.append(out)))
    eval_forward(model, inputs, handles)
    detections = [len(d["boxes"]) for d in outputs[0]] if outputs and isinstance(outputs[0], list) else []
    limit = getattr(roi_heads, "detections_per_img", None) or getattr(model, "detections_per_img", None)
    # reason: eval resizes to the last of the transform's min sizes (training picks one at random).
    min_size = transform.min_size
    # reason: the RPN's public post_nms_top_n() answers for its current mode; the report states the eval limit.
    proposal_limit = (getattr(rpn, "_post_nms_top_n", None) or {}).get("testing") if rpn is not None else None
    return {
        "min_size": int(min_size[-1] if isinstance(min_size, (tuple, list)) else min_size),
        "max_size": int(transform.max_size),
        "proposal_limit": None if proposal_limit is None else int(proposal_limit),
        "detection_limit": None if limit is None else int(limit),
        "proposals": sum(proposals) / len(proposals) if proposals else None,
        "detections": sum(detections) / len(detections) if detections else None,
    }
