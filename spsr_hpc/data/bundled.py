"""Real colour photos without a download: scikit-image's bundled images as an HR folder.

Used by the laptop demo, the tests and the loader benchmarks. Only RGB photographs are used
(synthetic images such as ``colorwheel`` and greyscale ones such as ``camera`` are not), and
only those present in the installed scikit-image (some need the optional ``pooch`` download
and are then silently absent from the list, never downloaded).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from spsr_hpc.files import OutputWriteError, atomic_output, describe_write_error

log = logging.getLogger(__name__)


def require_skimage() -> None:
    """Raise ModuleNotFoundError naming scikit-image when it is not installed."""
    try:
        import skimage  # noqa: F401
    except ImportError as e:
        raise ModuleNotFoundError(
            f"the bundled photos come from scikit-image, which does not import ({e}); install it "
            "(pip install scikit-image, or the project's [dev] extra) or give your own images with --hr"
        ) from e


def _motorcycle(i: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        return data.stereo_motorcycle()[i]

    return load


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        return getattr(data, name)()

    return load


# Fixed order: the validation split is the last `holdout` entries, so names and split never
# depend on what else is installed. chelsea and coffee go last: small, varied, quick to score.
BUNDLED_PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "rocket": _skimage("rocket"),
    "motorcycle_left": _motorcycle(0),
    "motorcycle_right": _motorcycle(1),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "retina": _skimage("retina"),
    "coffee": _skimage("coffee"),
    "chelsea": _skimage("chelsea"),
}


def load_bundled_photos() -> dict[str, np.ndarray]:
    """Every available bundled RGB photo, name → uint8 (H, W, 3), in the fixed order.

    Raises:
        ModuleNotFoundError: scikit-image (which ships the photos) is not installed.
    """
    require_skimage()
    photos: dict[str, np.ndarray] = {}
    for name, load in BUNDLED_PHOTOS.items():
        try:
            img = load()
        except (ModuleNotFoundError, OSError, ValueError) as exc:
            # skimage raises ModuleNotFoundError ("requires pooch") for images it does not ship.
            log.info("bundled photo %s unavailable: %s", name, exc)
            continue
        if img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8:
            photos[name] = img
    return photos


def export_bundled_photos(out_dir: str | Path, *, holdout: int = 2) -> tuple[Path, Path]:
    """Write the bundled photos as PNGs to ``out_dir/train/HR`` and ``out_dir/val/HR``.

    Args:
        out_dir: destination folder (created).
        holdout: how many photos (the last ones of the fixed order, ``chelsea`` and ``coffee``
            for 2) go to the validation folder.

    Returns:
        ``(train_dir, val_dir)``. File names are ``<photo name>.png``. Idempotent: files that
        already exist with the same pixels are left alone; writes go to a temporary name
        first and are renamed, so an interrupted run never leaves a truncated PNG.
    """
    if isinstance(holdout, bool) or not isinstance(holdout, int) or holdout < 0:
        raise ValueError(f"holdout must be a non-negative int, got {holdout!r}")
    photos = load_bundled_photos()
    if holdout >= len(photos):
        raise ValueError(
            f"holdout={holdout} leaves no training photo: only {len(photos)} bundled photos are "
            f"available ({', '.join(photos)})"
        )
    out = Path(out_dir)
    train_dir, val_dir = out / "train" / "HR", out / "val" / "HR"
    try:
        train_dir.mkdir(parents=True, exist_ok=True)
        val_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputWriteError(out, describe_write_error(exc)) from exc
    names = list(photos)
    n_train = len(names) - holdout
    for i, name in enumerate(names):
        dest = (train_dir if i < n_train else val_dir) / f"{name}.png"
        stale = (val_dir if i < n_train else train_dir) / f"{name}.png"
        stale.unlink(missing_ok=True)  # a previous run with another holdout
        if dest.exists():
            try:
                with Image.open(dest) as im:
                    if np.array_equal(np.asarray(im.convert("RGB")), photos[name]):
                        continue
            except OSError:
                pass  # unreadable leftover: rewrite it
        with atomic_output(dest, "The photos written before it are complete") as tmp:
            Image.fromarray(photos[name]).save(tmp, format="PNG")
    return train_dir, val_dir
