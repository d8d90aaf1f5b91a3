"""State and helpers shared by both training loaders (WebDataset and DALI).

Per-shard sample counts, the DALI index path, the epoch length (equal on every rank), the
seeding scheme and the resume position. ``loader.py`` (the entry point), ``wds_loader.py`` and
``dali_loader.py`` all import from here and never from each other.
"""

from __future__ import annotations

import hashlib
import json
import math
import tarfile
from pathlib import Path
from typing import Any, Protocol

from spsr_hpc.data.config import DataConfig


class TrainLoader(Protocol):
    """What the trainer relies on (both loaders implement it)."""

    def __iter__(self): ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ShardReadError(RuntimeError):
    """A loader cannot go on reading its shards (DALI stops its pipeline at an undecodable
    image); the message names the shards and the fix. The trainer ends with exit status 6."""


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk (its first 24 bytes), or None."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _first_pair(shard: str) -> tuple[str, dict[str, tuple[int, int]]] | None:
    """The first sample of a shard: its key and the IHDR sizes of its hr.png / lr.png (reads the
    first members only)."""
    sizes: dict[str, tuple[int, int]] = {}
    first = None
    try:
        with tarfile.open(shard, "r|") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")
                if first is None:
                    first = key
                if key != first:
                    break
                if ext in ("hr.png", "lr.png"):
                    f = tar.extractfile(m)
                    size = png_size(f.read(24) if f is not None else b"")
                    if size is not None:
                        sizes[ext[:2]] = size
    except (tarfile.TarError, OSError, EOFError):
        return None  # damaged: the run's own checks and find_damage name it
    return (first, sizes) if first is not None else None


def check_scale(shards: list[str], scale: int) -> None:
    """Refuse shards whose first sample is not LR x ``scale`` = HR, before any batch. DALI slices
    the HR at ``scale`` x the LR crop without looking: shards made at a higher scale than
    data.scale gave misaligned pairs in silence (x4 shards at scale 2: LR 8x8 against a quarter of
    the HR area), a lower one a slice error blamed on damage; the WebDataset loader skipped every
    sample as a size mismatch and stopped after 101. One tar read of the first members per shard
    (a manifest-less shard list or the Python API: preflight's manifest check does not see these)."""
    wrong = []
    for sh in shards:
        first = _first_pair(sh)
        if first is None or set(first[1]) != {"hr", "lr"}:
            continue
        key, sizes = first
        (lw, lh), (hw, hh) = sizes["lr"], sizes["hr"]
        if (lw * scale, lh * scale) != (hw, hh):
            made = f" (made at scale {hw // lw})" if lw and hw % lw == 0 and (hw // lw) * lh == hh else ""
            wrong.append(f"{sh}: sample {key} has LR {lw}x{lh} and HR {hw}x{hh}{made}")
    if wrong:
        more = " ..." if len(wrong) > 3 else ""
        raise ValueError(
            f"data.scale={scale} does not fit the shards: {'; '.join(wrong[:3])}{more}; set data.scale to "
            "the shards' scale or use shards made at this one (launch/make_shards.py --scale)"
        )


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, rank, worker, epoch, ...), stable across runs and platforms."""
    digest = hashlib.sha256(json.dumps([int(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def index_path(shard: str) -> Path:
    """The DALI index next to a shard: ``x.tar`` → ``x.idx``."""
    p = Path(shard)
    return p.with_name(p.name[: -len(".tar")] + ".idx") if p.name.endswith(".tar") else p.with_suffix(".idx")


def count_samples(shard: str) -> int:
    """Samples in a shard: from its .idx header when present, else by listing the tar's members."""
    idx = index_path(shard)
    if idx.is_file():
        with idx.open() as f:
            header = f.readline().split()
        if len(header) == 2 and header[1].isdigit():
            return int(header[1])
    keys: set[str] = set()
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.isfile():
                    name = member.name.rsplit("/", 1)[-1]
                    keys.add(member.name[: len(member.name) - len(name)] + name.split(".", 1)[0])
    except (tarfile.TarError, OSError):
        pass  # a damaged tar counts what could be listed; the loaders skip the rest
    return len(keys)


def shard_set(shards: list[str], counts: list[int]) -> str:
    """What a loader reads, for its resume check: shard file names (not folders: a moved copy is
    the same data) and their sample counts, as ``"12 shard(s), 3456 samples, <digest>"``."""
    names = [Path(s).name for s in shards]
    digest = hashlib.sha256(json.dumps([names, [int(c) for c in counts]]).encode()).hexdigest()[:12]
    return f"{len(shards)} shard(s), {sum(counts)} samples, {digest}"


def epoch_batches(cfg: DataConfig, total_samples: int, world_size: int) -> int:
    """Batches per epoch per rank, the same on every rank."""
    if cfg.batches_per_epoch is not None:
        return cfg.batches_per_epoch
    samples = cfg.samples_per_epoch if cfg.samples_per_epoch is not None else total_samples
    return max(1, math.ceil(samples / (cfg.batch_size * world_size)))


class LoaderState:
    """Epoch and position shared by both loaders (the resume granularity is one batch)."""

    def __init__(self, seed: int, rank: int, world_size: int, batches_per_epoch: int):
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batches_per_epoch = batches_per_epoch
        self.epoch = 0
        self.consumed = 0  # batches of the current epoch already handed out

    def set_epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def advance(self) -> None:
        self.consumed += 1
        if self.consumed >= self.batches_per_epoch:
            self.epoch, self.consumed = self.epoch + 1, 0

    def state_dict(self, **extra: Any) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches_consumed": self.consumed,
            "batches_per_epoch": self.batches_per_epoch,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            **extra,
        }

    def load_state_dict(self, state: dict[str, Any], **expect: Any) -> None:
        checks = {
            "seed": self.seed,
            "world_size": self.world_size,
            "batches_per_epoch": self.batches_per_epoch,
            **expect,
        }
        for key, ours in checks.items():
            if key in state and state[key] != ours:
                raise ValueError(
                    f"loader state was saved with {key}={state[key]!r} but this loader has {key}={ours!r}; "
                    "the data order would not continue where it stopped. Resume with the same data settings"
                )
        epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        if not 0 <= consumed < self.batches_per_epoch:
            raise ValueError(f"batches_consumed={consumed} outside [0, {self.batches_per_epoch})")
        self.epoch, self.consumed = epoch, consumed


__all__ = [
    "LoaderState",
    "ShardReadError",
    "TrainLoader",
    "check_scale",
    "count_samples",
    "derive_seed",
    "epoch_batches",
    "index_path",
    "png_size",
    "shard_set",
]
