"""Evaluation reader: full images from an HR folder and an LR folder (or LR made by imresize)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from spsr_hpc.data.images import BadImageError, find_lr_match, list_images, read_rgb
from spsr_hpc.data.imresize import imresize, modcrop, to_uint8


class FolderDataset(Dataset):
    """Benchmark-set reader (Set5, Set14, BSD100, General100, Urban100, DIV2K val, ...).

    Each item is ``{"name": str, "lr": (3, h, w) float32 in [0, 1], "hr": ...}`` where HR is
    mod-cropped to the scale and is ``(H, W, 3) uint8`` (the metrics' input, docs/method.md §8) or,
    with ``hr_float=True``, ``(3, H, W) float32 in [0, 1]``; ``H = scale·h``, ``W = scale·w``.

    Without ``lr_dir`` the LR is ``to_uint8(imresize(modcrop(HR) / 255, 1 / scale)) / 255``:
    MATLAB bicubic rounded to uint8, exactly how the benchmark LR sets were made.
    LR files are matched by name (``baby.png``, DIV2K's ``0801x4.png`` or ``0801_x4.png``).
    Grey/RGBA images are converted to RGB. An unreadable image raises ``BadImageError``
    (a ValueError) naming the file; an LR whose size is not HR/scale raises ValueError.
    """

    def __init__(
        self, hr_dir: str | Path, lr_dir: str | Path | None = None, *, scale: int = 4, hr_float: bool = False
    ):
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
            raise ValueError(f"scale must be a positive int, got {scale!r}")
        self.hr_files = list_images(hr_dir)
        if not self.hr_files:
            raise ValueError(f"no image files in HR folder {str(hr_dir)!r}")
        self.scale, self.hr_float = scale, hr_float
        self.lr_files: list[Path | None] = [None] * len(self.hr_files)
        if lr_dir is not None:
            by_stem = {p.stem: p for p in list_images(lr_dir)}
            for i, hr in enumerate(self.hr_files):
                match = find_lr_match(hr.stem, by_stem, scale)
                if match is None:
                    raise ValueError(
                        f"no LR image for {hr.name} in {lr_dir} (looked for {hr.stem}, "
                        f"{hr.stem}x{scale}, {hr.stem}_x{scale})"
                    )
                self.lr_files[i] = match

    def check_pairs(self) -> None:
        """Check every image's size from its header (no decoding): each HR is at least ``scale``
        pixels on a side and each LR file is exactly the mod-cropped HR / scale.

        Raises:
            BadImageError: unreadable headers or too small HR images, naming the files.
            ValueError: LR/HR size mismatches, naming the first few pairs.
        """
        from PIL import Image, UnidentifiedImageError

        def size(path: Path) -> tuple[int, int]:
            """(width, height) as read_rgb gives the image: EXIF orientations 5-8 turn it by 90°."""
            try:
                with Image.open(path) as im:
                    w, h = im.size
                    return (h, w) if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)
            except (OSError, UnidentifiedImageError) as e:
                raise BadImageError(f"{path}: not a readable image ({e})") from e

        s, bad = self.scale, []
        for hr_path, lr_path in zip(self.hr_files, self.lr_files):
            w, h = size(hr_path)
            if w < s or h < s:
                raise BadImageError(f"{hr_path}: {w}x{h} is smaller than the scale {s}")
            if lr_path is not None and size(lr_path) != (w // s, h // s):
                lw, lh = size(lr_path)
                bad.append(f"{lr_path} is {lw}x{lh} but HR {hr_path.name} (mod-cropped "
                           f"{w - w % s}x{h - h % s}) / {s} is {w // s}x{h // s}")
        if bad:
            raise ValueError(
                f"{len(bad)} LR image(s) do not match their HR at scale {s}: " + "; ".join(bad[:3])
                + (" ..." if len(bad) > 3 else "")
            )

    def __len__(self) -> int:
        return len(self.hr_files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        hr_path = self.hr_files[i]
        hr, _ = read_rgb(hr_path)
        hr = np.ascontiguousarray(modcrop(hr, self.scale))
        h, w = hr.shape[0] // self.scale, hr.shape[1] // self.scale
        if h == 0 or w == 0:
            raise BadImageError(
                f"{hr_path}: {hr.shape[1]}x{hr.shape[0]} is smaller than the scale {self.scale}"
            )
        lr_path = self.lr_files[i]
        if lr_path is None:
            lr = to_uint8(imresize(hr.astype(np.float64) / 255.0, 1.0 / self.scale))
        else:
            lr, _ = read_rgb(lr_path)
            if lr.shape[:2] != (h, w):
                raise ValueError(
                    f"{lr_path}: LR is {lr.shape[1]}x{lr.shape[0]} but HR {hr_path.name} (mod-cropped "
                    f"{hr.shape[1]}x{hr.shape[0]}) / {self.scale} is {w}x{h}"
                )
        lr_t = torch.from_numpy(np.ascontiguousarray(lr)).permute(2, 0, 1).float().div_(255.0)
        if self.hr_float:
            hr_out: Any = torch.from_numpy(hr).permute(2, 0, 1).float().div_(255.0)
        else:
            hr_out = hr
        return {"name": hr_path.stem, "lr": lr_t, "hr": hr_out}
