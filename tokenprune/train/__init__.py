"""Fine-tuning: the DynamicViT objective, learned keep ratios, recipes, data, and a DDP/AMP trainer (issue 4).

Shortest path::

    from tokenprune.train import finetune
    result = finetune("recipes/fashion_mnist_cpu.yaml", overrides=["optim.epochs=1"])

or from the shell (also under ``torchrun --nproc_per_node N -m tokenprune.train ...``)::

    python -m tokenprune.train --recipe recipes/fashion_mnist_cpu.yaml optim.epochs=1
"""

from ..measure.cost import ComputeModel
from .api import (
    FinetuneResult,
    build_teacher,
    cli_main,
    finetune,
    load_trained,
    load_trained_original,
    load_weights,
    run_recipe,
)
from .data import DataBundle, build_datasets
from .losses import LossOutput, LossWeights, SparsificationLoss
from .ratios import LearnedKeepRatios, budget_penalty
from .recipe import Recipe, apply_overrides, load_recipe, save_recipe
from .trainer import Trainer

__all__ = [
    "finetune",
    "run_recipe",
    "cli_main",
    "FinetuneResult",
    "build_teacher",
    "load_trained",
    "load_trained_original",
    "load_weights",
    "Recipe",
    "load_recipe",
    "apply_overrides",
    "save_recipe",
    "DataBundle",
    "build_datasets",
    "LossWeights",
    "LossOutput",
    "SparsificationLoss",
    "ComputeModel",
    "LearnedKeepRatios",
    "budget_penalty",
    "Trainer",
]
