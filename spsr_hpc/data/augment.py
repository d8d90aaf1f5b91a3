"""Aligned random crop and the flips/transpose applied identically to LR and HR (numpy, HWC)."""

from __future__ import annotations

import numpy as np


def dihedral(img: np.ndarray, hflip: bool, vflip: bool, transpose: bool) -> np.ndarray:
    """Horizontal flip, then vertical flip, then transpose (H↔W) of an (H, W, C) array (a view).

    The same order as the DALI pipeline, so both loaders map the same coins to the same image.
    """
    if hflip:
        img = img[:, ::-1]
    if vflip:
        img = img[::-1]
    if transpose:
        img = img.transpose(1, 0, 2)
    return img


def aligned_patch(
    lr: np.ndarray,
    hr: np.ndarray,
    scale: int,
    patch: int,
    rng: np.random.Generator,
    *,
    hflip: bool,
    vflip: bool,
    transpose: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """A random LR patch and the HR patch at the same place, with the same random flips.

    Args:
        lr: (h, w, 3) uint8; hr: (s·h, s·w, 3) uint8.
        patch: LR patch side p (HR patch s·p).
        rng: draws, in this order: y, x, hflip coin, vflip coin, transpose coin (a coin is
            drawn even when its flag is off, so flags do not shift the other draws).

    Returns:
        (p, p, 3) and (s·p, s·p, 3) uint8, contiguous.
    """
    h, w = lr.shape[:2]
    y = int(rng.integers(0, h - patch + 1))
    x = int(rng.integers(0, w - patch + 1))
    coins = rng.random(3) < 0.5
    lr_p = lr[y : y + patch, x : x + patch]
    hr_p = hr[y * scale : (y + patch) * scale, x * scale : (x + patch) * scale]
    flags = (hflip and coins[0], vflip and coins[1], transpose and coins[2])
    return np.ascontiguousarray(dihedral(lr_p, *flags)), np.ascontiguousarray(dihedral(hr_p, *flags))


def random_patch(
    img: np.ndarray, patch: int, rng: np.random.Generator, *, hflip: bool, vflip: bool, transpose: bool
) -> np.ndarray:
    """A random (patch, patch, 3) crop of one image with random flips (the hr_only mode)."""
    h, w = img.shape[:2]
    y = int(rng.integers(0, h - patch + 1))
    x = int(rng.integers(0, w - patch + 1))
    coins = rng.random(3) < 0.5
    out = dihedral(
        img[y : y + patch, x : x + patch], hflip and coins[0], vflip and coins[1], transpose and coins[2]
    )
    return np.ascontiguousarray(out)
