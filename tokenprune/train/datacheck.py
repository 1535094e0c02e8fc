"""Checks on a dataset before training, and its fingerprint (docs/design.md §8).

- `check_image_files`: every image file opens (``header``: format and size read; ``full``: every pixel decoded),
  so a corrupt, empty or truncated file is a `DataError` naming it before the teacher's evaluation, not a PIL
  traceback an hour into training;
- `read_image`: the loader used during training, which names the file if one still fails (e.g. truncated data
  under ``header`` checks, or a file changed on disk since);
- `fingerprint`: what identifies the data of a run (class list, file count, a hash of the names or labels), stored
  in every checkpoint and compared on resume.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ..errors import DataError

__all__ = ["read_image", "check_image_files", "check_same_classes", "fingerprint", "batches"]

_HINT = "remove or replace it (data.check_images=full finds every such file before training)"


def read_image(path: str) -> Any:
    """Open an image as RGB for torchvision's ImageFolder; a file that cannot be decoded is a `DataError`."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"image {path} cannot be read ({type(e).__name__}: {e}); {_HINT}.") from None


def batches(loader: Any):
    """Iterate `loader`; a `DataError` raised in a worker process is re-raised with its own one-line message.

    (A DataLoader worker's exception comes back with the worker's traceback folded into its message.)
    """
    try:
        yield from loader
    except DataError as e:
        text = str(e)
        if "Original Traceback" not in text:
            raise
        last = [line for line in text.splitlines() if line.strip()][-1]
        raise DataError(last.split("DataError: ", 1)[-1]) from None


def check_image_files(paths: list[str], mode: str) -> None:
    """Open every file in `paths`: ``"header"`` reads format and size, ``"full"`` decodes every pixel.

    Raises:
        DataError: naming the first file that fails, the reason and how many others failed.
    """
    from PIL import Image

    if mode == "off":
        return
    failures = []
    for path in paths:
        try:
            with Image.open(path) as im:
                if im.width < 1 or im.height < 1:
                    raise ValueError(f"size {im.size}")
                if mode == "full":
                    im.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            failures.append((path, f"{type(e).__name__}: {e}"))
    if failures:
        path, why = failures[0]
        more = f" ({len(failures) - 1} more files fail too)" if len(failures) > 1 else ""
        raise DataError(f"image {path} cannot be read ({why}){more}; {_HINT}.")


def check_same_classes(train: list[str], val: list[str], where: Path) -> None:
    """The validation split's class folders must be the training split's: labels are indices into that list.

    Raises:
        DataError: listing the classes only one split has.
    """
    if list(train) == list(val):
        return
    only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
    raise DataError(
        f"the class folders of the splits in {where} differ (only in training: {only_train[:5] or 'none'}; only in "
        f"validation: {only_val[:5] or 'none'}): labels are positions in the sorted class list, so they would not "
        "match. Give both splits the same class folders (an empty folder is fine)."
    )


def _names(dataset: Dataset) -> list[str] | None:
    """The files a dataset reads, relative to its root and in order (None for sources without files)."""
    if isinstance(dataset, Subset):
        names = _names(dataset.dataset)
        return [names[i] for i in dataset.indices] if names is not None else None
    if hasattr(dataset, "samples"):  # torchvision's ImageFolder
        root = Path(dataset.root)
        return [f"{Path(p).relative_to(root).as_posix()}:{t}" for p, t in dataset.samples]
    if hasattr(dataset, "pairs"):  # segdata.SegmentationFolder
        return [f"{Path(i).name}|{Path(m).name}" for i, m in dataset.pairs]
    if hasattr(dataset, "files") and hasattr(dataset, "root"):  # detdata.CocoDetection
        return [Path(os.path.relpath(f, dataset.root)).as_posix() for f in dataset.files]
    return None


def _labels_digest(dataset: Dataset) -> str | None:
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    labels = getattr(base, "labels", None)
    if isinstance(labels, torch.Tensor):
        labels = labels.cpu().numpy()
    if not isinstance(labels, np.ndarray):
        return None
    if isinstance(dataset, Subset):
        labels = labels[np.asarray(list(dataset.indices), dtype=np.int64)]
    return hashlib.sha256(np.ascontiguousarray(labels).tobytes()).hexdigest()[:16]


def _summary(dataset: Dataset) -> dict[str, Any]:
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    classes = getattr(base, "classes", None)
    names = _names(dataset)
    summary = {
        "count": len(dataset),
        "classes": [str(c) for c in classes] if classes is not None else None,
        "names": hashlib.sha256("\n".join(names).encode()).hexdigest()[:16] if names is not None else None,
        "labels": _labels_digest(dataset) if names is None else None,
    }
    content = getattr(base, "content_digest", None)  # annotations a file name does not show (COCO's boxes)
    if content is not None:
        summary["content"] = str(content)
    return summary


def fingerprint(bundle: Any) -> dict[str, Any]:
    """``{"train": {...}, "val": {...}}``: count, class list, hash of the file names (or of the labels), and of the
    annotations where the dataset gives a ``content_digest`` (COCO's boxes and labels)."""
    return {"train": _summary(bundle.train), "val": _summary(bundle.val)}
