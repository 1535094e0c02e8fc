"""torchrun entry of tests/test_train_distributed.py: fine-tune one recipe twice in one process group.

``<recipe> <out>``: writes ``out/synced`` (DistributedDataParallel, as `finetune` does) and ``out/unsynced`` (the
same run with DistributedDataParallel replaced by a pass-through: the negative control that shows the test would
catch ranks that never exchange gradients).
"""

from __future__ import annotations

import sys
from contextlib import nullcontext

import torch.distributed as dist
from torch import nn

from tokenprune.train import finetune, trainer


class _Unsynchronised(nn.Module):
    """What a run without the DDP wrapper does: each rank steps on its own gradients."""

    def __init__(self, module: nn.Module, **_: object) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def no_sync(self):
        return nullcontext()


def main(recipe: str, out: str) -> None:
    dist.init_process_group("gloo")  # ours: finetune joins it and leaves it open for the second run
    finetune(recipe, overrides=[f"run.output_dir={out}/synced"])
    trainer.DistributedDataParallel = _Unsynchronised
    finetune(recipe, overrides=[f"run.output_dir={out}/unsynced"])
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
