"""Rank-0 run output: progress bar (or plain lines), JSONL metrics, TensorBoard, W&B, image grids.

The progress bar is drawn only when it is on (``logging.progress_bar``) and stdout is a
terminal; otherwise (a batch system's log file, a pipe) each logged step prints one plain line,
``step 120/1000 (12.0%) | g_total 0.123 ... | 45.6 img/s | eta 0:12:34``. Weights & Biases
(``logging.wandb``) is optional and off by default.

Every method is a no-op on ranks other than 0 (decided by spsr_hpc.distributed.is_main_process),
so training code calls it unconditionally.

Files under ``run_dir``: ``metrics.jsonl`` (one JSON object per logged step:
``{"step": 10, "time": ..., "loss/g_total": ..., "lr/generator": ..., "samples_per_s": ...}``),
``tb/`` (TensorBoard), ``images/step_0001000.png``.

Every step appears once in ``metrics.jsonl``: a logger that starts at ``start_step`` (a resumed
run) first moves the records of later steps (written after that checkpoint by the run that
crashed or was killed), and a torn last line, to ``metrics.discarded.jsonl``.

Values are what the trainer passes; the SR trainer passes losses already averaged over ranks
(the global batch), so rank 0's file describes the whole run, not rank 0's share.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from spsr_hpc import distributed as sdist
from spsr_hpc.files import OutputWriteError, atomic_output, describe_write_error
from spsr_hpc.labels import label_columns
from spsr_hpc.train.faults import LogWriteError

log = logging.getLogger(__name__)


def _quiet_tensorboard_writer_thread() -> None:
    """TensorBoard writes events from a thread of its own (``_AsyncWriterThread``). A failed write
    there (a full disk) ends that thread, and ``threading.excepthook`` printed its traceback; the
    writer then raises the same error in the next ``add_scalar``/``flush``, which RunLogger
    reports as its one line. Drop the thread's copy (only OSErrors of TensorBoard's own thread)."""
    if getattr(threading.excepthook, "_spsr_tensorboard", False):
        return
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        thread = type(args.thread)
        if (isinstance(args.exc_value, OSError) and thread.__name__ == "_AsyncWriterThread"
                and thread.__module__.startswith("tensorboard.")):
            return
        previous(args)

    hook._spsr_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def image_grid(
    lr: torch.Tensor,
    sr: torch.Tensor,
    hr: torch.Tensor,
    extra: list[torch.Tensor] | None = None,
    max_images: int = 4,
    labels: list[str] | None = None,
) -> torch.Tensor:
    """One row per sample: LR (nearest-upsampled) | SR | HR | extra maps (e.g. gradient maps).

    lr: (B, 3, h, w), sr/hr: (B, 3, H, W) float in [0, 1]; extra: (B, C, H', W') maps, each
    rescaled to [0, 1] by its own max and resized to H x W. Returns (3, rows*H, cols*W) float
    in [0, 1] on CPU; with `labels` (one per column) a header strip of
    spsr_hpc.labels.header_height(lines) rows above it names the columns (a label wider than
    its column wraps onto more lines).
    """
    n = min(max_images, lr.shape[0])
    size = hr.shape[-2:]
    cols = [F.interpolate(lr[:n].float(), size=size, mode="nearest"), sr[:n].float(), hr[:n].float()]
    for m in extra or []:
        m = m[:n].float()
        if m.shape[1] != 3:
            m = m.mean(1, keepdim=True).expand(-1, 3, -1, -1)
        if m.shape[-2:] != size:
            m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        cols.append(m / m.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8))
    rows = torch.cat([torch.cat([c[i] for c in cols], dim=2) for i in range(n)], dim=1)
    grid = rows.detach().clamp(0, 1).cpu()
    if labels is None:
        return grid
    if len(labels) != len(cols):
        raise ValueError(f"image_grid: {len(labels)} labels for {len(cols)} columns")
    u8 = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    labelled = label_columns(np.ascontiguousarray(u8), labels)
    return torch.from_numpy(labelled).permute(2, 0, 1).float() / 255


def save_png(img: torch.Tensor, path: str | Path) -> Path:
    """img: (3, H, W) float in [0, 1] -> 8-bit PNG."""
    from PIL import Image

    p = Path(path)
    arr = (img.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    with atomic_output(p) as tmp:  # whole or not at all; OutputWriteError names the file
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(arr)).save(tmp, format="PNG")
    return p


class RunLogger:
    """Progress bar + JSONL + TensorBoard + image grids, on rank 0 only.

    A failed write (a full disk, a quota) does not raise: the first one is kept in
    :attr:`write_error` (the path and the OS reason), the files are closed, and the log lines go on
    to stdout. The trainers read it, stop at the next step with a checkpoint, and exit with
    status 4 (:class:`spsr_hpc.train.faults.LogWriteError`). Opening the files at start does raise
    that error at once.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = True,
        progress_bar: bool = True,
        jsonl_name: str = "metrics.jsonl",
        sample_unit: str = "img",
        wandb_project: str | None = None,
        wandb_config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = sdist.is_main_process()
        self.sample_unit = sample_unit  # progress-bar label of samples_per_s (NSE pretraining: "anchor")
        self.run_dir = Path(run_dir)
        self._tb = None
        self._bar = None
        self._jsonl = None
        self._wandb = None
        self._t_last = time.perf_counter()
        self._t_start, self._start_step, self.total_steps = self._t_last, start_step, total_steps
        self._step_last = start_step
        self._bar_step = start_step
        self.write_error: str | None = None
        if not self.enabled:
            return
        path = self.run_dir / jsonl_name
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            truncate_jsonl(path, start_step)
            self._jsonl = path.open("a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                _quiet_tensorboard_writer_thread()
                path = self.run_dir / "tb"
                self._tb = SummaryWriter(log_dir=str(path), purge_step=start_step or None)
        except OutputWriteError as e:
            raise LogWriteError(f"{e.path}: {e.reason}", start_step, None) from e
        except OSError as e:
            raise LogWriteError(f"{path}: {describe_write_error(e)}", start_step, None) from e
        if progress_bar and _is_terminal():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step")
        if wandb_project:
            self._wandb = _start_wandb(wandb_project, self.run_dir, wandb_config, resume=start_step > 0)

    def progress(self, step: int, metrics: dict[str, float]) -> None:
        """Advance the bar to ``step`` and show that step's losses (every step; no file output)."""
        if self._bar is None:
            return
        self._bar.set_postfix(self._short(metrics), refresh=False)
        self._bar.update(step - self._bar_step)
        self._bar_step = step

    def _short(self, record: dict[str, Any]) -> dict[str, str]:
        short = {k.split("/")[-1]: f"{v:.3g}" for k, v in record.items() if k.startswith("loss/")}
        if record.get("data/skipped"):
            short["skipped"] = str(int(record["data/skipped"]))
        if "samples_per_s" in record:
            short[f"{self.sample_unit}/s"] = f"{record['samples_per_s']:.3g}"
        return short

    def _plain_line(self, step: int, record: dict[str, Any]) -> str:
        """``step 120/1000 (12.0%) | g_total 0.123 ... | 45.6 img/s | eta 0:12:34``."""
        parts = [f"step {step}/{self.total_steps}"
                 + (f" ({100.0 * step / self.total_steps:.1f}%)" if self.total_steps else "")]
        short = self._short(record)
        rate = short.pop(f"{self.sample_unit}/s", None)
        parts += [" ".join(f"{k} {v}" for k, v in short.items())] if short else []
        if rate is not None:
            parts.append(f"{rate} {self.sample_unit}/s")
        done, elapsed = step - self._start_step, time.perf_counter() - self._t_start
        if done > 0 and self.total_steps > step:
            eta = int(elapsed / done * (self.total_steps - step))
            parts.append(f"eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")
        return " | ".join(parts)

    def log(self, step: int, metrics: dict[str, float], *, samples: int | None = None) -> dict[str, Any]:
        """Write one JSONL record and TB scalars; ``samples`` since the last call gives samples/s."""
        now = time.perf_counter()
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        record.update({k: float(v) for k, v in metrics.items()})
        if samples is not None and now > self._t_last:
            record["samples_per_s"] = samples / (now - self._t_last)
        self._t_last = now
        if not self.enabled:
            return record
        if self._jsonl is not None:
            line = json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                               for k, v in record.items()})
            try:
                self._jsonl.write(line + "\n")
                self._jsonl.flush()
            except OSError as e:
                self._failed(self._jsonl.name, e)
        if self._tb is not None:
            try:
                for k, v in record.items():
                    if k not in ("step", "time"):
                        self._tb.add_scalar(k, v, step)
            except OSError as e:
                self._failed(self.run_dir / "tb", e)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k not in ("step", "time")}, step=step)
        if self._bar is not None:
            # Postfix first, then the update that redraws: the bar shows this step's numbers.
            self._bar.set_postfix(self._short(record), refresh=False)
            self._bar.update(max(0, step - self._bar_step))
            self._bar_step = max(self._bar_step, step)
            if self.write_error:  # the record is in this output only: print it above the bar
                self._bar.write(self._plain_line(step, record))
        elif any(k.startswith("loss/") for k in record) or "samples_per_s" in record or self.write_error:
            print(self._plain_line(step, record), flush=True)
        self._step_last = step
        return record

    def log_images(self, step: int, tag: str, grid: torch.Tensor) -> Path | None:
        """grid: (3, H, W) float in [0, 1]; saved as images/<tag>_step_XXXXXXX.png and to TB."""
        if not self.enabled or self.write_error:
            return None
        path = self.run_dir / "images" / f"{tag}_step_{step:07d}.png"
        try:
            save_png(grid, path)
            if self._tb is not None:
                self._tb.add_image(tag, grid, step)
        except OutputWriteError as e:
            self._failed(path, e.reason)
            return None
        except OSError as e:
            self._failed(self.run_dir / "tb", e)
            return None
        return path

    def _failed(self, path: str | Path, exc: OSError | str) -> None:
        """Keep the first failed write, close the files (quietly: their buffers cannot be written
        either), and go on printing the log lines."""
        if self.write_error is None:
            reason = exc if isinstance(exc, str) else describe_write_error(exc)
            self.write_error = f"{path}: {reason}"
            self.message(f"[spsr] could not write {self.write_error}; logging to stdout only; every rank "
                         "stops with a checkpoint")
        for f in (self._jsonl, self._tb):
            with contextlib.suppress(Exception):
                if f is not None:
                    f.close()
        self._jsonl = self._tb = None

    def message(self, text: str) -> None:
        """Print a line on rank 0 without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def flush(self) -> None:
        """Write what the files buffer (a failure goes to :attr:`write_error`, as in :meth:`log`)."""
        self._each_file("flush")

    def _each_file(self, method: str) -> None:
        """``flush`` or ``close`` TensorBoard's writer and the metrics file; a failed write (the
        buffered tail) goes to :meth:`_failed`."""
        for f, path in ((self._tb, self.run_dir / "tb"), (self._jsonl, None)):
            if f is None:
                continue
            try:
                getattr(f, method)()
            except OSError as e:
                self._failed(path or f.name, e)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._bar is not None:
            self._bar.close()
        # flush first: TensorBoard's close does not report a write its thread failed (flush does).
        self._each_file("flush")
        self._each_file("close")
        self._bar = self._tb = self._jsonl = None


def open_run_logs(run_dir: str | Path, cfg: Any, **kwargs: Any) -> RunLogger:
    """Write ``config.yaml`` (rank 0) and open the :class:`RunLogger` (``kwargs``). Every rank
    calls it: a failed write on rank 0 ends every rank with :class:`LogWriteError` (one flag
    all-reduce) before any step, instead of rank 0 alone (the others waiting for it)."""
    from spsr_hpc.config import save_resolved
    from spsr_hpc.train.guards import sync_flags

    start = int(kwargs.get("start_step", 0))
    error: LogWriteError | None = None
    logger = None
    if sdist.is_main_process():
        try:
            save_resolved(cfg, Path(run_dir) / "config.yaml")
        except OutputWriteError as e:
            error = LogWriteError(f"{e.path}: {e.reason}", start, None)
    if error is None:
        try:
            logger = RunLogger(run_dir, **kwargs)
        except LogWriteError as e:
            error = e
    if sync_flags(error is not None)[0]:
        if logger is not None:
            logger.close()
        raise error or LogWriteError(f"rank 0's run folder {run_dir}", start, None)
    assert logger is not None
    return logger


def truncate_jsonl(path: str | Path, last_step: int) -> int:
    """Keep the records of steps <= ``last_step`` in a metrics file; move the others (and lines
    that do not parse, e.g. torn by a kill) to ``<stem>.discarded.jsonl``. Returns how many moved.

    The file is replaced atomically (a kill during the rewrite leaves the old or the new one).
    """
    p = Path(path)
    if not p.is_file():
        return 0
    keep, drop = [], []
    with p.open() as f:
        for line in f:
            if not line.strip():
                continue
            try:
                step = json.loads(line).get("step")
            except (json.JSONDecodeError, AttributeError):
                step = None
            good = isinstance(step, int) and step <= last_step and line.endswith("\n")
            (keep if good else drop).append(line if line.endswith("\n") else line + "\n")
    if not drop:
        return 0
    with p.with_name(p.stem + ".discarded" + p.suffix).open("a") as f:
        f.writelines(drop)
    with atomic_output(p) as tmp, tmp.open("w") as f:
        f.writelines(keep)
        f.flush()
        os.fsync(f.fileno())
    return len(drop)


def _is_terminal() -> bool:
    """stdout is an interactive terminal (not a batch system's log file or a pipe)."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


WANDB_MISSING = (
    "logging.wandb=true needs the `wandb` package, which is not installed: pip install wandb "
    "(or set logging.wandb=false; TensorBoard and metrics.jsonl are always written)"
)


def _start_wandb(project: str, run_dir: Path, config: dict[str, Any] | None, *, resume: bool) -> Any:
    """One W&B run per run folder (its id is kept in run_dir/wandb_id, so a resume continues it)."""
    try:
        import wandb
    except ImportError as e:
        raise ModuleNotFoundError(WANDB_MISSING) from e
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
    run = wandb.init(project=project, dir=str(run_dir), config=config, name=run_dir.name,
                     id=run_id, resume="allow" if run_id else None)
    id_file.write_text(str(run.id))
    return run


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file.

    A last line cut short (no newline and no JSON: a run killed mid-write, or one still writing)
    is left out with a warning; the resume moves it to ``metrics.discarded.jsonl``. Any other
    line that is not a JSON object is a ValueError naming the file, the line and the fix.
    """
    p = Path(path)
    with p.open() as f:
        lines = f.readlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) and not line.endswith("\n"):
                log.warning("%s: left out its last line, cut short (%d characters, a kill mid-write)",
                            p, len(line))
                continue
            raise ValueError(f"{p} line {i} is not JSON ({e.msg}): the file is damaged; delete that "
                             "line, or move the file away") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{p} line {i} is not a JSON object but {type(rec).__name__}: the file is "
                             "damaged; delete that line, or move the file away")
        records.append(rec)
    return records
