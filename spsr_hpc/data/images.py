"""Reading image files into uint8 RGB arrays, with the conversions the pipeline accepts.

One place decides what "an RGB image" means for make_shards and the evaluation reader:
grey, palette, CMYK and 16-bit images are converted, alpha is dropped (and the conversion is
reported: 16-bit grey is rounded to 8 bits, 16-bit colour keeps the high byte, as Pillow reads
it), anything PIL cannot decode raises ``BadImageError`` naming the file.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


class BadImageError(ValueError):
    """An image file that cannot be used; the message names the file and the reason."""


def _to_rgb(im: Image.Image, source: str) -> tuple[np.ndarray, str | None]:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8).copy(), None
    if mode in ("L", "1"):
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy(), f"grey ({mode}) -> RGB"
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        return np.asarray(
            im.convert("RGBA").convert("RGB"), dtype=np.uint8
        ).copy(), f"{mode} -> RGB (alpha dropped)"
    if mode == "P":
        has_alpha = "transparency" in im.info
        note = "palette -> RGB" + (" (alpha dropped)" if has_alpha else "")
        rgb = im.convert("RGBA").convert("RGB") if has_alpha else im.convert("RGB")
        return np.asarray(rgb, dtype=np.uint8).copy(), note
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy(), f"{mode} -> RGB"
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grey PNGs: keep the top 8 bits' worth, rounded (x / 257 maps 65535 to 255).
        arr = np.asarray(im, dtype=np.float64)
        if arr.max(initial=0) > 65535 or arr.min(initial=0) < 0:
            raise BadImageError(
                f"{source}: 32-bit integer image with values outside 0..65535 is not supported"
            )
        grey = np.floor(arr / 257.0 + 0.5).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2), f"16-bit grey ({mode}) -> 8-bit RGB"
    raise BadImageError(f"{source}: unsupported image mode {mode!r}; convert it to 8-bit RGB first")


def _sixteen_bit_colour(im: Image.Image) -> str | None:
    """The file's 16-bit-per-channel mode ("RGB", "RGBA", "LA", ...) before it is loaded, else None.

    Pillow has no 16-bit colour mode: it opens such a file (and a 16-bit grey+alpha PNG) as 8-bit
    RGB/RGBA and keeps the high byte of each value (65535 -> 255, 255 -> 0). Only the undecoded
    tile's raw mode still says so.
    """
    if im.mode not in ("RGB", "RGBA") or not im.tile:
        return None
    args = im.tile[0][3]  # (codec, extents, offset, args): a tuple in Pillow 10, a NamedTuple since 11
    rawmode = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else ""
    # 16 bits per channel: "RGB;16B", "RGBA;16L", "LA;16B", ...; not "BGR;16" (a 5-6-5 BMP).
    m = re.fullmatch(r"(RGB[AX]?|LA);16[BLN]", rawmode) if isinstance(rawmode, str) else None
    return m.group(1) if m else None


def decode_rgb(data: bytes, source: str) -> tuple[np.ndarray, str | None]:
    """Decode encoded image bytes to ``uint8 (H, W, 3)``; the second value names a conversion.

    Raises:
        BadImageError: undecodable/truncated data or an unsupported mode; the message names
            ``source``.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            deep = _sixteen_bit_colour(im)
            im.load()
            # A camera JPEG stores its pixels sideways with an EXIF orientation tag that viewers
            # apply: apply it too, so the SR (and a crop, an HR/LR pair) is what the user sees.
            orientation = im.getexif().get(0x0112, 1)
            turned = orientation in range(2, 9)  # 1: as stored; other values are not orientations
            if turned:
                im = ImageOps.exif_transpose(im)
            arr, note = _to_rgb(im, source)
            notes = (
                f"EXIF orientation {orientation} applied" if turned else None,
                f"16-bit {deep} -> 8-bit (the high byte of each value)" if deep else None,
                note,
            )
            return arr, "; ".join(n for n in notes if n) or None
    except BadImageError:
        raise
    except UnidentifiedImageError as exc:
        what = "an empty file" if not data else f"not an image format Pillow reads (first bytes {data[:8]!r})"
        raise BadImageError(f"{source}: cannot decode image: {what}; replace or remove the file") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))
        raise BadImageError(
            f"{source}: cannot decode image ({type(exc).__name__}: {reason}); replace or remove the file"
        ) from exc


def read_rgb(path: str | Path) -> tuple[np.ndarray, str | None]:
    """Read an image file as ``uint8 (H, W, 3)`` RGB; the second value names a conversion.

    Raises:
        BadImageError: unreadable or corrupt file, naming the path.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadImageError(f"{path}: cannot read file ({exc})") from exc
    return decode_rgb(data, str(path))


def encode_png(img: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG bytes of a ``uint8 (H, W, 3)`` image (zlib level 0-9; 1 is fast and ~10% larger than 6)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder`` (not recursive), sorted by name.

    Every entry with an image extension that is not a folder counts, a broken symbolic link
    included: reading it fails with an error naming it, instead of the image silently missing
    from an evaluation.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder {str(folder)!r} does not exist or is not a directory")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir())


def find_lr_match(hr_stem: str, lr_by_stem: dict[str, Path], scale: int) -> Path | None:
    """The LR file for an HR stem: same stem, or DIV2K's ``0001x4`` / ``0001_x4`` style."""
    for candidate in (hr_stem, f"{hr_stem}x{scale}", f"{hr_stem}_x{scale}", f"{hr_stem}_LR"):
        if candidate in lr_by_stem:
            return lr_by_stem[candidate]
    return None
