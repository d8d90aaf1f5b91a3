"""PSNR and SSIM exactly as the paper's numbers are measured (docs/method.md §8).

The protocol, step by step, for a super-resolved image and its ground truth (both uint8 RGB):

1. the evaluator mod-crops the ground truth to the scale (not done here: both images must
   already have the same shape);
2. luma via MATLAB's ``rgb2ycbcr`` on uint8 data, which returns uint8: the Y channel is
   rounded to whole numbers (half away from zero) *before* anything else;
3. ``crop_border`` pixels are shaved from each border (the scale, by convention);
4. PSNR with peak 255 on that crop;
5. SSIM: Wang's reference ``ssim.m`` (11×11 Gaussian, σ 1.5, K1 0.01, K2 0.03, 'valid'
   filtering, L = 255) including its automatic down-sampling by
   ``f = max(1, round(min(H, W) / 256))`` of the cropped image.

Why this matters: the public SPSR code's own Python metrics work on RGB and its SSIM has a
channel bug, so its numbers cannot be compared with Table I; people trying to reproduce the
paper with them failed (docs/method.md §10).

RGB variants (``y_channel=False``) exist for users who ask for them explicitly: PSNR then uses
the mean squared error over all three channels jointly, SSIM is the mean of the three
per-channel ``ssim.m`` values (each with the same down-sampling).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# MATLAB rgb2ycbcr, first row of T (65.481, 128.553, 24.966 for R, G, B in [0, 1]), as integers:
# Y = 16 + (65481 R + 128553 G + 24966 B) / 255000 for R, G, B in 0..255.
_Y_NUM = (65481, 128553, 24966)
_Y_DEN = 255000

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
DATA_RANGE = 255.0


def _check_image(img: np.ndarray, name: str) -> None:
    if not isinstance(img, np.ndarray):
        raise TypeError(f"{name} must be a numpy uint8 array of shape (H, W, 3), got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise TypeError(
            f"{name} must be uint8 (0..255) as the protocol rounds on uint8 data, got dtype {img.dtype}; "
            "convert with spsr_hpc.data.to_uint8 first"
        )
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{name} must have shape (H, W, 3) (RGB), got {img.shape}")


def _check_pair(a: np.ndarray, b: np.ndarray, crop_border: int) -> None:
    _check_image(a, "a")
    _check_image(b, "b")
    if a.shape != b.shape:
        raise ValueError(
            f"images differ in shape: a {a.shape} vs b {b.shape}; mod-crop the ground truth to the scale "
            "(spsr_hpc.data.modcrop) so that it matches the super-resolved image"
        )
    if not isinstance(crop_border, (int, np.integer)) or isinstance(crop_border, bool) or crop_border < 0:
        raise ValueError(f"crop_border must be a non-negative int (usually the scale), got {crop_border!r}")
    h, w = a.shape[:2]
    if h - 2 * crop_border <= 0 or w - 2 * crop_border <= 0:
        raise ValueError(f"crop_border={crop_border} leaves nothing of a {h}×{w} image")


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """Luma as MATLAB's ``rgb2ycbcr`` defines it for uint8 input, rounded to uint8.

    img: (H, W, 3) uint8 RGB. Returns (H, W) uint8 in [16, 235]:
    ``round(16 + (65.481 R + 128.553 G + 24.966 B))`` with R, G, B in [0, 1], half away from zero.

    Evaluated in exact integer arithmetic (16 + (65481 R + 128553 G + 24966 B) / 255000 with
    R, G, B in 0..255), so the result does not depend on floating-point evaluation order. 194 of
    the 2^24 colours sit exactly on a .5 tie; MATLAB's double arithmetic may round some of them
    down instead (1 grey level, at those pixels only).
    """
    _check_image(img, "img")
    r, g, b = (img[..., i].astype(np.int64) for i in range(3))
    num = _Y_NUM[0] * r + _Y_NUM[1] * g + _Y_NUM[2] * b
    # num >= 0, so adding half the divisor then flooring rounds half away from zero.
    return (16 + (num + _Y_DEN // 2) // _Y_DEN).astype(np.uint8)


def _prepare(
    a: np.ndarray, b: np.ndarray, crop_border: int, y_channel: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(H', W', C) float64 crops of both images: C = 1 for Y, 3 for RGB."""
    _check_pair(a, b, crop_border)
    if y_channel:
        a, b = rgb_to_y(a)[..., None], rgb_to_y(b)[..., None]
    if crop_border:
        a = a[crop_border:-crop_border, crop_border:-crop_border]
        b = b[crop_border:-crop_border, crop_border:-crop_border]
    return a.astype(np.float64), b.astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray, crop_border: int, y_channel: bool = True) -> float:
    """Peak signal-to-noise ratio in dB (peak 255), docs/method.md §8.

    a, b: (H, W, 3) uint8 RGB of the same shape (mod-crop the ground truth first).
    crop_border: pixels shaved from each border (the scale for the paper's protocol).
    y_channel: True (the protocol) for MATLAB's rounded Y; False for all RGB values jointly.
    Returns inf for identical crops.
    """
    x, y = _prepare(a, b, crop_border, y_channel)
    mse = float(np.mean((x - y) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(DATA_RANGE**2 / mse)


def _matlab_round(v: float) -> int:
    return math.floor(v + 0.5) if v >= 0 else -math.floor(-v + 0.5)


def ssim_downsample_factor(h: int, w: int) -> int:
    """ssim.m's automatic down-sampling factor f = max(1, round(min(H, W) / 256)), MATLAB rounding."""
    return max(1, _matlab_round(min(h, w) / 256))


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """fspecial('gaussian', size, sigma) as a separable 1-D kernel (float64, sums to 1)."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def _matlab_box_downsample(x: torch.Tensor, f: int) -> torch.Tensor:
    """ssim.m's ``imfilter(img, ones(f,f)/f², 'symmetric', 'same')`` then ``img(1:f:end, 1:f:end)``.

    x: (N, 1, H, W) float64. Returns (N, 1, ceil(H/f), ceil(W/f)).
    MATLAB centres an f-wide filter at element floor((f+1)/2) (1-based), so output i averages
    inputs i-(c-1) .. i+(f-c), c = floor((f+1)/2); 'symmetric' padding mirrors including the
    edge sample, which is numpy's 'symmetric' mode.
    """
    c = (f + 1) // 2
    before, after = c - 1, f - c
    arr = x.numpy()
    arr = np.pad(arr, ((0, 0), (0, 0), (before, after), (before, after)), mode="symmetric")
    # Windows starting at padded index 0, f, 2f, ... are exactly the kept outputs 1:f:end.
    return F.avg_pool2d(torch.from_numpy(arr), kernel_size=f, stride=f)


def _ssim_matlab(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Wang's ssim.m on (N, 1, H, W) float64 planes in [0, 255]; returns (N,) mean SSIM."""
    h, w = x.shape[-2:]
    f = ssim_downsample_factor(h, w)
    if f > 1:
        x, y = _matlab_box_downsample(x, f), _matlab_box_downsample(y, f)
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(
            f"image too small for SSIM: {tuple(x.shape[-2:])} after cropping (and down-sampling by {f}); "
            f"ssim.m needs at least {SSIM_WINDOW}×{SSIM_WINDOW}"
        )
    g = _gaussian_window()
    kh, kw = g.view(1, 1, -1, 1), g.view(1, 1, 1, -1)

    def filt(t: torch.Tensor) -> torch.Tensor:  # filter2(window, t, 'valid')
        return F.conv2d(F.conv2d(t, kh), kw)

    c1 = (SSIM_K1 * DATA_RANGE) ** 2
    c2 = (SSIM_K2 * DATA_RANGE) ** 2
    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x**2
    syy = filt(y * y) - mu_y**2
    sxy = filt(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return ssim_map.mean(dim=(1, 2, 3))


def ssim(a: np.ndarray, b: np.ndarray, crop_border: int, y_channel: bool = True) -> float:
    """Structural similarity as Wang's reference ssim.m computes it, docs/method.md §8.

    a, b: (H, W, 3) uint8 RGB of the same shape (mod-crop the ground truth first).
    crop_border: pixels shaved from each border before SSIM (the scale for the protocol).
    y_channel: True (the protocol) for MATLAB's rounded Y; False for the mean of the per-channel
    SSIMs of R, G and B.
    """
    x, y = _prepare(a, b, crop_border, y_channel)
    # (H, W, C) -> (C, 1, H, W): channels become a batch of independent planes.
    tx = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[:, None]
    ty = torch.from_numpy(np.ascontiguousarray(y.transpose(2, 0, 1)))[:, None]
    return float(_ssim_matlab(tx, ty).mean())


def psnr_ssim(a: np.ndarray, b: np.ndarray, crop_border: int, y_channel: bool = True) -> tuple[float, float]:
    """Both metrics of one pair (the evaluator's helper); same arguments as :func:`psnr`."""
    return psnr(a, b, crop_border, y_channel), ssim(a, b, crop_border, y_channel)
