"""Pixel losses (docs/method.md §4, image pixel term: L1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

CRITERIA = ("l1", "l2")


def pixel_loss(pred: torch.Tensor, target: torch.Tensor, criterion: str = "l1") -> torch.Tensor:
    """Mean L1 or L2 (MSE) distance, computed in fp32.

    pred, target: same shape, any float dtype. Returns a 0-dim fp32 tensor.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"pixel_loss: criterion={criterion!r} is not one of {CRITERIA}")
    if pred.shape != target.shape:
        raise ValueError(
            f"pixel_loss: shapes differ: pred {tuple(pred.shape)} vs target {tuple(target.shape)}"
        )
    pred, target = pred.float(), target.float()
    return F.l1_loss(pred, target) if criterion == "l1" else F.mse_loss(pred, target)
