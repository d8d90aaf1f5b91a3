"""Atomic, complete checkpoints of a multi-engine DeepSpeed run.

Layout of one checkpoint (``<dir>/step_0001000``)::

    generator/ image_d/ grad_d/   one folder per engine: engine.save_checkpoint (module,
                                  optimizer incl. ZeRO partitions of every rank, LR scheduler)
    trainer.pt                    rank-0 state: step, EMA, anything shared (weights_only)
    rank_00000.pt, rank_00001.pt  per-rank state: RNG (python, numpy, torch, cuda), data loader
    meta.json                     written LAST; {"complete": true, "step": ..., ...}

Writes go to ``step_XXXXXXX.tmp``; every rank fsyncs, rank 0 writes meta.json, fsyncs and
renames the folder, then prunes to the newest ``keep_last``. ``find_latest`` only accepts a
folder without ``.tmp`` whose meta.json says complete, so a crash at any point leaves the
previous checkpoint as the newest valid one. The folder must be on a filesystem all ranks see
(one node: local disk; several nodes: a shared filesystem).

Loading: our own files use ``torch.load(weights_only=True)``. DeepSpeed's engine loader uses
``torch.load(weights_only=False)`` internally (pickle): only resume from checkpoints you trust.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spsr_hpc import distributed as sdist

CHECKPOINT_PREFIX = "step_"
META_NAME = "meta.json"
TRAINER_NAME = "trainer.pt"
_NAME_RE = re.compile(r"^step_(\d+)$")

__all__ = [
    "capture_rng_state",
    "checkpoint_name",
    "find_latest",
    "is_complete",
    "list_checkpoints",
    "load_checkpoint",
    "read_meta",
    "resolve_resume",
    "restore_rng_state",
    "save_checkpoint",
]


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def read_meta(path: str | Path) -> dict[str, Any] | None:
    """meta.json of a checkpoint folder, or None when missing or unreadable."""
    try:
        with (Path(path) / META_NAME).open() as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def is_complete(path: str | Path) -> bool:
    p = Path(path)
    if not _NAME_RE.match(p.name) or not p.is_dir():
        return False
    meta = read_meta(p)
    return bool(meta and meta.get("complete") is True)


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``ckpt_dir`` as (step, path), oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _NAME_RE.match(p.name)
        if m and is_complete(p):
            out.append((int(m.group(1)), p))
    return sorted(out)


def find_latest(ckpt_dir: str | Path) -> Path | None:
    """Newest COMPLETE checkpoint (half-written ``.tmp`` or meta-less folders are ignored)."""
    ckpts = list_checkpoints(ckpt_dir)
    return ckpts[-1][1] if ckpts else None


def resolve_resume(resume: str, ckpt_dir: str | Path) -> Path | None:
    """``checkpoint.resume``: "auto" (newest complete, else None), "none", or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest(ckpt_dir)
    p = Path(resume)
    if not is_complete(p):
        raise ValueError(
            f"checkpoint.resume={resume!r} is not a complete checkpoint folder (step_XXXXXXX with a "
            f"{META_NAME} marked complete); use 'auto', 'none' or such a folder"
        )
    return p


# --------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states, as tensors/ints (weights_only-safe)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python_version": py[0],
        "python_state": torch.tensor(py[1], dtype=torch.int64),
        "python_gauss": py[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(int(v) for v in state["python_state"].tolist()),
                     state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_file(Path(dirpath) / name)
        _fsync_file(Path(dirpath))


def _torch_save(obj: Any, path: Path) -> None:
    with path.open("wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    *,
    engines: dict[str, Any],
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    meta: dict[str, Any] | None = None,
    keep_last: int = 3,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder.

    Args:
        engines: name -> DeepSpeed engine; each saves into ``<ckpt>/<name>/`` (all ranks write
            their ZeRO partitions).
        trainer_state: rank 0's shared state (tensors, numbers, strings, nested dicts/lists).
        rank_state: this rank's own state (RNG, data loader position).
        meta: extra JSON fields for meta.json (config hash, world size, ...).
    """
    root = Path(ckpt_dir)
    name = checkpoint_name(step)
    final = root / name
    tmp = root / f"{name}.tmp"
    if sdist.is_main_process():
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    sdist.barrier()
    for ename, engine in engines.items():
        engine.save_checkpoint(str(tmp), tag=ename, save_latest=False)
    _torch_save(rank_state, tmp / f"rank_{sdist.get_rank():05d}.pt")
    if sdist.is_main_process():
        _torch_save(trainer_state, tmp / TRAINER_NAME)
    sdist.barrier()
    # Each rank flushes what it (and DeepSpeed) wrote; cheap for files already on disk.
    _fsync_tree(tmp)
    sdist.barrier()
    if sdist.is_main_process():
        info = {
            "complete": True,
            "step": int(step),
            "world_size": sdist.get_world_size(),
            "engines": sorted(engines),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(meta or {}),
        }
        meta_path = tmp / META_NAME
        with meta_path.open("w") as f:
            json.dump(info, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_file(root)
        for _, old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    sdist.barrier()
    return final


def load_checkpoint(
    path: str | Path,
    *,
    engines: dict[str, Any],
    load_optimizer_states: bool = True,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Collective: restore every engine from a complete checkpoint.

    Returns (trainer_state, rank_state, meta). The rank state of this rank is required when the
    world size is unchanged; with another world size it is returned empty (RNG streams and data
    positions cannot be mapped onto a different number of ranks) and the caller decides.
    """
    p = Path(path)
    meta = read_meta(p)
    if not is_complete(p) or meta is None:
        raise ValueError(f"{p} is not a complete checkpoint (no {META_NAME} marked complete)")
    missing = sorted(set(engines) - set(meta.get("engines", [])))
    if missing:
        raise ValueError(
            f"checkpoint {p} has no state for engine(s) {missing} (it holds {meta.get('engines')}); "
            "was it written by a run with another objective?"
        )
    for ename, engine in engines.items():
        load_path, _ = engine.load_checkpoint(
            str(p), tag=ename, load_optimizer_states=load_optimizer_states,
            load_lr_scheduler_states=load_optimizer_states,
        )
        if load_path is None:
            raise ValueError(f"DeepSpeed could not load engine '{ename}' from {p / ename}")
    trainer_state = torch.load(p / TRAINER_NAME, map_location="cpu", weights_only=True)
    rank_state: dict[str, Any] = {}
    if int(meta.get("world_size", -1)) == sdist.get_world_size():
        rank_state = torch.load(p / f"rank_{sdist.get_rank():05d}.pt", map_location="cpu", weights_only=True)
    return trainer_state, rank_state, meta
