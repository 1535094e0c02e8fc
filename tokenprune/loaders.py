"""Models from any file tokenprune writes or imports: a model file, a `convert` output folder, a finetune run, or
an official DynamicViT checkpoint.

`tokenprune.load` reads model files only (``.safetensors`` with tokenprune metadata); a run's ``final.pt`` is a
torch checkpoint that `tokenprune.train.load_trained` rebuilds from its stored recipe; the authors' released
checkpoints are imported by `tokenprune.io.official`. The command line and `visualize_files` take any of them,
through the two functions here, so that a user never has to know which is which.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from torch import nn

from .errors import CheckpointError
from .io.official import is_official_file, load_official

MODEL_FILE = "model.safetensors"  # what `tokenprune convert` writes in its output folder
RUN_FILE = "final.pt"  # what a finished `tokenprune finetune` run writes in its output folder


def model_file(path: str | os.PathLike[str]) -> Path:
    """The file `path` names: the file itself, or in a folder its ``model.safetensors`` (a `convert` output) or
    else its ``final.pt`` (a finetune run).

    Raises:
        CheckpointError: a folder holding neither.
    """
    path = Path(path)
    if not path.is_dir():
        return path
    for name in (MODEL_FILE, RUN_FILE):
        if (path / name).is_file():
            return path / name
    raise CheckpointError(
        f"{path} is a folder without {MODEL_FILE} (written by `tokenprune convert`) or {RUN_FILE} (written by a "
        "finished `tokenprune finetune` run); name the model file itself."
    )


def _is_run(path: Path) -> bool:
    return path.is_file() and zipfile.is_zipfile(path)  # torch.save's container; model files are safetensors


def load_model(path: str | os.PathLike[str]) -> nn.Module:
    """The sparsified model in a model file, a `convert` folder, a run or an official DynamicViT checkpoint
    (`tokenprune.load` / `load_trained` / `load_official`).

    Raises:
        CheckpointError: as `tokenprune.load`, `tokenprune.train.load_trained` or `load_official`.
        ConfigError: an official checkpoint that does not record its keep ratio.
    """
    path = model_file(path)
    if is_official_file(path):
        return load_official(path)[1]
    if _is_run(path):
        from .train.api import load_trained

        return load_trained(path)
    from .io import load

    return load(path)


def load_pair(
    path: str | os.PathLike[str], *, dense_weights: str | os.PathLike[str] | None = None
) -> tuple[str, nn.Module, nn.Module]:
    """(name, dense, sparse) for a dense-vs-sparse report: the dense model is the same architecture with the same
    backbone weights and no stages, or with `dense_weights` (e.g. the model a run was fine-tuned from).

    Raises:
        CheckpointError: as `load_model`, a run that trained a dense model (nothing sparse to compare), or
            `dense_weights` that do not fit the architecture exactly.
    """
    from .io import load_weights
    from .nn.recorder import config_of, find_config

    path = model_file(path)
    if is_official_file(path):
        dense, sparse = load_official(path)
    elif _is_run(path):
        from .train.api import load_trained_pair

        dense, sparse = load_trained_pair(path)
        if find_config(sparse) is None:
            raise CheckpointError(
                f"{path} is the checkpoint of a dense run (no sparsify configuration): there is no sparse model to "
                "compare. Report the run of the sparse student, or `tokenprune convert` a model name."
            )
    else:
        from .io import load, load_original

        sparse, dense = load(path), load_original(path)
    if dense_weights is not None:
        load_weights(dense, dense_weights)
    config = config_of(sparse)
    return (config.source or {}).get("name") or config.model_name or path.stem, dense, sparse
