"""The exception hierarchy: every error tokenprune raises on purpose derives from `TokenPruneError`."""

from __future__ import annotations

__all__ = [
    "TokenPruneError",
    "UnsupportedModelError",
    "ConfigError",
    "CheckpointError",
    "DataError",
    "TrainingError",
    "InputError",
]


class TokenPruneError(Exception):
    """Base class of tokenprune's errors. Messages say what happened, to which model or file, and what to do."""


class UnsupportedModelError(TokenPruneError):
    """The model cannot be traced, has no token or spatial chain, or has a structure the rewrite cannot keep exact."""


class ConfigError(TokenPruneError, ValueError):
    """A ratio, location, keep ratio or recipe value is out of range or malformed."""


class CheckpointError(TokenPruneError):
    """A checkpoint file is missing, truncated, foreign, or for another architecture."""


class DataError(TokenPruneError):
    """A dataset is missing or malformed."""


class TrainingError(TokenPruneError):
    """Fine-tuning cannot go on (for example a non-finite loss)."""


class InputError(TokenPruneError, ValueError):
    """An input the sparsified model was not built for: one whose shape takes a branch of a block's forward that
    tracing did not (tokenprune keeps the branches the example input took)."""
