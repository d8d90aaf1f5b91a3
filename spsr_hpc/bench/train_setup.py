"""What the training benchmarks share: the fixed overrides and synthetic in-memory batches.

Imported by spsr_hpc/bench/train.py (throughput) and spsr_hpc/bench/train_vs_reference.py
(our step vs the public code's structure); neither imports the other's internals.
"""

from __future__ import annotations

import torch

FIXED_OVERRIDES = [
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "logging.image_every=0",
    "val.dir=null",
    "checkpoint.every=0",
    "checkpoint.resume=none",
    "train.fusion_warmup_steps=0",
]
"""Overrides every benchmark run gets: nothing read or written besides the step itself."""


class SyntheticBatches:
    """A few random {"lr", "hr"} batches cycled forever; no state worth saving."""

    def __init__(self, per_rank: int, lr_size: int, scale: int, n: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        hr = [torch.rand(per_rank, 3, lr_size * scale, lr_size * scale, generator=g) for _ in range(n)]
        self.batches = [{"lr": torch.nn.functional.avg_pool2d(h, scale), "hr": h} for h in hr]

    def __iter__(self):
        while True:
            yield from self.batches


__all__ = ["FIXED_OVERRIDES", "SyntheticBatches"]
