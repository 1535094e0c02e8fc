"""The recipe schema machinery: every key declares its type, allowed values, default and doc in one `key(...)` call.

The same declaration validates a value (`check_value`) and documents the key (`describe`), so the two cannot drift
apart. Types come from the dataclass annotations (``float``, ``int | None``, ``list[float]``, ``dict[str, Any]``,
...); ranges, choices and lengths from the key's `Rule`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from ..errors import ConfigError

__all__ = ["Rule", "key", "rule_of", "check_value", "describe", "safe_yaml", "MAX_RECIPE_BYTES"]

#: A recipe file or override larger than this is refused before it is parsed (real recipes are a few KB).
MAX_RECIPE_BYTES = 1 << 20


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class Rule:
    """What a recipe key allows besides its type.

    Attributes:
        doc: one sentence for the documentation.
        ge, gt, le, lt: bounds of a number (or of every element of a list of numbers).
        choices: the allowed values (strings), or a function returning them (for lists owned elsewhere).
        pattern: a regular expression the whole string must match (when `choices` cannot list them all).
        length: the exact length of a list.
        words: how to say the allowed values in messages, where the pattern would be cryptic.
    """

    doc: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | Callable[[], tuple[Any, ...]] | None = None
    pattern: str | None = None
    length: int | None = None
    words: str | None = None

    def allowed(self) -> str:
        """The allowed values in words, e.g. ``> 0``, ``in (0, 1]``, ``one of 'a', 'b'``."""
        if self.words is not None:
            return self.words
        parts = []
        if self.choices is not None:
            choices = self.choices() if callable(self.choices) else self.choices
            parts.append("one of " + ", ".join(repr(c) for c in choices))
        if self.pattern is not None:
            parts.append("non-empty" if self.pattern == ".+" else f"matching {self.pattern}")
        low = f">= {_num(self.ge)}" if self.ge is not None else f"> {_num(self.gt)}" if self.gt is not None else ""
        high = f"<= {_num(self.le)}" if self.le is not None else f"< {_num(self.lt)}" if self.lt is not None else ""
        if low or high:
            parts.append(" and ".join(p for p in (low, high) if p))
        if self.length is not None:
            parts.append(f"{self.length} values")
        return "; ".join(parts) or "any"


def key(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Callable[[], Any] | None = None, **rule):
    """A dataclass field with its `Rule` (``doc`` and the bounds/choices in `rule`) attached as metadata."""
    meta = {"rule": Rule(doc, **rule)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def rule_of(f: dataclasses.Field) -> Rule:
    return f.metadata.get("rule") or Rule("")


def _scalar(name: str, base: str, value: Any) -> Any:
    """Coerce one value to `base` ("float", "int", "bool", "str"); raise ValueError when it is not one."""
    if base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).lower() in ("true", "false", "1", "0", "yes", "no"):
            return str(value).lower() in ("true", "1", "yes")
        raise ValueError
    if isinstance(value, (bool, list, dict, tuple)) or value is None:
        raise ValueError  # a bool is an int to Python, never a number to a recipe
    if base == "float":
        return float(value)  # YAML reads 1e-3 as a string
    if base == "int":
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, float) and not number.is_integer():
            raise ValueError
        return int(number)
    if base == "str":
        if isinstance(value, float):
            raise ValueError
        return str(value)
    return value


def _in_range(rule: Rule, value: Any) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if isinstance(value, (int, float)):
        if rule.ge is not None and not value >= rule.ge:
            return False
        if rule.gt is not None and not value > rule.gt:
            return False
        if rule.le is not None and not value <= rule.le:
            return False
        if rule.lt is not None and not value < rule.lt:
            return False
    if isinstance(value, str):
        if rule.choices is not None and value not in (rule.choices() if callable(rule.choices) else rule.choices):
            return False
        if rule.pattern is not None and not re.fullmatch(rule.pattern, value):
            return False
    return True


def check_value(name: str, hint: str, rule: Rule, value: Any, source: str) -> Any:
    """Coerce `value` to the type `hint` names and check it against `rule`; return it.

    Args:
        name: the dotted key, for the message.
        hint: the annotation as a string, e.g. ``"float | None"`` or ``"list[int] | None"``.
        rule: the key's rule.
        value: the value from YAML or an override.
        source: where it came from (a file, "overrides"), for the message.

    Raises:
        ConfigError: naming the key, the value, its type and the allowed values.
    """
    parts = [p.strip() for p in hint.split("|")]
    optional = "None" in parts
    base = next((p for p in parts if p != "None"), "Any")
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    if base == "Any":
        if value is None or isinstance(value, (bool, str)):
            return value
        bad = "a string, true/false or null"
    elif base.startswith("dict"):
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return value
        bad = "a mapping with string keys"
    elif base.startswith("list["):
        item = base[5:-1]
        try:
            if not isinstance(value, (list, tuple)):
                raise ValueError
            out = [_scalar(name, item, v) for v in value]
        except (TypeError, ValueError):
            out = None
        if (
            out is not None
            and (rule.length is None or len(out) == rule.length)
            and all(_in_range(rule, v) for v in out)
        ):
            return out
        bad = f"a list of {item} ({rule.allowed()})"
    else:
        try:
            out = _scalar(name, base, value)
        except (TypeError, ValueError, OverflowError):
            out = None
        if out is not None and _in_range(rule, out):
            return out
        bad = f"{base}, {rule.allowed()}" + (", or null" if optional else "")
    raise ConfigError(f"{source}: recipe key '{name}' = {value!r} is not allowed; it must be {bad}.")


def describe(sections: dict[str, type]) -> list[dict[str, str]]:
    """One row per recipe key: ``{"key", "type", "allowed", "default", "doc"}`` (the schema as documentation)."""
    rows = []
    for section, cls in sections.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rule = rule_of(f)
            rows.append(
                {"key": f"{section}.{f.name}", "type": str(f.type), "allowed": rule.allowed(), "default": repr(default),
                 "doc": rule.doc}
            )  # fmt: skip
    return rows


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors/aliases: `*alias` lets a few hundred bytes expand into gigabytes when the value is
    copied or compared (the "billion laughs"), and a recipe never needs one."""

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise ConfigError(
                f"{self.name}: YAML alias *{event.anchor} at line {event.start_mark.line + 1} is refused (aliases can "
                "expand a small file without bound); write the value out in full."
            )
        return super().compose_node(parent, index)


def safe_yaml(text: str, source: str, *, text_if_invalid: bool = False) -> Any:
    """Parse recipe YAML: plain data only, no aliases, at most `MAX_RECIPE_BYTES`.

    Args:
        text: the YAML.
        source: where it came from, for messages.
        text_if_invalid: return `text` itself when it is not valid YAML (override values) instead of raising.

    Raises:
        ConfigError: a larger text, an alias, or invalid YAML, naming `source`.
    """
    if len(text.encode("utf-8", "replace")) > MAX_RECIPE_BYTES:
        raise ConfigError(f"{source} is larger than {MAX_RECIPE_BYTES} bytes; a recipe is a few KB of YAML.")
    loader = None
    try:
        loader = _NoAliasLoader(text)  # reason: its reader already refuses control characters here
        loader.name = source
        return loader.get_single_data()
    except yaml.YAMLError as e:
        if text_if_invalid:
            return text
        raise ConfigError(f"{source} is not valid YAML: {e}") from None
    finally:
        if loader is not None:
            loader.dispose()
