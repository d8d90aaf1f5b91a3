"""MATLAB-compatible bicubic resize (the contract in docs/data.md), mod-crop and uint8 conversion.

The benchmark LR sets (Set5, Set14, BSD100, General100, Urban100) and DIV2K's official LR
images were made with MATLAB's ``imresize(img, 1/4, 'bicubic')``. Its behaviour, reproduced here:

- cubic convolution kernel with a = -0.5 (Keys):
  ``k(x) = 1.5|x|^3 - 2.5|x|^2 + 1`` for |x| <= 1, ``-0.5|x|^3 + 2.5|x|^2 - 4|x| + 2`` for
  1 < |x| <= 2, else 0;
- when shrinking (scale < 1) the kernel is widened to antialias: ``scale * k(scale * x)``,
  support ``4 / scale`` input pixels;
- output pixel i (0-based) maps to input coordinate ``(i + 0.5) / scale - 0.5``;
- weights of each output pixel are normalised to sum to 1;
- outside the image the input is mirrored with the edge pixel repeated (``symmetric``);
- output size ``ceil(size * scale)``; rows are resized first, then columns;
- no clipping and no rounding: float in, float out. ``to_uint8`` does MATLAB's
  ``im2uint8`` rounding when an image is written to disk.

Each axis is resized by one dense (out, in) weight matrix in which the mirrored taps are
already folded in, so the whole resize is two matrix products (fast on CPU and GPU).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TypeVar

import numpy as np
import torch

Image = TypeVar("Image", np.ndarray, torch.Tensor)


def cubic(x: np.ndarray) -> np.ndarray:
    """MATLAB's bicubic kernel (Keys, a = -0.5), elementwise on float64 ``x``."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


def output_size(in_length: int, scale: float) -> int:
    """``ceil(in_length * scale)`` as MATLAB computes it.

    A relative tolerance of 1e-9 absorbs binary rounding of scales such as 1/3 (300 * (1/3)
    is meant to be 100, not 101).
    """
    value = in_length * scale
    return max(1, math.ceil(value - 1e-9 * max(1.0, value)))


@lru_cache(maxsize=64)
def _weight_matrix_cached(in_length: int, out_length: int, scale: float) -> np.ndarray:
    antialias = scale < 1
    kernel_width = 4.0 / scale if antialias else 4.0
    x = np.arange(1, out_length + 1, dtype=np.float64)
    # 1-based input coordinate of each output pixel, as in MATLAB's contributions().
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - kernel_width / 2.0)
    taps = math.ceil(kernel_width) + 2
    indices = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]
    dist = u[:, None] - indices
    weights = scale * cubic(dist * scale) if antialias else cubic(dist)
    weights /= weights.sum(axis=1, keepdims=True)
    # Symmetric boundary: 1..n, n..1, repeated.
    period = 2 * in_length
    idx0 = np.mod(indices.astype(np.int64) - 1, period)
    idx0 = np.where(idx0 < in_length, idx0, period - 1 - idx0)
    matrix = np.zeros((out_length, in_length), dtype=np.float64)
    rows = np.repeat(np.arange(out_length), taps)
    np.add.at(matrix, (rows, idx0.ravel()), weights.ravel())
    matrix.setflags(write=False)
    return matrix


def weight_matrix(in_length: int, scale: float) -> np.ndarray:
    """The (ceil(in_length * scale), in_length) float64 matrix that resizes one axis.

    ``out = W @ x`` along that axis; every row sums to 1. Read-only (cached).
    """
    if in_length < 1:
        raise ValueError(f"cannot resize an axis of length {in_length}; need at least 1 pixel")
    return _weight_matrix_cached(int(in_length), output_size(in_length, scale), float(scale))


def _check_scale(scale: float) -> float:
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise ValueError(f"scale must be a positive finite number (e.g. 1/4 or 2), got {scale!r}")
    return float(scale)


def imresize(img: Image, scale: float) -> Image:
    """Resize like MATLAB's ``imresize(img, scale, 'bicubic')`` (antialiased when shrinking).

    Args:
        img: a float image, any range (no clipping is done):
            numpy ``(H, W, C)`` or ``(H, W)``; torch ``(C, H, W)`` or ``(B, C, H, W)``.
        scale: resize factor, e.g. ``1/4`` to make LR from HR, ``2`` to upscale.

    Returns:
        The resized image, same type, layout and float dtype as ``img``, with
        ``H' = ceil(H * scale)`` and ``W' = ceil(W * scale)``. numpy inputs are computed in
        float64; torch inputs in their own dtype on their own device.
    """
    scale = _check_scale(scale)
    if isinstance(img, np.ndarray):
        if not np.issubdtype(img.dtype, np.floating):
            raise TypeError(
                f"imresize expects a float image, got numpy dtype {img.dtype}; "
                "convert first, e.g. img.astype(np.float64) / 255"
            )
        if img.ndim not in (2, 3):
            raise ValueError(f"numpy images must be (H, W) or (H, W, C), got shape {img.shape}")
        wh = weight_matrix(img.shape[0], scale)
        ww = weight_matrix(img.shape[1], scale)
        x = img.astype(np.float64, copy=False)
        out = np.tensordot(wh, x, axes=([1], [0]))  # (H', W, ...)
        out = np.tensordot(ww, out, axes=([1], [1]))  # (W', H', ...)
        out = np.swapaxes(out, 0, 1)
        return np.ascontiguousarray(out).astype(img.dtype, copy=False)
    if isinstance(img, torch.Tensor):
        if not img.is_floating_point():
            raise TypeError(
                f"imresize expects a float image, got torch dtype {img.dtype}; "
                "convert first, e.g. img.float() / 255"
            )
        if img.ndim not in (3, 4):
            raise ValueError(f"torch images must be (C, H, W) or (B, C, H, W), got shape {tuple(img.shape)}")
        h, w = img.shape[-2:]
        wh = torch.tensor(weight_matrix(h, scale), device=img.device, dtype=img.dtype)
        ww = torch.tensor(weight_matrix(w, scale), device=img.device, dtype=img.dtype)
        return torch.matmul(torch.matmul(wh, img), ww.t())
    raise TypeError(f"imresize expects a numpy array or a torch tensor, got {type(img).__name__}")


def modcrop(img: Image, scale: int) -> Image:
    """Crop the bottom/right so that height and width are multiples of ``scale``.

    numpy ``(H, W)`` / ``(H, W, C)``; torch ``(..., H, W)``. Returns a view.
    """
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"modcrop scale must be a positive int, got {scale!r}")
    if isinstance(img, np.ndarray):
        if img.ndim not in (2, 3):
            raise ValueError(f"numpy images must be (H, W) or (H, W, C), got shape {img.shape}")
        h, w = img.shape[:2]
        return img[: h - h % scale, : w - w % scale]
    if isinstance(img, torch.Tensor):
        if img.ndim < 2:
            raise ValueError(f"torch images must be (..., H, W), got shape {tuple(img.shape)}")
        h, w = img.shape[-2:]
        return img[..., : h - h % scale, : w - w % scale]
    raise TypeError(f"modcrop expects a numpy array or a torch tensor, got {type(img).__name__}")


def to_uint8(img: Image) -> Image:
    """MATLAB ``im2uint8`` of a float image in [0, 1]: ``round(clip(x * 255))``, halves up.

    numpy in → numpy uint8 out, torch in → torch uint8 out; the layout is unchanged.
    """
    if isinstance(img, np.ndarray):
        if not np.issubdtype(img.dtype, np.floating):
            raise TypeError(f"to_uint8 expects a float image in [0, 1], got numpy dtype {img.dtype}")
        return np.floor(np.clip(img.astype(np.float64) * 255.0, 0.0, 255.0) + 0.5).astype(np.uint8)
    if isinstance(img, torch.Tensor):
        if not img.is_floating_point():
            raise TypeError(f"to_uint8 expects a float image in [0, 1], got torch dtype {img.dtype}")
        return torch.floor((img.double() * 255.0).clamp(0.0, 255.0) + 0.5).to(torch.uint8)
    raise TypeError(f"to_uint8 expects a numpy array or a torch tensor, got {type(img).__name__}")
