"""tokenprune: dynamic spatial sparsification (DynamicViT) for timm and torchvision models, as a graph plug-in."""

from ._version import __version__ as __version__
from .config import SparsifyConfig
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    InputError,
    TokenPruneError,
    TrainingError,
    UnsupportedModelError,
)
from .export import export
from .io import load, load_official, load_original, load_weights, read_weights, save
from .measure import profile
from .models import create_model
from .nn.recorder import selectors
from .sparsify import config_of, plan, set_execution, set_keep_ratios, sparsify
from .state import SparsityState, sparsity_state
from .visualize import visualize

__all__ = [
    "sparsify",
    "plan",
    "sparsity_state",
    "set_execution",
    "set_keep_ratios",
    "selectors",
    "config_of",
    "profile",
    "SparsifyConfig",
    "save",
    "load",
    "load_original",
    "load_official",
    "read_weights",
    "load_weights",
    "create_model",
    "export",
    "visualize",
    "SparsityState",
    "TokenPruneError",
    "UnsupportedModelError",
    "ConfigError",
    "CheckpointError",
    "DataError",
    "TrainingError",
    "InputError",
]
