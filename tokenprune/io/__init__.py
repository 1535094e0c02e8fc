"""Files: tokenprune model files (`save`, `load`, `load_original`), other tools' weight files (`read_weights`,
`load_weights`) and the authors' DynamicViT checkpoints (`load_official`), read without executing or fetching
anything."""

from .model_file import FORMAT, FORMAT_VERSION, SourceWarning, load, load_original, save
from .official import load_official
from .source import check_source, infer_source
from .weights import load_weights, read_metadata, read_weights

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SourceWarning",
    "save",
    "load",
    "load_original",
    "load_official",
    "read_weights",
    "load_weights",
    "read_metadata",
    "check_source",
    "infer_source",
]
