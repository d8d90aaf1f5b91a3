"""The WebDataset loader: tar shards read by CPU worker processes.

How data is split (every rank and worker gets disjoint samples, equal in number to one):

The samples are numbered by their position in the sorted shard list (the manifest's / .idx
counts), N in all. Rank r keeps the contiguous range [⌊r·N/W⌋, ⌊(r+1)·N/W⌋) (⌊N/W⌋ or ⌈N/W⌉
samples, whatever the shard sizes), cut among its logical workers in proportion to the batches
each draws per epoch (worker L draws batches k ≡ L mod nw). So in one epoch of the default
length every stream draws at least as many samples as it holds: every sample is read at least
once (exactly once when the epoch's draws equal the samples). A stream reads only the shards its
range touches (a shard on a boundary is read by both neighbours, each stopping at its range's
end).
Before, whole shards went to ranks and workers by stride, so streams held different numbers of
samples but drew the same number of batches: within an epoch the larger ones left samples
unread and the smaller ones repeated theirs (on a DIV2K-sized set, 0.73-1.10 reads per sample
and epoch).

Each (rank, worker) stream is infinite ("resampled"): it walks its shards in a shuffled order,
pass after pass, through a shuffle buffer that is emptied at the end of each pass (every sample
once per pass). An epoch
is a fixed number of batches, the same on every rank, so no rank waits for another at an epoch
end.

Determinism and resume: logical worker ``L`` of rank ``r`` produces global batches
``k ≡ L (mod num_workers)`` of the epoch. Its sample order and every crop/flip draw are a
function of (seed, rank, L, epoch, position in the stream) only. Resuming at batch ``k`` skips
the samples of the first ``k`` batches without decoding them (tar reads only), so a resumed run
yields the same batches as an uninterrupted one (exact to the batch; the one exception: when
corrupt samples were skipped before the resume point, the stream shifts by that many samples).
The batches depend on (seed, world size, num_workers, batch_size, shuffle_buffer): change one
and the order changes.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from spsr_hpc.data.augment import aligned_patch, random_patch
from spsr_hpc.data.config import DataConfig
from spsr_hpc.data.images import BadImageError, decode_rgb
from spsr_hpc.data.loader_state import (
    LoaderState,
    ShardReadError,
    derive_seed,
    epoch_batches,
    shard_set,
)

log = logging.getLogger(__name__)
_MAX_WARNINGS = 10  # per worker and epoch; the counter keeps counting
SKIP_REASONS = ("unreadable_tar", "missing_member", "bad_image", "size_mismatch", "too_small")
"""Why a sample was skipped: tar data that cannot be read, a sample without hr.png/lr.png, an
image that does not decode, LR x scale != HR, an image smaller than the patch.

Counts are samples, not events: when a shard's tar data stops being readable (a truncated or
damaged shard), the samples lost are the shard's count (manifest / .idx: ``counts``) that this
stream should have read from it minus those it did read, counted as ``unreadable_tar`` at each
pass over the shard; they enter the trainer's skip metrics and train.max_skip_rate."""


@dataclass(frozen=True)
class StreamPlan:
    """What one (rank, logical worker) reads: the shards its sample range touches, and the range
    ``[lo, hi)`` of global sample indices (position in the sorted shard list) it keeps."""

    shards: tuple[str, ...]
    offsets: tuple[int, ...]  # global index of each shard's first sample
    lo: int
    hi: int
    counts: tuple[int, ...] = ()  # samples of each shard (manifest / .idx)

    @property
    def num_samples(self) -> int:
        return self.hi - self.lo

    def keeps(self, index: int) -> bool:
        """Whether the sample with this global index is this stream's."""
        return self.lo <= index < self.hi

    def expected(self, si: int) -> int:
        """Samples this stream should read from its shard ``si`` in one pass."""
        return max(0, min(self.hi, self.offsets[si] + self.counts[si]) - max(self.lo, self.offsets[si]))


def plan_streams(
    shards: list[str], counts: list[int], rank: int, world_size: int, num_workers: int,
    batches_per_epoch: int | None = None,
) -> list[StreamPlan]:
    """One plan per logical worker of ``rank`` (see the module docstring).

    The rank's range is cut in proportion to the batches each logical worker draws per epoch
    (worker L draws batches k ≡ L mod nw: one more than the others when ``batches_per_epoch`` is not
    a multiple of nw, none when it is below nw); without ``batches_per_epoch``, equally."""
    nw = max(1, num_workers)
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    total = starts[-1]
    r_lo, r_hi = rank * total // world_size, (rank + 1) * total // world_size
    draws = [len(range(w, batches_per_epoch, nw)) for w in range(nw)] if batches_per_epoch else [1] * nw
    cum = [0]
    for d in draws:
        cum.append(cum[-1] + d)
    plans = []
    for w in range(nw):
        lo = r_lo + (r_hi - r_lo) * cum[w] // cum[-1]
        hi = r_lo + (r_hi - r_lo) * cum[w + 1] // cum[-1]
        idx = [j for j in range(len(shards)) if starts[j] < hi and starts[j + 1] > lo and counts[j] > 0]
        plans.append(StreamPlan(tuple(shards[j] for j in idx), tuple(starts[j] for j in idx), lo, hi,
                                tuple(counts[j] for j in idx)))
    return plans


def _to_tensor(batch: list[np.ndarray]) -> torch.Tensor:
    """list of (H, W, 3) uint8 → (B, 3, H, W) float32 in [0, 1]."""
    # numpy, single-threaded on purpose: this runs in loader workers (or the training process),
    # where torch's intra-op thread pool only competes with the trainer for cores.
    x = np.ascontiguousarray(np.stack(batch).transpose(0, 3, 1, 2)).astype(np.float32)
    x /= np.float32(255.0)
    return torch.from_numpy(x)


class _EpochStream(IterableDataset):
    """One epoch of batches for one rank; each DataLoader worker produces its share."""

    def __init__(
        self,
        cfg: DataConfig,
        plans: list[StreamPlan],
        *,
        rank: int,
        seed: int,
        epoch: int,
        start_batch: int,
        batches_per_epoch: int,
        skipped: Any,
        shard_index: dict[str, int],
    ):
        super().__init__()
        self.cfg, self.plans, self.rank, self.seed = cfg, plans, rank, seed
        self.epoch, self.start_batch, self.batches_per_epoch = epoch, start_batch, batches_per_epoch
        self.skipped = skipped  # multiprocessing.Array (shard x reason) shared with the loader
        self.shard_index = shard_index
        self._shard = 0  # index of the shard being read (for tar errors)
        self._tar_error: str | None = None  # the last tar error of the shard being read
        self._warned = 0

    def _note_skip(self, what: str, reason: str, shard: int, n: int = 1) -> None:
        with self.skipped.get_lock():
            self.skipped[shard * len(SKIP_REASONS) + SKIP_REASONS.index(reason)] += n
        if self._warned < _MAX_WARNINGS:
            self._warned += 1
            log.warning("data: skipping %s (%s): %s", "a sample" if n == 1 else f"{n} samples", reason, what)

    def _tar_handler(self, exc: Exception) -> bool:
        # Counted in samples once the shard's pass ends (_raw_samples): expected - read.
        self._tar_error = f"{type(exc).__name__}: {exc}"
        return True

    def _note_lost(self, plan: StreamPlan, si: int, read: int) -> None:
        """End of a pass over shard ``si``: count the samples it should have given and did not."""
        lost = plan.expected(si) - read
        if lost > 0:
            self._note_skip(
                f"{plan.shards[si]}: {lost} of its samples lost, the tar data stops being readable after "
                f"{read} ({self._tar_error or 'the shard ends early'}); re-run make_shards",
                "unreadable_tar", self._shard, lost,
            )
        elif self._tar_error and self._warned < _MAX_WARNINGS:
            self._warned += 1
            log.warning("data: %s: unreadable tar data after its last sample (%s)", plan.shards[si],
                        self._tar_error)

    def _raw_samples(self, plan: StreamPlan, worker: int) -> Iterator[dict]:
        """The infinite, shuffled stream of undecoded samples of one logical worker."""
        rng = random.Random(derive_seed(self.seed, self.rank, worker, self.epoch, 1))
        buffer: list[dict] = []
        # Never buffer more than the stream holds: a small data set must not wait for duplicates.
        capacity = max(1, min(self.cfg.shuffle_buffer, plan.num_samples))
        select = (lambda name: not name.endswith(".lr.png")) if self.cfg.hr_only else None
        while True:
            accepted = 0
            lost_in: list[str] = []  # shards whose tar data stopped before this stream's samples
            order = list(range(len(plan.shards)))
            rng.shuffle(order)
            for si in order:
                self._shard = self.shard_index[plan.shards[si]]
                src = [{"url": plan.shards[si]}]
                self._tar_error = None
                samples = wds.tarfile_samples(src, handler=self._tar_handler, select_files=select)
                read = 0
                for pos, sample in enumerate(samples):
                    if plan.offsets[si] + pos >= plan.hi:
                        break  # the rest of the shard is the next stream's
                    if not plan.keeps(plan.offsets[si] + pos):
                        continue
                    accepted += 1
                    read += 1
                    if len(buffer) < capacity:
                        buffer.append(sample)
                        continue
                    j = rng.randrange(len(buffer))
                    out, buffer[j] = buffer[j], sample
                    yield out
                if plan.counts:
                    self._note_lost(plan, si, read)
                    if read < plan.expected(si):
                        lost_in.append(f"{plan.shards[si]} ({self._tar_error or 'ends early'})")
            # End of a pass: the buffer's samples come out (in random order) before the next pass
            # starts, so each sample of the stream is yielded once per pass before any repeats.
            rng.shuffle(buffer)
            yield from buffer
            buffer = []
            if accepted == 0 and lost_in:
                raise ShardReadError(
                    f"rank {self.rank} worker {worker}: none of its {plan.num_samples} samples can be read: "
                    f"the tar data stops before them in {'; '.join(lost_in[:3])}. Re-run "
                    "launch/make_shards.py for that shard (data.verify_shards=size, the default, refuses a "
                    "truncated shard of a make_shards folder before start)"
                )
            if accepted == 0:
                raise RuntimeError(
                    f"rank {self.rank} worker {worker}: a full pass over its {len(plan.shards)} shard(s) "
                    f"yielded no sample (shards: {list(plan.shards)[:3]})"
                )

    def _unusable(self, plan: StreamPlan, worker: int, failures: int) -> str:
        """Why a stream gives nothing usable: the skip counts of its shards, by reason."""
        n = len(SKIP_REASONS)
        with self.skipped.get_lock():
            counts = list(self.skipped)
        found = []
        for name in plan.shards:
            row = counts[self.shard_index[name] * n:(self.shard_index[name] + 1) * n]
            why = ", ".join(f"{c} {r}" for r, c in zip(SKIP_REASONS, row) if c)
            if why:
                found.append(f"{name}: {why}")
        return (
            f"rank {self.rank} worker {worker}: {failures} consecutive unusable samples (skipped so far: "
            f"{'; '.join(found[:3]) or 'none counted'}). unreadable_tar or bad_image: a damaged shard, "
            "re-run launch/make_shards.py for it (data.verify_shards=size refuses a truncated shard of a "
            "make_shards folder before start); size_mismatch or too_small: shards made for another "
            "data.scale or smaller than the patch"
        )

    def _decode(self, sample: dict, rng: np.random.Generator) -> tuple[np.ndarray, ...] | None:
        cfg = self.cfg
        key = f"{sample.get('__url__')}:{sample.get('__key__')}"
        reason = "missing_member"
        try:
            if "hr.png" not in sample or (not cfg.hr_only and "lr.png" not in sample):
                raise BadImageError(f"{key}: missing hr.png or lr.png member")
            reason = "bad_image"
            hr, _ = decode_rgb(sample["hr.png"], key + ".hr.png")
            flips = {"hflip": cfg.hflip, "vflip": cfg.vflip, "transpose": cfg.transpose}
            if cfg.hr_only:
                p = cfg.hr_patch
                if hr.shape[0] < p or hr.shape[1] < p:
                    reason = "too_small"
                    raise BadImageError(f"{key}: HR {hr.shape[1]}x{hr.shape[0]} smaller than the patch {p}")
                return (random_patch(hr, p, rng, **flips),)
            lr, _ = decode_rgb(sample["lr.png"], key + ".lr.png")
            s, p = cfg.scale, cfg.patch_size
            if (lr.shape[0] * s, lr.shape[1] * s) != hr.shape[:2]:
                reason = "size_mismatch"
                raise BadImageError(
                    f"{key}: LR {lr.shape[1]}x{lr.shape[0]} × scale {s} != HR {hr.shape[1]}x{hr.shape[0]}"
                )
            if lr.shape[0] < p or lr.shape[1] < p:
                reason = "too_small"
                raise BadImageError(f"{key}: LR {lr.shape[1]}x{lr.shape[0]} smaller than the patch {p}")
            return aligned_patch(lr, hr, s, p, rng, **flips)
        except BadImageError as exc:
            self._note_skip(str(exc), reason, self.shard_index.get(str(sample.get("__url__")), self._shard))
            return None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if nw != len(self.plans):
            raise RuntimeError(f"stream planned for {len(self.plans)} workers runs with {nw}")
        # DataLoader hands out batch j from worker j % nw; after a resume at start_batch, batch j
        # is global batch start_batch + j, so this worker plays logical worker L.
        L = (w + self.start_batch) % nw
        first = self.start_batch + (L - self.start_batch) % nw
        ks = range(first, self.batches_per_epoch, nw)
        if not ks:
            return
        bs = self.cfg.batch_size
        stream = self._raw_samples(self.plans[L], L)
        pos = 0
        for _ in range((first // nw) * bs):  # resume: skip undecoded
            next(stream)
            pos += 1
        for _ in ks:
            items: list[tuple[np.ndarray, ...]] = []
            failures = 0
            while len(items) < bs:
                sample = next(stream)
                rng = np.random.default_rng(derive_seed(self.seed, self.rank, L, self.epoch, pos, 2))
                pos += 1
                out = self._decode(sample, rng)
                if out is None:
                    failures += 1
                    if failures > max(100, 10 * self.plans[L].num_samples):
                        raise ShardReadError(self._unusable(self.plans[L], L, failures))
                    continue
                failures = 0
                items.append(out)
            if self.cfg.hr_only:
                yield {"hr": _to_tensor([it[0] for it in items])}
            else:
                yield {"lr": _to_tensor([it[0] for it in items]), "hr": _to_tensor([it[1] for it in items])}


class WebDatasetLoader:
    """Training batches from tar shards via WebDataset and torch DataLoader workers.

    Yields ``{"lr": (B, 3, p, p), "hr": (B, 3, s·p, s·p)}`` float32 in [0, 1] on CPU (pinned
    when CUDA is present and ``pin_memory``), ``len(self)`` batches per epoch.
    """

    def __init__(
        self, cfg: DataConfig, shards: list[str], counts: list[int], *, rank: int, world_size: int, seed: int
    ):
        self.cfg, self.shards, self.counts = cfg, shards, counts
        self.rank, self.world_size = rank, world_size
        batches = epoch_batches(cfg, sum(counts), world_size)
        self.plans = plan_streams(shards, counts, rank, world_size, cfg.num_workers, batches)
        nw = max(1, cfg.num_workers)
        empty = [w for w, p in enumerate(self.plans) if p.num_samples == 0 and len(range(w, batches, nw))]
        if empty:
            raise ValueError(
                f"rank {rank} worker(s) {empty} would get no data: {len(shards)} shard(s) with {sum(counts)} "
                f"sample(s) split over {world_size} rank(s) × {nw} worker(s) drawing {batches} batch(es) "
                "per epoch. Use fewer data.num_workers, or more samples"
            )
        self.state = LoaderState(seed, rank, world_size, batches)
        self._skipped = mp.Array("q", len(shards) * len(SKIP_REASONS))
        self._shard_index = {sh: i for i, sh in enumerate(shards)}

    def __len__(self) -> int:
        return self.state.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self.state.epoch

    @property
    def num_skipped(self) -> int:
        """Corrupt or unusable samples skipped so far (all workers of this rank)."""
        return int(self.skip_counts().sum())

    skip_reasons = SKIP_REASONS

    def skip_counts(self) -> torch.Tensor:
        """Samples skipped so far by this rank's workers: (len(self.shards), len(SKIP_REASONS)) int64,
        row i for ``self.shards[i]``, columns in ``SKIP_REASONS`` order."""
        with self._skipped.get_lock():
            flat = list(self._skipped)
        return torch.tensor(flat, dtype=torch.int64).view(len(self.shards), len(SKIP_REASONS))

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` at its first batch on the next iteration (a no-op for the current epoch)."""
        self.state.set_epoch(epoch)

    def _order_settings(self) -> dict[str, Any]:
        """Settings that fix the batches' order besides seed, world size and epoch length: a
        resume with another value would read some samples twice and others not at all."""
        return {"num_workers": self.cfg.num_workers, "batch_size": self.cfg.batch_size,
                "shuffle_buffer": self.cfg.shuffle_buffer, "shards": shard_set(self.shards, self.counts)}

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batches_consumed", ...}``: the next iteration continues at that batch."""
        return self.state.state_dict(**self._order_settings(), loader="webdataset")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state, **self._order_settings())

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        cfg = self.cfg
        ds = _EpochStream(
            cfg,
            self.plans,
            rank=self.rank,
            seed=self.state.seed,
            epoch=self.state.epoch,
            start_batch=self.state.consumed,
            batches_per_epoch=self.state.batches_per_epoch,
            skipped=self._skipped,
            shard_index=self._shard_index,
        )
        if cfg.num_workers == 0:
            batches: Any = iter(ds)
        else:
            batches = DataLoader(
                ds,
                batch_size=None,
                num_workers=cfg.num_workers,
                prefetch_factor=cfg.prefetch_factor,
                pin_memory=cfg.pin_memory and torch.cuda.is_available(),
                persistent_workers=False,
            )
        for batch in batches:
            self.state.advance()
            yield batch
