"""Adversarial losses on logits (docs/method.md §4): relativistic average (RaGAN) and vanilla.

All take logits of any shape ((B, 1) from our discriminators), compute in fp32 with
BCE-with-logits and return a 0-dim tensor.

RaGAN's relativistic mean E[D(.)] is over the GLOBAL batch: under data parallelism every rank's
logits enter it (:func:`spsr_hpc.distributed.global_mean`: the other ranks' logits as constants,
one all-reduce), as in the public code, whose DataParallel gathers the outputs of all GPUs
before the loss. The BCE average itself is over the local batch, like every other loss term,
and the ranks' gradients are averaged by DeepSpeed: N ranks x b samples give the losses and
gradients of one process with N·b. Without a process group (or with one rank) the mean is the
plain batch mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spsr_hpc.distributed import global_mean


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def ragan_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """[BCE(D(real) − mean D(fake), 1) + BCE(D(fake) − mean D(real), 0)] / 2 (means: global batch)."""
    real, fake = real_logits.float(), fake_logits.float()
    return (_bce(real - global_mean(fake), 1.0) + _bce(fake - global_mean(real), 0.0)) / 2


def ragan_g_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """D's terms with swapped targets: [BCE(real − mean fake, 0) + BCE(fake − mean real, 1)] / 2.

    In the generator step pass real logits without a graph (e.g. computed under no_grad).
    Means over the global batch, as in :func:`ragan_d_loss`.
    """
    real, fake = real_logits.float(), fake_logits.float()
    return (_bce(real - global_mean(fake), 0.0) + _bce(fake - global_mean(real), 1.0)) / 2


def vanilla_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """[BCE(D(real), 1) + BCE(D(fake), 0)] / 2."""
    return (_bce(real_logits.float(), 1.0) + _bce(fake_logits.float(), 0.0)) / 2


def vanilla_g_loss(real_logits: torch.Tensor | None, fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating BCE(D(fake), 1); `real_logits` is ignored (same signature as ragan_g_loss)."""
    return _bce(fake_logits.float(), 1.0)


GAN_LOSSES = {"ragan": (ragan_d_loss, ragan_g_loss), "vanilla": (vanilla_d_loss, vanilla_g_loss)}
