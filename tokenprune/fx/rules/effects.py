"""What a rule says about one node: the values it tracks and the structured effects it returns.

A token rule returns an `Effect` (what its output carries, and the edit that keeps it exact), or raises `Refused`
with a reason; the walker turns that into a `Refusal` naming the node. Nothing here parses a message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx

__all__ = ["TokenSet", "Tokens", "Policy", "Index", "Rewrite", "Gather", "Mask", "Effect", "Refused", "Refusal"]


@dataclass(eq=False)
class TokenSet:
    """A set of tokens: the chain's, or one derived by slicing or concatenating the token axis.

    Attributes:
        size: its length at trace time (no token pruned).
        prefix: leading positions that are never pruned.
        origin: ("root",), ("slice", parent, start, stop) or ("cat", node, ((set or None, count), ...)).
    """

    size: int
    prefix: int
    origin: tuple

    def describe(self) -> str:
        return self.origin[0] if self.origin[0] != "slice" else f"slice [{self.origin[2]}:{self.origin[3]}]"


@dataclass(frozen=True)
class Tokens:
    """What a value carries: `axes` (its dims that index `tset`), and whether its last dim holds attention weights
    over kept keys only (a masked softmax's output), which may then be contracted with token values."""

    axes: tuple[int, ...]
    tset: TokenSet
    weights: bool = False


@dataclass(frozen=True)
class Policy:
    """Stands, in a rewrite's arguments, for the run-time keep policy of `tset`."""

    tset: TokenSet


@dataclass(frozen=True)
class Index:
    """Stands, in a rewrite's arguments, for the run-time token positions of `tset`."""

    tset: TokenSet


@dataclass(frozen=True)
class Rewrite:
    """A recognised token mixer: replace the node by `fn(*args, **kwargs)` (`Policy`/`Index` resolved at apply)."""

    fn: Callable
    args: tuple
    kwargs: dict
    note: str
    #: "sdpa", "softmax" or "mha" for self-attention over the tokens (what the attention scorer reads), else None.
    attention: str | None = None


@dataclass(frozen=True)
class Gather:
    """A position-indexed constant meeting tokens: `value` is gathered at `tset`'s positions along `dims`."""

    value: fx.Node
    tset: TokenSet
    dims: tuple[int, ...]
    rank: int


@dataclass(frozen=True)
class Mask:
    """A contraction over tokens: the dropped tokens of `value` (along `dim`) are zeroed before the node."""

    value: fx.Node
    tset: TokenSet
    dim: int


@dataclass(frozen=True)
class Effect:
    """What one node does to the tokens.

    Attributes:
        out: what its output carries: `Tokens` (token-wise: axes carried; or a derived token set), None (no tokens
            left, e.g. after a mean over them), or a tuple of those for an op with several outputs.
        rewrite: the masked version of a recognised mixer, if it is one.
        gathers: position-indexed constants it combines with tokens.
        masks: operands whose dropped tokens it must not sum.
    """

    out: object = None
    rewrite: Rewrite | None = None
    gathers: tuple[Gather, ...] = ()
    masks: tuple[Mask, ...] = ()


class Refused(Exception):
    """Raised by a rule (or a helper it calls) that cannot keep its node exact; carries the reason only."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Refusal:
    """Why the analysis stopped: the node, its op, and the reason (structured, so callers decide on fields).

    Attributes:
        node: the node's name in the traced graph.
        op: how the node is called, e.g. "call_method 'softmax'".
        reason: what it does that no rule keeps exact.
        no_rule: True when the op has no rule at all (rather than a rule that refused these arguments).
    """

    node: str
    op: str
    reason: str
    no_rule: bool = False

    def __str__(self) -> str:
        return f"{self.op} ({self.node}) {self.reason}"
