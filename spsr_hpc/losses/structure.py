"""Structure losses of SPSR-P/-J (docs/method.md §4): distances on frozen NSE features (or, for
SPSR-VGG / SPSR-ResNet, the ImageNet features of docs/method.md §11: any frozen extractor works).

The NSE is frozen (no parameter receives a gradient) but differentiable: gradients flow
through it into SR. The structure GAN lives in the objective (it needs the structure D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DISTANCES = ("l1", "l2", "cosine")


def freeze_(module: nn.Module) -> nn.Module:
    """requires_grad_(False) on every parameter and eval mode; returns the module."""
    module.requires_grad_(False)
    return module.eval()


def structure_features(nse: nn.Module, x: torch.Tensor, *, grad: bool) -> torch.Tensor:
    """NSE(x): (B, 3, H, W) -> (B, d, H/4, W/4); grad=False runs under no_grad (for HR)."""
    if grad:
        return nse(x)
    with torch.no_grad():
        return nse(x)


def structure_distance(fake: torch.Tensor, real: torch.Tensor, distance: str = "l1") -> torch.Tensor:
    """Mean distance between feature maps (B, d, h, w), fp32: L1, L2 (MSE) or 1 − cosine over d."""
    if distance not in DISTANCES:
        raise ValueError(f"structure_distance: distance={distance!r} is not one of {DISTANCES}")
    if fake.shape != real.shape:
        raise ValueError(f"structure_distance: shapes differ: {tuple(fake.shape)} vs {tuple(real.shape)}")
    fake, real = fake.float(), real.detach().float()
    if distance == "l1":
        return F.l1_loss(fake, real)
    if distance == "l2":
        return F.mse_loss(fake, real)
    return (1 - F.cosine_similarity(fake, real, dim=1, eps=1e-8)).mean()


def structure_pixel_loss(
    nse: nn.Module, sr: torch.Tensor, hr: torch.Tensor, distance: str = "l1"
) -> torch.Tensor:
    """distance(NSE(SR), NSE(HR)); sr, hr: (B, 3, H, W). The NSE should be frozen (see freeze_)."""
    return structure_distance(
        structure_features(nse, sr, grad=True), structure_features(nse, hr, grad=False), distance
    )
