"""Atomic, complete checkpoints of a multi-engine DeepSpeed run.

Layout of one checkpoint (``<dir>/step_0001000``)::

    generator/ image_d/ grad_d/   one folder per engine: engine.save_checkpoint (module,
                                  optimizer incl. ZeRO partitions of every rank, LR scheduler)
    trainer.pt                    rank-0 state: step, EMA, anything shared (weights_only)
    rank_00000.pt, rank_00001.pt  per-rank state: RNG (python, numpy, torch, cuda), data loader
    meta.json                     written LAST; {"complete": true, "step": ..., "files": {path: bytes}}

Writes go to ``step_XXXXXXX.tmp``; every rank fsyncs, rank 0 writes meta.json (with the
manifest: every other file of the folder and its size), fsyncs and renames the folder, then
prunes: it keeps the newest ``keep_last`` checkpoints that verify and removes older ones,
damaged ones and stale ``.tmp`` folders. A crash at any point leaves the previous checkpoint as
the newest valid one. The folder must be on a filesystem all ranks see (one node: local disk;
several nodes: a shared filesystem).

A write that fails on any rank (ENOSPC, EDQUOT, EFBIG, EIO, or torch's ``inline_container``
error that a short write becomes inside ``torch.save``) is caught, the ranks agree on it (an
all-gather of each rank's failure after the writes), the ``.tmp`` folder is removed and every
rank raises :class:`CheckpointWriteError`: the path, the OS reason, the newest intact checkpoint
(exit status 4 in launch/train.py). Before a write, rank 0 compares the free space with the size
of the newest checkpoint: a warning when the next one may not fit (< 1.25x its size free), the
same error at once when it cannot (less than its size free).

Verification (:func:`verify_checkpoint`): meta.json complete, every manifest file present with
its size (a truncated or missing engine file, engine folder or rank file fails). ``resume: auto``
takes the newest checkpoint that verifies and reports each newer one it passes over, with what is
wrong; an explicit resume path that does not verify is an error saying what is wrong.

Loading: every optimizer moment takes its parameter's memory layout (:func:`match_state_layouts`:
a run may resume with another ``train.channels_last``). Our own files use
``torch.load(weights_only=True)``. DeepSpeed's engine loader uses
``torch.load(weights_only=False)`` internally (pickle): only resume from checkpoints you trust.
"""

from __future__ import annotations

import bisect
import errno
import json
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spsr_hpc import distributed as sdist
from spsr_hpc.files import describe_write_error as _describe_os_error
from spsr_hpc.preflight import StartupError
from spsr_hpc.train.faults import EXIT_CHECKPOINT, RunFailure


class ResumeError(StartupError):
    """A checkpoint that cannot be resumed (missing, damaged, or written by an incompatible run):
    one line naming it and the fix. launch/train.py and launch/pretrain_nse.py print it as one
    ``error:`` line and exit with status 2, before any step."""


def resume_loader(loader: Any, state: dict[str, Any], path: str | Path) -> None:
    """``loader.load_state_dict(state)``; a data setting that changed since the checkpoint (seed,
    batch size, workers, shuffle buffer, the shards) is a :class:`ResumeError` naming it and the
    checkpoint (one ``error:`` line, exit status 2) instead of a ValueError traceback."""
    try:
        loader.load_state_dict(state)
    except ValueError as e:
        raise ResumeError(f"{path}: {e}") from None


CHECKPOINT_PREFIX = "step_"
META_NAME = "meta.json"
TRAINER_NAME = "trainer.pt"
_NAME_RE = re.compile(r"^step_(\d+)$")

__all__ = [
    "CheckpointWriteError",
    "capture_rng_state",
    "checkpoint_name",
    "find_latest",
    "is_complete",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "read_meta",
    "resolve_resume",
    "restore_rng_state",
    "save_checkpoint",
    "verify_checkpoint",
]
_ANY_RE = re.compile(r"^step_(\d+)(\.tmp)?$")


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


def _manifest(root: Path) -> dict[str, int]:
    """Every file under ``root`` except meta.json, as relative path -> size in bytes."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            f = Path(dirpath) / name
            rel = f.relative_to(root).as_posix()
            if rel != META_NAME:
                out[rel] = f.stat().st_size
    return dict(sorted(out.items()))


def verify_checkpoint(path: str | Path) -> list[str]:
    """What is wrong with a checkpoint folder ([] = it verifies). Reads only meta.json and stats.

    With a manifest (written by this version): every listed file must exist with its size.
    Without one (older checkpoints): trainer.pt, every engine folder (non-empty) and every rank
    file of the world size in meta.json must exist.
    """
    p = Path(path)
    if not p.is_dir():
        return [f"{p} is not a folder"]
    meta = read_meta(p)
    if meta is None or meta.get("complete") is not True:
        return [f"no {META_NAME} marked complete (the save did not finish)"]
    problems: list[str] = []
    files = meta.get("files")
    if isinstance(files, dict):
        tops = {rel.split("/")[0] for rel in files if "/" in rel}
        gone_dirs = sorted(d for d in tops if not (p / d).is_dir())
        problems += [f"missing folder {d}/" for d in gone_dirs]
        for rel, size in files.items():
            f = p / rel
            if rel.split("/")[0] in gone_dirs:
                continue
            if not f.is_file():
                problems.append(f"missing file {rel}")
            elif f.stat().st_size != size:
                problems.append(f"{rel} has {f.stat().st_size} bytes, the manifest says {size} (truncated?)")
        return problems
    for ename in meta.get("engines", []):
        if not (p / ename).is_dir() or not any((p / ename).iterdir()):
            problems.append(f"missing engine folder {ename}/")
    if not (p / TRAINER_NAME).is_file():
        problems.append(f"missing file {TRAINER_NAME}")
    for r in range(int(meta.get("world_size", 0))):
        if not (p / f"rank_{r:05d}.pt").is_file():
            problems.append(f"missing file rank_{r:05d}.pt")
    return problems


def find_latest(ckpt_dir: str | Path, *, report: list[tuple[Path, list[str]]] | None = None) -> Path | None:
    """Newest checkpoint that verifies (half-written ``.tmp``, meta-less or damaged ones are passed
    over; each damaged complete one is appended to ``report`` as (path, problems))."""
    for _, p in reversed(list_checkpoints(ckpt_dir)):
        problems = verify_checkpoint(p)
        if not problems:
            return p
        if report is not None:
            report.append((p, problems))
    return None


def resolve_resume(resume: str, ckpt_dir: str | Path, *, log: Any = None) -> Path | None:
    """``checkpoint.resume``: "auto" (newest that verifies, else None), "none", or a path.

    ``log(text)`` (e.g. print) is told about every damaged checkpoint "auto" passes over.
    Raises ValueError for a path that is not a checkpoint or does not verify, saying why.
    """
    if resume == "none":
        return None
    if resume == "auto":
        damaged: list[tuple[Path, list[str]]] = []
        found = find_latest(ckpt_dir, report=damaged)
        if found is None and damaged:
            # Starting fresh would train from step 0 and its first save would prune these folders,
            # whose other files may be intact: the user decides.
            p, problems = damaged[0]
            raise ResumeError(
                f"checkpoint {p} is damaged ({'; '.join(problems)}) and no older checkpoint in {ckpt_dir} "
                "verifies: restore or repair it (or resume an intact copy with checkpoint.resume=<path>), "
                "or set checkpoint.resume=none to start from step 0 (its first save removes damaged "
                "checkpoints)"
            )
        if log is not None:
            for p, problems in damaged:
                log(f"[spsr] checkpoint {p} is damaged ({'; '.join(problems)}); falling back to {found}")
        return found
    p = Path(resume)
    if not is_complete(p):
        raise ResumeError(
            f"checkpoint.resume={resume!r} is not a complete checkpoint folder (step_XXXXXXX with a "
            f"{META_NAME} marked complete); use 'auto', 'none' or such a folder"
        )
    problems = verify_checkpoint(p)
    if problems:
        older = [str(q) for _, q in list_checkpoints(p.parent) if q != p and not verify_checkpoint(q)]
        raise ResumeError(
            f"checkpoint.resume={resume!r} is damaged: {'; '.join(problems)}. "
            + (f"Checkpoints that verify: {older}" if older else "No other checkpoint in its folder verifies")
        )
    return p


def prune_checkpoints(ckpt_dir: str | Path, keep_last: int, keep: Path | None = None) -> list[Path]:
    """Keep the newest ``keep_last`` checkpoints that verify (and ``keep``); remove every other
    ``step_*`` folder: older ones, damaged ones, stale ``.tmp`` ones. Returns what was removed.
    Rank 0 only, after a save (no save may be in progress in ``ckpt_dir``)."""
    root = Path(ckpt_dir)
    good = [p for _, p in list_checkpoints(root) if not verify_checkpoint(p)]
    keep_set = {p.resolve() for p in good[-keep_last:]} | ({Path(keep).resolve()} if keep else set())
    removed = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if _ANY_RE.match(p.name) and p.is_dir() and p.resolve() not in keep_set:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


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


class CheckpointWriteError(RunFailure):
    """A checkpoint could not be written (on some rank); nothing of it is left behind."""

    exit_code = EXIT_CHECKPOINT

    def __init__(self, path: Path, reason: str, newest: Path | None) -> None:
        self.path, self.reason, self.newest = path, reason, newest
        super().__init__(
            f"could not write checkpoint {path}: {reason}. Newest intact checkpoint: "
            f"{newest or 'none'}. Free space there (or raise the quota, or lower checkpoint.keep_last, "
            "or set checkpoint.dir to another filesystem), then re-run the same command: it resumes "
            "from that checkpoint (checkpoint.resume=auto)"
        )


def describe_write_error(exc: BaseException) -> str:
    """The OS reason of a failed write in words: ``[Errno 28] No space left on device (ENOSPC)``."""
    if isinstance(exc, _NoSpace):
        return exc.reason
    return _describe_os_error(exc)


class _Writes:
    """This rank's failed writes during one save (the first one is reported)."""

    def __init__(self) -> None:
        self.error: str | None = None

    def attempt(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self.error is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # OSError, torch's serialization RuntimeError, pickling errors
            self.error = f"rank {sdist.get_rank()}: writing {what}: {describe_write_error(e)}"
            return None


def _agree(error: str | None) -> list[str]:
    """Collective (also a barrier): every rank's failure message; [] when no rank failed."""
    if not sdist.is_initialized() or sdist.get_world_size() == 1:
        return [error] if error else []
    import torch.distributed as dist

    box: list[Any] = [None] * sdist.get_world_size()
    dist.all_gather_object(box, error)
    return [e for e in box if e]


class _GuardedEngineWrites:
    """Within the block, the engine's checkpoint writer records a failed write in ``writes``
    and returns instead of raising, so the rank keeps taking part in DeepSpeed's barriers of
    that save (a rank that left them would leave the others waiting); the caller then agrees."""

    def __init__(self, engine: Any, writes: _Writes, what: str) -> None:
        self.ce = getattr(engine, "checkpoint_engine", None)
        self.writes, self.what = writes, what

    def __enter__(self) -> None:
        if self.ce is None:
            return
        save, makedirs = self.ce.save, self.ce.makedirs
        self.ce.save = lambda state_dict, path, *a, **k: self.writes.attempt(
            f"{self.what} {path}", save, state_dict, path, *a, **k
        )
        self.ce.makedirs = lambda path, *a, **k: self.writes.attempt(
            f"{self.what} {path}", makedirs, path, *a, **k
        )

    def __exit__(self, *exc: object) -> None:
        if self.ce is not None:
            for name in ("save", "makedirs"):
                self.ce.__dict__.pop(name, None)


SPACE_WARN_FACTOR = 1.25


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes of a complete checkpoint (the sizes in its meta.json manifest; 0 without one)."""
    meta = read_meta(path) or {}
    files = meta.get("files")
    return sum(int(v) for v in files.values()) if isinstance(files, dict) else 0


def check_free_space(ckpt_dir: str | Path, *, log: Any = None) -> str | None:
    """Compare the free space of ``ckpt_dir``'s filesystem with the newest checkpoint's size:
    returns the reason when the next checkpoint certainly does not fit (less free than that
    size), warns through ``log`` when it may not (less than 1.25x), else None."""
    root = Path(ckpt_dir)
    latest = list_checkpoints(root)
    if not latest:
        return None
    need = checkpoint_bytes(latest[-1][1])
    if need <= 0:
        return None
    free = shutil.disk_usage(root).free
    mb = 1024 * 1024
    if free < need:
        return (
            f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)} (ENOSPC): {free / mb:.1f} MiB free on the "
            f"filesystem of {root}, the previous checkpoint {latest[-1][1].name} took {need / mb:.1f} MiB "
            "(checked before writing)"
        )
    if free < SPACE_WARN_FACTOR * need and log is not None:
        log(
            f"[spsr] warning: {free / mb:.1f} MiB free on the filesystem of {root}, a checkpoint takes "
            f"{need / mb:.1f} MiB: the next one may not fit (free space, or lower checkpoint.keep_last)"
        )
    return None


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
    writes = _Writes()

    def fail(errors: list[str]) -> None:
        if sdist.is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
        sdist.barrier()  # the .tmp folder is gone before any rank reports
        reason = errors[0] + (f" (and {len(errors) - 1} more rank(s))" if len(errors) > 1 else "")
        raise CheckpointWriteError(final, reason, find_latest(root) if root.is_dir() else None)

    if sdist.is_main_process():
        def prepare() -> None:
            root.mkdir(parents=True, exist_ok=True)
            space = check_free_space(root, log=lambda m: print(m, file=sys.stderr, flush=True))
            if space is not None:
                raise _NoSpace(space)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()

        writes.attempt(f"the folder {tmp}", prepare)
    errors = _agree(writes.error)
    if errors:
        fail(errors)
    for ename, engine in engines.items():
        with _GuardedEngineWrites(engine, writes, f"engine '{ename}'"):
            writes.attempt(
                f"engine '{ename}'", engine.save_checkpoint, str(tmp), tag=ename, save_latest=False
            )
    rank_file = tmp / f"rank_{sdist.get_rank():05d}.pt"
    writes.attempt(str(rank_file), _torch_save, rank_state, rank_file)
    if sdist.is_main_process():
        writes.attempt(str(tmp / TRAINER_NAME), _torch_save, trainer_state, tmp / TRAINER_NAME)
    sdist.barrier()
    # Each rank flushes what it (and DeepSpeed) wrote; cheap for files already on disk.
    writes.attempt(f"(fsync) {tmp}", _fsync_tree, tmp)
    errors = _agree(writes.error)
    if errors:
        fail(errors)
    if sdist.is_main_process():
        def commit() -> None:
            info = {
                "complete": True,
                "step": int(step),
                "world_size": sdist.get_world_size(),
                "engines": sorted(engines),
                "zero_stages": {n: int(e.zero_optimization_stage()) for n, e in engines.items()},
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **(meta or {}),
                "files": _manifest(tmp),
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

        writes.attempt(str(tmp / META_NAME), commit)
        if writes.error is None:
            prune_checkpoints(root, keep_last, keep=final)
    errors = _agree(writes.error)
    if errors:
        fail(errors)
    return final


class _NoSpace(OSError):
    """Raised by the free-space check before a write (its message is the whole reason)."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.ENOSPC, reason)
        self.reason = reason


def match_state_layouts(optimizer: Any) -> int:
    """Give every per-parameter optimizer state tensor (Adam's moments) its parameter's memory
    layout; values are unchanged. Returns how many tensors were re-laid.

    A checkpoint keeps the layout its moments had when saved, and ``load_state_dict`` keeps it
    too. Resumed with another ``train.channels_last`` (an fp32 NCHW run continued in bf16 with
    channels_last, or the reverse), the parameters are in one layout and their moments in the
    other. torch's fused CPU Adam (``optim.fused``, torch 2.11-2.14) reads the parameter, its
    gradient and its moments as raw memory of one layout, so it would pair each weight with
    another weight's moments, silently (measured on a tiny SPSR-G: generator weights 1.8e-4 off
    after one resumed step, about 2 lr; tests/test_train_speed.py). Under ZeRO 1/2 the moments
    are flat partitions and nothing changes.
    """
    moved = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            for key, value in (state or {}).items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    # empty_like keeps p's dense strides (channels_last or contiguous)
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
                    moved += 1
    return moved


def check_resumable(
    path: str | Path,
    meta: dict[str, Any],
    engines: dict[str, Any],
    world_size: int,
    method: tuple[str, str] | None = None,
) -> None:
    """Raise :class:`ResumeError` when the checkpoint is another objective's (``method``: the
    config key and this run's value, compared with the meta's ``method``) or DeepSpeed cannot
    load it into these engines.

    DeepSpeed 0.19.8 keeps ZeRO 0's Adam state with the module and ZeRO 1/2's in one partition
    file per rank. Loading across 0 and 1/2 fails deep inside DeepSpeed (a missing
    ``zero_pp_rank_*`` file, or ``'NoneType' object has no attribute 'copy'``), and so does a
    partitioned state on another number of ranks (it does not re-partition); each would read as a
    damaged checkpoint. ZeRO 1 <-> 2 on the same ranks loads and continues exactly, as does ZeRO 0
    on any number of ranks. Checkpoints without ``zero_stages`` in their meta are not checked.
    """
    if method is not None and meta.get("method", method[1]) != method[1]:
        key, value = method
        raise ResumeError(
            f"checkpoint {path} is from a {key}={meta['method']} run and this config trains {value}: use "
            "another logging.run_dir (or checkpoint.dir), or checkpoint.resume=none"
        )
    saved = meta.get("zero_stages") or {}
    saved_world = int(meta.get("world_size", world_size))
    for ename, engine in engines.items():
        if ename not in saved:
            continue
        was, now = int(saved[ename]), int(engine.zero_optimization_stage())
        if (was == 0) != (now == 0):
            raise ResumeError(
                f"checkpoint {path}: engine '{ename}' was saved under ZeRO stage {was} and this run uses "
                f"stage {now}; DeepSpeed cannot move Adam's state between stage 0 and stages 1/2: "
                f"resume with deepspeed.zero_stage={was}, or start a new run (checkpoint.resume=none) "
                "from its export"
            )
        if now > 0 and saved_world != world_size:
            raise ResumeError(
                f"checkpoint {path}: saved by {saved_world} rank(s) under ZeRO stage {was}, whose Adam state "
                f"is partitioned per rank; this run has {world_size}: resume on {saved_world} rank(s), or "
                "start a new run (checkpoint.resume=none) from its export"
            )


# Adam's per-group settings that come from the run config (``lr`` and ``initial_lr`` follow the
# schedule and are handled with it).
_SCHEDULED = ("params", "lr", "initial_lr")


def _run_settings(engine: Any) -> tuple[list[dict[str, Any]], tuple[list[float], list[int], float] | None]:
    """The optimizer and MultiStepLR settings an engine was built with (the run config's)."""
    groups = [{k: v for k, v in g.items() if k not in _SCHEDULED} for g in engine.optimizer.param_groups]
    s = getattr(engine, "lr_scheduler", None)
    if not isinstance(s, torch.optim.lr_scheduler.MultiStepLR):
        return groups, None
    return groups, (list(s.base_lrs), sorted(s.milestones.elements()), float(s.gamma))


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return list(a) == list(b)
    return bool(a == b)


def keep_run_settings(engine: Any, settings: Any) -> list[str]:
    """After loading a checkpoint into ``engine``: put back the run config's optimizer and LR
    schedule settings (``settings`` from before the load) wherever the checkpoint's differ, and
    return what changed, as "name old -> new".

    ``load_state_dict`` restores Adam's betas, eps, weight decay, ... and the MultiStepLR's base
    lr, milestones and gamma from the checkpoint, so a run resumed with another ``optim.lr_g`` or
    ``optim.milestones`` would train with the old ones, silently, while its config.yaml shows
    the new ones. With a new base lr, milestones or gamma the current lr is the schedule's closed
    form at the resumed step (base lr x gamma^(milestones passed)), what a run started with that
    config would use at this step. Unchanged settings are left exactly as loaded (bit-exact resume).
    """
    groups, sched = settings
    opt = engine.optimizer
    changes: list[str] = []
    for g, want in zip(opt.param_groups, groups):
        for k, v in want.items():
            if not _same(g.get(k), v):
                change = f"{k} {g.get(k)} -> {v}"
                if change not in changes:
                    changes.append(change)
                g[k] = v
    s = getattr(engine, "lr_scheduler", None)
    if sched is not None and isinstance(s, torch.optim.lr_scheduler.MultiStepLR):
        base, miles, gamma = sched
        loaded = (list(s.base_lrs), sorted(s.milestones.elements()), float(s.gamma))
        if loaded != (base, miles, gamma):
            for name, was, now in zip(("base lr", "milestones", "gamma"), loaded, sched):
                if was != now:
                    changes.append(f"{name} {was} -> {now}")
            s.base_lrs, s.milestones, s.gamma = list(base), Counter(miles), gamma
            passed = bisect.bisect_right(miles, s.last_epoch)
            for g, b in zip(opt.param_groups, base):
                g["initial_lr"], g["lr"] = b, b * gamma**passed
            s._last_lr = [g["lr"] for g in opt.param_groups]
            changes.append(f"lr now {s._last_lr[0]:g} at schedule step {s.last_epoch}")
    return changes


def load_checkpoint(
    path: str | Path,
    *,
    engines: dict[str, Any],
    load_optimizer_states: bool = True,
    log: Any = None,
    method: tuple[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Collective: restore every engine from a complete checkpoint.

    Returns (trainer_state, rank_state, meta). The rank state of this rank is required when the
    world size is unchanged; with another world size it is returned empty (RNG streams and data
    positions cannot be mapped onto a different number of ranks) and the caller decides. A
    checkpoint that cannot be loaded raises :class:`ResumeError` (:func:`check_resumable`: another
    objective's with ``method``, another ZeRO layout; a damaged file). The run config's optimizer
    settings win over the checkpoint's (:func:`keep_run_settings`); each change is passed to ``log``.
    """
    p = Path(path)
    meta = read_meta(p)
    if not is_complete(p) or meta is None:
        raise ResumeError(f"{p} is not a complete checkpoint (no {META_NAME} marked complete)")
    problems = verify_checkpoint(p)
    if problems:
        raise ResumeError(f"checkpoint {p} is damaged: {'; '.join(problems)}")
    missing = sorted(set(engines) - set(meta.get("engines", [])))
    if missing:
        raise ResumeError(
            f"checkpoint {p} has no state for engine(s) {missing} (it holds {meta.get('engines')}); "
            "was it written by a run with another objective?"
        )
    check_resumable(p, meta, engines, sdist.get_world_size(), method)

    def damaged(what: str, exc: Exception) -> ResumeError:
        return ResumeError(
            f"checkpoint {p}: could not load {what} ({type(exc).__name__}: {exc}); the checkpoint is "
            "damaged: resume from an older one (checkpoint.resume=<path>) or move this one away"
        )

    for ename, engine in engines.items():
        settings = _run_settings(engine)
        try:
            load_path, _ = engine.load_checkpoint(
                str(p), tag=ename, load_optimizer_states=load_optimizer_states,
                load_lr_scheduler_states=load_optimizer_states,
            )
        except Exception as e:  # DeepSpeed raises anything from AssertionError to pickle errors
            raise damaged(f"engine '{ename}' ({p / ename})", e) from e
        if load_path is None:
            raise ResumeError(f"DeepSpeed could not load engine '{ename}' from {p / ename}")
        if load_optimizer_states:
            match_state_layouts(engine.optimizer)
            changes = keep_run_settings(engine, settings)
            if changes and log is not None:
                log(f"[spsr] resume: engine '{ename}' takes the run config's settings, not the checkpoint's: "
                    + ", ".join(changes))
    try:
        trainer_state = torch.load(p / TRAINER_NAME, map_location="cpu", weights_only=True)
        rank_state: dict[str, Any] = {}
        if int(meta.get("world_size", -1)) == sdist.get_world_size():
            rank_file = p / f"rank_{sdist.get_rank():05d}.pt"
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise damaged("the trainer/rank state", e) from e
    return trainer_state, rank_state, meta
