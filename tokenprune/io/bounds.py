"""Bounds on what reading a file may allocate: no more than the file holds.

Two ways a small file can make a reader allocate without bound, both refused here before the memory is spent:

- a torch zip whose entries are compressed: the reader allocates each entry's *declared* size (a 1 MB deflated
  entry can declare 1 GiB); `torch.save` stores entries uncompressed, so their sizes must add up to at most the
  file's own size;
- a pickle whose containers are shared many times over (``a = [x] * 8; b = [a] * 8; ...``): unpickling keeps the
  references, but any walk over the result (comparing recipes, copying) visits every path, exponentially many;
  `check_nesting` walks the loaded structure once with a node budget and refuses it when the budget runs out.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

__all__ = ["MAX_NODES", "MAX_DEPTH", "check_torch_zip", "check_nesting"]

#: Container items a loaded checkpoint may hold, counted along every path (real checkpoints: a few thousand).
MAX_NODES = 1_000_000
#: Nesting depth a loaded checkpoint may have (real checkpoints: under 10).
MAX_DEPTH = 64


def check_torch_zip(path: Path) -> None:
    """Refuse a torch zip file whose entries declare more bytes than the file holds (compressed entries).

    Raises:
        CheckpointError: naming the file, the declared and the actual size.
    """
    if not zipfile.is_zipfile(path):
        return  # not a zip: torch's own reader reports it
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            declared = sum(info.file_size for info in z.infolist())
            compressed = [info.filename for info in z.infolist() if info.compress_type != zipfile.ZIP_STORED]
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is a damaged zip archive ({e}); it may be truncated.") from None
    if declared > size:
        raise CheckpointError(
            f"refused to read {path}: its zip entries declare {declared} bytes but the file holds {size} "
            f"(compressed entries: {', '.join(compressed[:3]) or 'none'}); reading it would allocate the declared "
            "size. torch.save never compresses; re-save the weights with torch.save or as safetensors."
        )


def check_nesting(data: Any, path: Path, *, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH) -> None:
    """Walk a loaded structure along every path, refusing it past `max_nodes` items or `max_depth` levels.

    Raises:
        CheckpointError: naming the file and the bound it exceeds.
    """
    stack = [(data, 0)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise CheckpointError(
                f"refused {path}: it holds more than {max_nodes} nested items counted along every path (containers "
                "shared many times over expand without bound when used); it was not written by tokenprune."
            )
        if depth > max_depth:
            raise CheckpointError(f"refused {path}: its data is nested deeper than {max_depth} levels.")
        if isinstance(value, torch.Tensor):
            continue
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend((v, depth + 1) for v in value)
