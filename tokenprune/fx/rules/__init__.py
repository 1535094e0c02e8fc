"""What the graph pass knows about each op, as data: the rule table and the effects its rules return."""

from .effects import Effect, Gather, Index, Mask, Policy, Refusal, Refused, Rewrite, Tokens, TokenSet
from .spatial_rules import Block, Layout
from .table import MODULE_CALL, RULES, Rule, lookup
from .token_rules import Values

__all__ = [
    "RULES", "MODULE_CALL", "Rule", "lookup", "Values", "Block", "Layout", "Effect", "Rewrite", "Gather", "Mask",
    "Refused", "Refusal", "Tokens", "TokenSet", "Policy", "Index",
]  # fmt: skip
