"""What tokenprune needs from its dependencies is checked, not assumed."""

from __future__ import annotations

import sys

import pytest

from tokenprune.errors import UnsupportedModelError
from tokenprune.fx import tracing


def test_a_missing_timm_fx_registry_is_a_clear_error(monkeypatch):
    import timm.layers

    # as with a timm older than the floor: the submodule cannot be imported
    monkeypatch.setitem(sys.modules, "timm.layers._fx", None)
    monkeypatch.delattr(timm.layers, "_fx", raising=False)
    with pytest.raises(UnsupportedModelError, match=r"timm>=1\.0\.26"):
        tracing._timm_registry()


def test_the_installed_timm_has_the_registry():
    modules, functions = tracing._timm_registry()
    assert modules and functions
