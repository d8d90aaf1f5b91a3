"""Stopping cleanly: Ctrl-C / SIGTERM / SIGUSR1 at a step boundary, and non-finite losses.

Signals only set a flag; the loop checks :func:`sync_flags` once per step (one tiny all-reduce,
so every rank agrees and saves together) and then checkpoints and exits. A second Ctrl-C
raises KeyboardInterrupt at once, for a run stuck inside a step.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import TypeVar

import torch

from spsr_hpc import distributed as sdist
from spsr_hpc.files import OutputWriteError
from spsr_hpc.train.faults import EXIT_DATA, EXIT_NONFINITE, ExportWriteError, RunFailure

T = TypeVar("T")


class NonFiniteLossError(RunFailure):
    """A loss term became NaN/inf. Carries the step, the term and the last good checkpoint."""

    exit_code = EXIT_NONFINITE

    def __init__(self, step: int, term: str, last_checkpoint: str | None) -> None:
        self.step, self.term, self.last_checkpoint = step, term, last_checkpoint
        where = last_checkpoint or "none saved yet"
        super().__init__(
            f"non-finite loss at step {step}: term '{term}'. Last good checkpoint: {where}. "
            "Lower the learning rate, check the data, or set train.on_nonfinite=skip"
        )


class DataSkipRateError(RunFailure):
    """Too many data samples were unusable or lost; the message names the reasons and the shards."""

    exit_code = EXIT_DATA


def check_skip_rate(
    step: int,
    skipped: dict[str, int],
    used: int,
    local: torch.Tensor,
    shards: list[str],
    *,
    max_skip_rate: float | None,
    min_samples: int,
) -> None:
    """The train.max_skip_rate rule of the SR trainer and NSE pretraining.

    Raises DataSkipRateError when more than ``max_skip_rate`` of the samples read (skipped +
    ``used``, all ranks) were skipped or lost, once ``min_samples`` were read. ``skipped`` (per
    reason, all ranks) and ``used`` must be the same on every rank (they decide whether the
    collective below runs); ``local`` is this rank's (shard, reason) counts of this session, summed
    over ranks here to name the shards.
    """
    total = sum(skipped.values())
    read = total + used
    if max_skip_rate is None or read < min_samples or total <= max_skip_rate * read:
        return
    per_shard = sdist.sum_over_ranks(local.sum(1)).tolist()  # collective: every rank is here
    named = sorted(((n, str(sh)) for n, sh in zip(per_shard, shards) if n), reverse=True)
    reasons = ", ".join(f"{r} {n}" for r, n in skipped.items() if n)
    listed = ", ".join(f"{sh} ({n})" for n, sh in named[:10]) + (" ..." if len(named) > 10 else "")
    raise DataSkipRateError(
        f"step {step}: {total} of {read} data samples ({total / read:.1%}) were skipped as "
        f"unusable, above train.max_skip_rate={max_skip_rate}; by reason: {reasons}; "
        f"shards: {listed or '(none this session)'}. Rewrite or remove these shards "
        "(launch/make_shards.py), or raise train.max_skip_rate (null: never stop)"
    )


STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name)
)
"""SIGUSR1 is what ``sbatch --signal=B:USR1@<s>`` forwards before the time limit
(launch/slurm_train.sbatch): handled like SIGTERM."""


class StopSignal:
    """Context manager: SIGINT/SIGTERM/SIGUSR1 set ``self.requested`` instead of killing the process."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopSignal:
        # Signal handlers can only be installed from the main thread (not e.g. in a notebook worker).
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._old.clear()


def sync_flags(*flags: bool, device: torch.device | None = None) -> list[bool]:
    """Logical OR of each flag over all ranks (one all-reduce). Without a group: unchanged."""
    if not sdist.is_initialized() or sdist.get_world_size() == 1:
        return [bool(f) for f in flags]
    backend = torch.distributed.get_backend()
    dev = device or (sdist.local_device() if backend == "nccl" else torch.device("cpu"))
    t = torch.tensor([float(f) for f in flags], device=dev)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def export_on_rank0(what: str, write: Callable[[], T], newest: Callable[[], object]) -> T | None:
    """``write()`` on rank 0 (None elsewhere); every rank calls it. A failed write (a full disk:
    OutputWriteError, no .tmp left) ends every rank with ExportWriteError (exit status 4, rank 0
    prints), ``newest()`` naming the checkpoint; the flag all-reduce is also the barrier."""
    out, error = None, None
    if sdist.is_main_process():
        try:
            out = write()
        except OutputWriteError as e:
            error = e
    if sync_flags(error is not None)[0]:
        raise ExportWriteError(what, error, newest()) from error
    return out


def first_nonfinite(terms: dict[str, torch.Tensor | float]) -> str | None:
    """Name of the first NaN/inf term, or None. One host sync for all tensor terms."""
    names = [k for k, v in terms.items() if isinstance(v, torch.Tensor)]
    if names:
        finite = torch.stack([torch.isfinite(terms[k].detach().float()).all() for k in names]).tolist()
        for k, ok in zip(names, finite):
            if not ok:
                return k
    for k, v in terms.items():
        if not isinstance(v, torch.Tensor) and not (float("-inf") < float(v) < float("inf")):
            return k
    return None


def reduce_step_values(values: torch.Tensor, *flags: bool) -> tuple[list[float], list[bool]]:
    """Mean over ranks of ``values`` (1-D float tensor) and the OR of ``flags``: one all-reduce.

    The losses a rank computes are means over its own micro batch (equal sizes on every rank),
    so their mean over ranks is the loss of the global batch; a term that is NaN/inf on any rank
    is non-finite in the result on every rank, so all ranks agree on a skip. Without a group or
    with one rank: the values themselves (one device-to-host copy either way).
    """
    v = values.detach().float().reshape(-1)
    if not sdist.is_initialized() or sdist.get_world_size() == 1:
        return v.cpu().tolist(), [bool(f) for f in flags]
    t = torch.cat([v, torch.tensor([float(f) for f in flags], device=v.device)])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    host = t.cpu()
    n = v.numel()
    return (host[:n] / sdist.get_world_size()).tolist(), [bool(x > 0) for x in host[n:].tolist()]
