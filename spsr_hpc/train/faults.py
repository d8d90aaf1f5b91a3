"""How a run ends when something outside the model fails: exit codes, collective timeouts, the
step watchdog and the NCCL settings that make a frozen peer end a job instead of hanging it.

Exit codes of launch/train.py and launch/pretrain_nse.py (docs/cluster.md lists them too):

====  ==========================================================================================
0     finished train.max_steps
1     an unexpected error (a Python traceback: a bug, or a fault not covered below)
2     bad config or inputs, found before any model is built (one ``error:`` line per problem)
3     stopped by SIGTERM / SIGINT / SIGUSR1 after the step finished and a checkpoint was written;
      re-running the same command resumes (checkpoint.resume=auto)
4     a checkpoint, the weights export or the run's logs could not be written (disk full, quota,
      file size limit, I/O error); the newest intact checkpoint is named in the ``error:`` line
      (after a failed log write every rank first stops with a new one). The other tools use 4
      for any output they could not write (spsr_hpc/files.py).
5     a collective timed out or a peer was lost (a frozen or dead node), or the watchdog saw no
      progress for train.collective_timeout_s + grace
6     more data samples were lost than train.max_skip_rate allows, or the DALI loader stopped at
      a sample it cannot read (an undecodable image, a truncated shard: DALI cannot skip one)
7     a non-finite loss with train.on_nonfinite=stop
====  ==========================================================================================

Each of the codes 3-7 comes with one ``error:`` line (3: an ``[spsr] stopped`` line) naming the
step and the newest intact checkpoint.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from collections.abc import Callable

from spsr_hpc.files import write_advice

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_STOPPED = 3
EXIT_CHECKPOINT = 4
EXIT_COLLECTIVE = 5
EXIT_DATA = 6
EXIT_NONFINITE = 7

EXIT_CODES = {
    EXIT_OK: "finished",
    EXIT_ERROR: "unexpected error (traceback)",
    EXIT_CONFIG: "bad config or inputs (before any model is built)",
    EXIT_STOPPED: "stopped by a signal after saving a checkpoint (re-run to resume)",
    EXIT_CHECKPOINT: "a checkpoint, the weights export or the run's logs could not be written",
    EXIT_COLLECTIVE: "a collective timed out or a peer was lost",
    EXIT_DATA: "too many data samples lost (train.max_skip_rate), or DALI stopped at bad data",
    EXIT_NONFINITE: "non-finite loss (train.on_nonfinite=stop)",
}


class RunFailure(RuntimeError):
    """A fault the run reports in one ``error:`` line and ends with ``exit_code``."""

    exit_code = EXIT_ERROR
    every_rank = False  # print on every rank (a fault where rank 0 itself may be the one lost)


class ExportWriteError(RunFailure):
    """The weights export (generator.safetensors, nse.safetensors) could not be written; the
    checkpoint written before it holds the same weights, and a re-run resumes and exports."""

    exit_code = EXIT_CHECKPOINT

    def __init__(self, what: str, error: BaseException | None, newest: object) -> None:
        # error: rank 0's OutputWriteError; None on the other ranks (they raise, rank 0 prints)
        reason = getattr(error, "reason", None) or "rank 0 could not write it"
        path = getattr(error, "path", "")
        fix = write_advice(reason) or "Fix that"
        super().__init__(
            f"could not write the {what} {path}: {reason}. Newest intact checkpoint: {newest or 'none'}. "
            f"{fix}, then re-run the same command: it resumes from that checkpoint and writes the export"
        )


class LogWriteError(RunFailure):
    """The run's logs (metrics.jsonl, TensorBoard, image grids, config.yaml) could not be written.
    Mid-run, every rank stopped at the next step and saved a checkpoint first."""

    exit_code = EXIT_CHECKPOINT

    def __init__(self, reason: str, step: int, checkpoint: object) -> None:
        self.reason = reason
        where = (f"Stopped at step {step} with checkpoint {checkpoint}; the steps since the failure are "
                 "in this output only" if checkpoint else "Nothing was trained in this run")
        fix = write_advice(reason)
        fix = f"{fix}, or set logging.run_dir elsewhere" if fix else "Set logging.run_dir elsewhere"
        super().__init__(
            f"could not write {reason}. {where}. {fix}, then re-run the same command: it resumes from the "
            "newest checkpoint"
        )


class CollectiveTimeoutError(RunFailure):
    """A collective did not complete (a frozen or dead peer), or a step made no progress."""

    exit_code = EXIT_COLLECTIVE
    every_rank = True


def grace_s(timeout_s: float) -> float:
    """How long past ``timeout_s`` the watchdog waits before it ends the process itself:
    10 % of the timeout, at least 10 s and at most 60 s."""
    return min(60.0, max(10.0, 0.1 * float(timeout_s)))


def timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=float(seconds))


NCCL_ENV_DEFAULTS = {
    # A failed or timed-out NCCL collective tears the process down (instead of a hang); torch
    # >= 2.2 defaults to 3 (tear down + clean up) already; older ones did nothing by default.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
}


def set_nccl_env_defaults(timeout_s: float) -> dict[str, str]:
    """Set the NCCL watchdog variables that are not set yet (a user's value always wins);
    returns what was set. Must run before the process group starts."""
    wanted = dict(NCCL_ENV_DEFAULTS)
    # The NCCL heartbeat monitor kills a process whose NCCL watchdog thread itself hangs; give it
    # the collective timeout plus the grace, so it never fires before the collective timeout.
    wanted["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] = str(int(timeout_s + grace_s(timeout_s)))
    done = {}
    for key, value in wanted.items():
        if key not in os.environ and (key != "TORCH_NCCL_ASYNC_ERROR_HANDLING"
                                      or "NCCL_ASYNC_ERROR_HANDLING" not in os.environ):
            os.environ[key] = value
            done[key] = value
    return done


def is_collective_failure(exc: BaseException) -> bool:
    """An exception raised by a process-group backend: a timeout or a lost peer."""
    import torch.distributed as dist

    backend_error = getattr(dist, "DistBackendError", None)
    if backend_error is not None and isinstance(exc, backend_error):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    # gloo: "Timed out waiting ... for recv", "Application timeout caused pair closure" (a peer
    # stopped answering inside a barrier/all-reduce), "Connection closed/reset by peer";
    # NCCL: the watchdog's abort messages.
    marks = ("Timed out waiting", "timeout caused pair closure", "Connection closed by peer",
             "Connection reset by peer", "NCCL communicator was aborted", "Watchdog caught collective")
    return any(m in text for m in marks)


def collective_failure(
    phase: str, exc: BaseException, timeout_s: float, newest: object
) -> CollectiveTimeoutError:
    """The error for a collective that timed out or lost its peer during ``phase``."""
    text = " ".join(str(exc).split())[:300]
    if "Timed out" in text or "timeout" in text.lower():
        what = (f"did not complete within train.collective_timeout_s={timeout_s:g} s: a peer rank is "
                "frozen or gone")
    else:
        what = "failed: a peer rank is gone (killed, crashed, or its node lost)"
    return CollectiveTimeoutError(
        f"{phase} {what} ({type(exc).__name__}: {text}). Newest intact checkpoint: {newest or 'none'}. "
        f"Exit status {EXIT_COLLECTIVE}; re-run to resume from it (checkpoint.resume=auto)"
    )


def leave_after_data_error() -> int:
    """After this rank's data loader stopped (the ``error:`` line printed): with several ranks,
    end the process at once with EXIT_DATA, so that the peers waiting for it in a collective fail
    now ("a peer rank is gone", status 5) and the launcher ends the job, instead of waiting for
    train.collective_timeout_s. With one rank, return EXIT_DATA (a normal exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_DATA)
    return EXIT_DATA


def error_line(exc: BaseException, rank: int | None = None) -> str:
    """``error: ...`` (one line) for a RunFailure; ``rank k:`` prefixed when given."""
    text = " ".join(str(exc).split())
    return f"error: {f'rank {rank}: ' if rank is not None else ''}{text}"


class Watchdog:
    """A daemon thread that ends this process when the training loop makes no progress.

    The loop calls :meth:`beat` with a description of what it is about to do (``"step 12: the
    step's collectives"``); when no beat comes for ``limit_s`` seconds the thread prints one
    ``error:`` line naming that phase and the newest intact checkpoint (``newest()``) and calls
    ``os._exit(EXIT_COLLECTIVE)``: a rank stuck where no timeout reaches it (a data-loader
    worker, a barrier of a library, a hung file system) still ends. A collective that times out
    normally raises earlier (at train.collective_timeout_s) and is reported by the trainer.
    """

    def __init__(self, limit_s: float, *, newest: Callable[[], object], rank: int,
                 exit: Callable[[int], None] = os._exit, poll_s: float | None = None) -> None:
        self.limit_s = float(limit_s)
        self.newest, self.rank, self._exit = newest, rank, exit
        self.poll_s = poll_s if poll_s is not None else min(1.0, self.limit_s / 10)
        self.phase = "start-up"
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fired = False

    def beat(self, phase: str) -> None:
        self.phase = phase
        self._last = time.monotonic()

    def pause(self) -> None:
        """Until the next beat, no deadline (e.g. while an exception is being reported)."""
        self._last = float("inf")

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self._last
            if idle > self.limit_s:
                self.fired = True
                try:
                    newest = self.newest()
                except Exception as e:  # the report must not fail
                    newest = f"unknown ({e})"
                print(
                    f"error: rank {self.rank}: no progress for {idle:.0f} s (limit "
                    f"train.collective_timeout_s + grace = {self.limit_s:.0f} s) in {self.phase}: a peer "
                    f"rank is frozen or gone, or this rank is stuck (data loader, file system). Newest "
                    f"intact checkpoint: {newest or 'none'}. Exit status {EXIT_COLLECTIVE}; re-run to resume "
                    "from it (checkpoint.resume=auto)",
                    file=sys.stderr, flush=True,
                )
                self._exit(EXIT_COLLECTIVE)
                return

    def __enter__(self) -> Watchdog:
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="spsr-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


__all__ = [
    "EXIT_CHECKPOINT", "EXIT_CODES", "EXIT_COLLECTIVE", "EXIT_CONFIG", "EXIT_DATA", "EXIT_ERROR",
    "EXIT_NONFINITE", "EXIT_OK", "EXIT_STOPPED", "CollectiveTimeoutError", "ExportWriteError",
    "LogWriteError", "RunFailure",
    "Watchdog",
    "collective_failure", "error_line", "grace_s", "is_collective_failure", "leave_after_data_error",
    "set_nccl_env_defaults", "timedelta",
]
