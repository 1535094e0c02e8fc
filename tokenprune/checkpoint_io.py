"""Deprecated: moved to `tokenprune.io` (model files in `tokenprune.io.model_file`, weight files in
`tokenprune.io.weights`). This module re-exports them and warns."""

import warnings

from .io import FORMAT, FORMAT_VERSION, load, load_original, load_weights, read_metadata, read_weights, save

__all__ = ["FORMAT", "FORMAT_VERSION", "save", "load", "load_original", "read_metadata", "read_weights", "load_weights"]

warnings.warn(
    "tokenprune.checkpoint_io is deprecated; import from tokenprune (save, load, load_original, read_weights, "
    "load_weights) or tokenprune.io.",
    DeprecationWarning,
    stacklevel=2,
)
