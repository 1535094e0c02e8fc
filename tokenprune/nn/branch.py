"""The check that a traced forward's shape branch is taken at run time as it was when traced (docs/design.md §2.2).

Some blocks branch on their input's shape (TinyViT's attention runs one window when the map is the window's size,
and partitions and pads it otherwise). torch.fx cannot trace a Python branch; tokenprune's tracer takes the branch
the example input took and inserts a call of `same_branch` with the condition, so that an input taking the other
branch stops with an `InputError` rather than run the traced branch and return something else.
"""

from __future__ import annotations

from ..errors import InputError
from .leaf import one_call

__all__ = ["same_branch"]


@one_call
def same_branch(condition: object, taken: bool, where: str, branch: str) -> None:
    """Raise `InputError` unless ``bool(condition)`` is `taken`. `where` names the model and the block (and the
    block's input when traced); `branch`, the line of code that branches."""
    if bool(condition) != taken:
        raise InputError(
            f"{where}: {branch} was {taken} when the model was sparsified and is {not taken} for this input: it "
            "takes the other branch, which the sparsified model does not have. Sparsify the model with inputs of "
            "this size (tokenprune.sparsify(model, example_inputs=...))."
        )
