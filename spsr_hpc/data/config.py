"""The ``data`` section of a run config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

LOADERS = ("webdataset", "dali")
DALI_DEVICES = ("auto", "gpu", "cpu")
VERIFY_MODES = ("size", "sha256", "off")


def _positive_int(name: str, value: Any, *, allow_zero: bool = False) -> None:
    lo = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        what = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"data.{name} must be {what} int, got {value!r}")


@dataclass
class DataConfig:
    """Training data: where the shards are, which loader reads them, patches and augmentation."""

    # Shards to read: a make_shards output directory (its manifest.json lists the shards), a
    # glob or brace pattern ("data/div2k/shard-{000000..000031}.tar", "data/*.tar") or a list
    # of tar paths. DALI needs the .idx file next to each .tar (make_shards writes them).
    shards: str | list[str] = ""
    # "webdataset" (CPU worker processes) or "dali" (GPU decode and augmentation on CUDA; a
    # CPU-only DALI pipeline without a GPU).
    loader: str = "webdataset"
    # Patches per batch on each rank (the global batch is batch_size × world size).
    batch_size: int = 16
    # LR patch side in pixels; the HR patch is scale × patch_size (32 → 128 for SPSR ×4).
    patch_size: int = 32
    # SR scale; must equal the scale the shards were made with (checked when a loader is built,
    # and per sample by the WebDataset loader).
    scale: int = 4
    # HR patch side when hr_only is set (e.g. 400 for NSE pretraining); None = scale × patch_size.
    hr_patch_size: int | None = None
    # Loader worker processes per rank (webdataset); 0 = load in the training process.
    num_workers: int = 4
    # Samples held in the shuffle buffer of each worker (webdataset) or rank (DALI initial_fill).
    shuffle_buffer: int = 256
    # Batches per epoch per rank; equal on every rank, so no rank waits at an epoch end.
    # Give this or samples_per_epoch; with neither, one epoch ≈ one pass over all samples.
    batches_per_epoch: int | None = None
    # Samples per epoch over all ranks; batches_per_epoch = ceil(samples / (batch_size × world)).
    samples_per_epoch: int | None = None
    # Random horizontal flip (p = 0.5), the same on LR and HR.
    hflip: bool = True
    # Random vertical flip (p = 0.5), the same on LR and HR.
    vflip: bool = True
    # Random transpose, i.e. rotation by 90° combined with the flips (p = 0.5), the same on LR and HR.
    transpose: bool = True
    # Seed of the sample order and the augmentations (combined with rank, worker and epoch).
    seed: int = 0
    # Pin host memory of CPU batches (only takes effect when CUDA is present).
    pin_memory: bool = True
    # Batches prefetched per worker (webdataset, num_workers > 0).
    prefetch_factor: int = 2
    # Yield HR patches only ({"hr": ...}), for NSE pretraining on HR crops.
    hr_only: bool = False
    # DALI: "gpu" decodes and augments on the GPU (device="mixed"), "cpu" runs a CPU-only
    # pipeline, "auto" picks gpu when CUDA is present.
    dali_device: str = "auto"
    # DALI: CPU threads of the pipeline.
    dali_threads: int = 4
    # DALI: batches prefetched by the pipeline.
    dali_prefetch: int = 2
    # Before any model is built, compare each shard of a make_shards folder with its manifest
    # entry: "size" (byte size; a stat per shard), "sha256" (reads every byte once) or "off"
    # (YAML reads a bare off as false, which means the same).
    verify_shards: str | bool = "size"
    # Evaluation reader: folders of HR images (one per benchmark set), keyed by set name.
    val_hr_dirs: dict[str, str] = field(default_factory=dict)
    # Evaluation reader: matching LR folders by set name; a set without one gets LR made by
    # imresize(modcrop(HR), 1 / scale) and rounded to uint8, as the benchmark LR sets were.
    val_lr_dirs: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.shards, (list, tuple)):
            if not all(isinstance(s, str) for s in self.shards):
                raise ValueError(f"data.shards must be a string or a list of strings, got {self.shards!r}")
            self.shards = list(self.shards)
        elif not isinstance(self.shards, str):
            raise ValueError(f"data.shards must be a string or a list of strings, got {self.shards!r}")
        if self.loader not in LOADERS:
            raise ValueError(f"data.loader must be one of {LOADERS}, got {self.loader!r}")
        if self.verify_shards is False:
            self.verify_shards = "off"
        if self.verify_shards not in VERIFY_MODES:
            raise ValueError(f"data.verify_shards must be one of {VERIFY_MODES}, got {self.verify_shards!r}")
        if self.dali_device not in DALI_DEVICES:
            raise ValueError(f"data.dali_device must be one of {DALI_DEVICES}, got {self.dali_device!r}")
        for name in (
            "batch_size",
            "patch_size",
            "scale",
            "shuffle_buffer",
            "prefetch_factor",
            "dali_threads",
            "dali_prefetch",
        ):
            _positive_int(name, getattr(self, name))
        _positive_int("num_workers", self.num_workers, allow_zero=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"data.seed must be a non-negative int, got {self.seed!r}")
        for name in ("hr_patch_size", "batches_per_epoch", "samples_per_epoch"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.batches_per_epoch is not None and self.samples_per_epoch is not None:
            raise ValueError(
                "data.batches_per_epoch and data.samples_per_epoch are alternatives; set one of them, got "
                f"{self.batches_per_epoch} and {self.samples_per_epoch}"
            )
        if self.hr_patch_size is not None and not self.hr_only:
            raise ValueError(
                f"data.hr_patch_size ({self.hr_patch_size}) only applies with data.hr_only: true; paired "
                "training uses scale × patch_size"
            )
        for name in ("hflip", "vflip", "transpose", "pin_memory", "hr_only"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"data.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("val_hr_dirs", "val_lr_dirs"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                raise ValueError(f"data.{name} must map set names to folder paths, got {value!r}")
        unknown = set(self.val_lr_dirs) - set(self.val_hr_dirs)
        if unknown:
            raise ValueError(
                f"data.val_lr_dirs has sets without an HR folder in data.val_hr_dirs: {sorted(unknown)}"
            )

    @property
    def hr_patch(self) -> int:
        """HR patch side: hr_patch_size in hr_only mode when set, else scale × patch_size."""
        if self.hr_only and self.hr_patch_size is not None:
            return self.hr_patch_size
        return self.scale * self.patch_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        """Build from a YAML mapping; an unknown key is an error naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown key(s) in data section: {unknown}; valid keys: {sorted(names)}")
        return cls(**d)
