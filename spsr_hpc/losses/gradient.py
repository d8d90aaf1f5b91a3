"""Gradient-space losses of SPSR-G (docs/method.md §4) on the fused gradient-map kernel.

* gradient pixel: MSE between the *padded* maps (padding 2, (H+2)×(W+2)) of SR and HR.
* branch pixel: L1 between the gradient branch's HR output and the *same-size* map of HR.
The gradient GAN sees the same padded maps (see `padded_gradient`); it lives in the objective.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import spsr_kernels


def padded_gradient(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H+2, W+2) gradient map (docs/method.md §1 padded variant), differentiable."""
    return spsr_kernels.gradient_map(x, padding=2)


def same_gradient(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W) gradient map (docs/method.md §1 same-size variant), differentiable."""
    return spsr_kernels.gradient_map(x, padding=1)


def gradient_pixel_loss(
    sr: torch.Tensor,
    hr: torch.Tensor,
    *,
    sr_grad: torch.Tensor | None = None,
    hr_grad: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE(grad_padded(SR), grad_padded(HR)) in fp32; gradients flow into SR only.

    sr, hr: (B, C, H, W). Precomputed padded maps can be passed to avoid recomputing them.
    """
    if sr.shape != hr.shape:
        raise ValueError(f"gradient_pixel_loss: SR {tuple(sr.shape)} and HR {tuple(hr.shape)} differ")
    sr_grad = padded_gradient(sr) if sr_grad is None else sr_grad
    if hr_grad is None:
        with torch.no_grad():
            hr_grad = padded_gradient(hr)
    return F.mse_loss(sr_grad.float(), hr_grad.detach().float())


def branch_pixel_loss(grad_sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """L1(branch output, grad_same(HR)) in fp32. grad_sr: (B, C, H, W) from SROutput.grad_sr."""
    if grad_sr.shape != hr.shape:
        raise ValueError(
            f"branch_pixel_loss: branch output {tuple(grad_sr.shape)} and HR {tuple(hr.shape)} differ"
        )
    with torch.no_grad():
        target = same_gradient(hr)
    return F.l1_loss(grad_sr.float(), target.float())
