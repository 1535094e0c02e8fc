"""Functions that stay one call when a rewritten model is traced again (docs/design.md §2.2).

The graph pass inserts calls of tokenprune's functions (`refill`, `gather_locations`, the masked softmaxes...) into a
traced graph. Something may trace that graph again: unpickling a `torch.fx.GraphModule` re-traces its code, and so
does any user's `symbolic_trace` of a sparsified model. A plain function would then be traced *through*, its body
inlined op by op. torch.fx's own remedy, a node marked ``is_wrapped``, makes every compiled graph register its code's
globals with ``torch.fx.wrap`` in a process-wide table that is never emptied; every later trace patches every entry in
it, so each `sparsify` made the next trace slower (a test process that had sparsified a few hundred models traced 5x
slower). A function decorated with `one_call` records itself as one call when any argument is an `fx.Proxy`, for
any tracer, and registers nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

from torch.fx import Proxy

__all__ = ["one_call", "is_one_call"]

F = TypeVar("F", bound=Callable)


def _proxy_in(values) -> Proxy | None:
    """The first `Proxy` among `values`, looking into lists, tuples and dicts (a concatenation's parts). Cheap: it
    runs on every call of an inserted function, in the eval forward too."""
    for value in values:
        if isinstance(value, Proxy):
            return value
        if isinstance(value, (list, tuple, dict)):
            found = _proxy_in(value.values() if isinstance(value, dict) else value)
            if found is not None:
                return found
    return None


def one_call(fn: F) -> F:
    """`fn`, recorded by a torch.fx trace as one ``call_function`` of itself instead of being traced through."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        proxy = _proxy_in(args)
        if proxy is None and kwargs:  # reason: not `or`: a Proxy's __bool__ raises
            proxy = _proxy_in(kwargs.values())
        if proxy is None:
            return fn(*args, **kwargs)
        return proxy.tracer.create_proxy("call_function", call, args, kwargs)

    call.__one_call__ = True
    return call  # type: ignore[return-value]


def is_one_call(fn: Callable) -> bool:
    return getattr(fn, "__one_call__", False)
