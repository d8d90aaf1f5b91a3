"""``build_train_loader``: the one entry point the trainer uses, whatever ``data.loader`` says.

Both loaders share (in ``loader_state.py``): per-shard sample counts, the epoch length (equal on
every rank), the seeding scheme and the resume state. The loaders themselves live in
``wds_loader.py`` and ``dali_loader.py``; neither imports this module.
"""

from __future__ import annotations

import glob
from pathlib import Path

import braceexpand
import torch

from spsr_hpc.data.config import DataConfig
from spsr_hpc.data.loader_state import (
    LoaderState,
    TrainLoader,
    check_scale,
    count_samples,
    derive_seed,
    epoch_batches,
    index_path,
)
from spsr_hpc.data.shards import MANIFEST_NAME, read_manifest


def resolve_shards(spec: str | list[str]) -> list[str]:
    """Shard paths from a make_shards directory, a glob/brace pattern or a list; sorted, unique.

    Raises:
        ValueError: nothing matches, naming the pattern (and ``data.shards``).
    """
    if isinstance(spec, (list, tuple)):
        paths = [str(p) for p in spec]
    elif not spec:
        raise ValueError(
            "data.shards is empty: give a make_shards output directory, a glob or a list of .tar files"
        )
    elif Path(spec).is_dir():
        manifest = read_manifest(spec)
        paths = [str(Path(spec) / s["name"]) for s in manifest["shards"]]
    else:
        paths = []
        for pattern in braceexpand.braceexpand(spec):
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            paths += matches
    paths = sorted(dict.fromkeys(paths))
    missing = [p for p in paths if not Path(p).is_file()]
    if not paths or missing:
        raise ValueError(
            f"data.shards={spec!r} names no existing shard"
            + (f" (missing: {missing[:3]}{' ...' if len(missing) > 3 else ''})" if missing else "")
        )
    return paths


def build_train_loader(
    cfg: DataConfig,
    *,
    rank: int,
    world_size: int,
    seed: int | None = None,
    device: torch.device | str | None = None,
) -> TrainLoader:
    """The training loader of this rank.

    Args:
        cfg: the data section.
        rank, world_size: this rank and the number of ranks (from spsr_hpc.distributed).
        seed: overrides ``cfg.seed``.
        device: DALI only: a CUDA device selects the GPU pipeline when ``cfg.dali_device`` is
            "auto"; the WebDataset loader always yields CPU tensors (pinned when CUDA is present).

    Returns:
        An iterable with ``__len__`` (batches per epoch, equal on every rank), ``set_epoch``,
        ``state_dict`` and ``load_state_dict``. Each batch is
        ``{"lr": (B, 3, p, p), "hr": (B, 3, s·p, s·p)}`` float32 in [0, 1]
        (``{"hr": (B, 3, P, P)}`` with ``hr_only``). Iterating yields one epoch and then moves
        to the next epoch.

    Raises:
        ValueError: no shards, shards made at another scale (the first sample of each is
            checked), or a rank/worker that would get no data (the message names the shard and
            sample counts, ranks and workers).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    shards = resolve_shards(cfg.shards)
    counts = [count_samples(s) for s in shards]
    if not cfg.hr_only:
        check_scale(shards, cfg.scale)  # both loaders: DALI would crop misaligned pairs in silence
    seed = cfg.seed if seed is None else seed
    if cfg.loader == "webdataset":
        from spsr_hpc.data.wds_loader import WebDatasetLoader

        return WebDatasetLoader(cfg, shards, counts, rank=rank, world_size=world_size, seed=seed)
    if cfg.loader == "dali":
        from spsr_hpc.data.dali_loader import DaliLoader

        return DaliLoader(cfg, shards, counts, rank=rank, world_size=world_size, seed=seed, device=device)
    raise ValueError(f"data.loader must be 'webdataset' or 'dali', got {cfg.loader!r}")


__all__ = [
    "MANIFEST_NAME",
    "LoaderState",
    "TrainLoader",
    "build_train_loader",
    "count_samples",
    "derive_seed",
    "epoch_batches",
    "index_path",
    "resolve_shards",
]
