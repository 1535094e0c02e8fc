"""The smallest real fine-tuning runs, shared by the tests that train: a 4-block ViT on 16 x 16 synthetic images.

Compose them: ``[*TINY_VIT, *SYNTHETIC, *ONE_EPOCH]`` is a run of 2 steps (a few seconds on one core),
``[*TINY_VIT, *SYNTHETIC, *THREE_EPOCHS]`` one with gradient accumulation, warm-up, a log line and a checkpoint at
every step (what resume and reliability tests need). Later overrides of the same key win.
"""

TINY_VIT = [
    "model.name=vit_tiny_patch16_224",
    "model.kwargs={img_size: 16, patch_size: 4, embed_dim: 32, depth: 4, num_heads: 2, num_classes: 4, in_chans: 1}",
    "sparsify.locations=[1,2,3]",
]
SYNTHETIC = ["data.source=synthetic", "data.num_classes=4", "data.workers=0", "run.threads=1"]
ONE_EPOCH = ["data.synthetic_size=16", "optim.batch_size=8", "optim.epochs=1", "optim.warmup_epochs=0"]
THREE_EPOCHS = [
    "data.synthetic_size=32",
    "optim.batch_size=8",
    "optim.accum_steps=2",
    "optim.epochs=3",
    "optim.warmup_epochs=1",
    "run.log_every=1",
    "run.checkpoint_every=1",
]
