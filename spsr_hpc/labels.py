"""Column labels on image strips: a white header above side-by-side tiles, every label in full.

A low, neutral module (numpy and Pillow only): the training logger's image grids
(spsr_hpc.train.logging) and the run-folder figures (spsr_hpc.report) both label their columns
with it, so neither of those imports the other.

A label that is wider than its column is wrapped at spaces (and at ``/``), and a word that still
does not fit is broken between characters; ``\\n`` in a label starts a new line. Nothing is cut:
the header grows by one line height per extra line.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_PX = 12
"""Font size of the labels."""
LINE_PX = 15
"""Height of one label line (FONT_PX plus the descenders and 1 px of leading)."""
HEADER_PX = LINE_PX + 3
"""Height of a header whose labels all fit on one line (18 px); each extra line adds LINE_PX."""
MARGIN_PX = 2
"""Blank pixels kept on each side of a label inside its column."""


def label_font(size: int = FONT_PX) -> ImageFont.ImageFont:
    """Pillow's bundled font at `size` (scalable where Pillow has FreeType, else its bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _text_width(text: str, font: ImageFont.ImageFont) -> float:
    return float(font.getlength(text))


def wrap_label(text: str, width: float, font: ImageFont.ImageFont | None = None) -> list[str]:
    """Lines of `text` each at most `width` px wide in `font`, together holding every character.

    Breaks at ``\\n``, then at spaces, then after ``/``; a single word wider than `width` is split
    between characters. ``" ".join`` of a paragraph's lines gives it back (a ``/`` break keeps the
    ``/`` at the end of its line and adds no space).
    """
    font = font or label_font()
    lines: list[str] = []
    for para in text.split("\n"):
        # tokens: words with their trailing separator (" " is dropped at a line break, "/" is kept)
        tokens: list[tuple[str, str]] = []
        for word in para.split(" "):
            parts = word.split("/")
            tokens += [(p + "/", "") for p in parts[:-1]] + [(parts[-1], " ")]
        line = ""
        for tok, sep in tokens:
            trial = line + tok
            if line and _text_width(trial, font) > width:
                lines.append(line.rstrip(" "))
                line = ""
                trial = tok
            if _text_width(trial, font) > width:  # one word wider than the column: split it
                for ch in tok:
                    if line and _text_width(line + ch, font) > width:
                        lines.append(line)
                        line = ""
                    line += ch
            else:
                line = trial
            line += sep
        lines.append(line.rstrip(" "))
    return lines


def header_height(n_lines: int) -> int:
    """Pixel height of a header whose tallest label has `n_lines` lines."""
    return HEADER_PX + LINE_PX * max(0, n_lines - 1)


def label_layout(labels: Sequence[str], widths: Sequence[int]) -> list[list[str]]:
    """Each label's lines as label_columns draws them in columns of `widths` px."""
    font = label_font()
    return [wrap_label(text, cw - 2 * MARGIN_PX, font) if text else [] for text, cw in zip(labels, widths)]


def label_columns(img: np.ndarray, labels: Sequence[str], widths: Sequence[int] | None = None) -> np.ndarray:
    """Put a white header strip above `img` ((H, W, 3) uint8) with one centred label per column.

    widths: the columns' widths in pixels (default: W split evenly among the labels). A label
    wider than its column wraps onto more lines (:func:`wrap_label`); the header is then
    ``header_height(max lines)`` px high instead of HEADER_PX. Returns (header + H, W, 3) uint8.
    """
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"label_columns needs an (H, W, 3) uint8 image, got {img.shape} {img.dtype}")
    w = img.shape[1]
    if widths is None:
        widths = [w // len(labels)] * len(labels)
    if len(widths) != len(labels) or sum(widths) > w:
        raise ValueError(f"{len(labels)} labels for columns of widths {list(widths)} in an image {w} px wide")
    layout = label_layout(labels, widths)
    head = Image.new("RGB", (w, header_height(max((len(ls) for ls in layout), default=1))), "white")
    draw = ImageDraw.Draw(head)
    font = label_font()
    x0 = 0
    for lines, cw in zip(layout, widths):
        for i, line in enumerate(lines):
            tw = _text_width(line, font)
            draw.text((x0 + (cw - tw) / 2, 2 + i * LINE_PX), line, fill="black", font=font)
        x0 += cw
    return np.concatenate([np.asarray(head), img], axis=0)


def tile_row(tiles: Sequence[np.ndarray], pad: int = 2) -> tuple[np.ndarray, list[int]]:
    """Tiles ((h, w, 3) uint8) side by side with a white border; returns the row and each column's width."""
    padded = [np.pad(t, ((pad, pad), (pad, pad), (0, 0)), constant_values=255) for t in tiles]
    h = max(t.shape[0] for t in padded)
    padded = [np.pad(t, ((0, h - t.shape[0]), (0, 0), (0, 0)), constant_values=255) for t in padded]
    return np.concatenate(padded, axis=1), [t.shape[1] for t in padded]


__all__ = [
    "FONT_PX",
    "HEADER_PX",
    "LINE_PX",
    "MARGIN_PX",
    "header_height",
    "label_columns",
    "label_font",
    "label_layout",
    "tile_row",
    "wrap_label",
]
