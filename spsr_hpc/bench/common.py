"""Shared benchmark plumbing: timing quantiles, device peaks, provenance, CSV rows.

Every row a benchmark writes carries the device name, the peak figures used, library versions
and the git revision, so a number in the README can be traced back.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from spsr_hpc.device import device_name  # re-exported: the benchmarks import it from here


def bench_device(spec: str) -> str:
    """argparse ``type=`` of the benchmarks' ``--device``: a device torch knows and this machine
    has (an error naming the value and the fix instead of a traceback in the first timing)."""
    import argparse

    try:
        device = torch.device(spec)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{spec!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{spec}: no CUDA device is visible here; use cpu")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{spec}: the benchmarks run on cpu or cuda")
    return spec


def positive_int(text: str) -> int:
    """argparse ``type=``: an int >= 1."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def _repo_root() -> Path:
    """The checkout whose configs the benchmarks read and whose git revision their rows carry:
    ``$SPSR_REPO`` when set (scripts/gpu_check.sh sets it), else the checkout this file lies in
    (a source tree or an editable install), else the working directory (a non-editable install,
    e.g. gpu_check's throwaway ``--target`` folder, run from the repo root)."""
    if os.environ.get("SPSR_REPO"):
        return Path(os.environ["SPSR_REPO"]).resolve()
    here = Path(__file__).resolve().parents[2]
    return here if (here / "configs").is_dir() else Path.cwd()


REPO_ROOT = _repo_root()
# SPSR_RESULTS_DIR redirects every benchmark's CSV (scripts/gpu_check.sh --results DIR; tests).
RESULTS_DIR = Path(os.environ.get("SPSR_RESULTS_DIR") or REPO_ROOT / "benchmarks" / "results")

# Roofline peaks, by a substring of torch.cuda.get_device_name() (first match wins, so the
# specific names precede the generic "H100"). Sources:
# - HBM and tensor-core figures: NVIDIA's H100 datasheet (H100 SXM5: 3.35 TB/s HBM3, dense
#   TF32 494.7 / BF16 989.4 TFLOPS; H100 PCIe: 2.0 TB/s HBM2e, 378 / 756 TFLOPS; H100 NVL:
#   3.9 TB/s) and H200 datasheet (4.8 TB/s HBM3e, same GH100 compute as the H100 SXM5). The
#   datasheets print the sparse tensor figures; the dense ones are half. torch names the SXM5
#   part "NVIDIA H100 80GB HBM3". A100 from its datasheet (SXM4 80GB 2.039 TB/s, 40GB 1.555).
# - Special-function unit (MUFU: ex2, lg2, rsqrt): the CUDA C++ Programming Guide's
#   arithmetic-instruction throughput table gives 16 results per clock per SM for compute
#   capability 8.0 and 9.0 (4 per SM sub-partition, not 16 per sub-partition), times the max
#   boost clock (nvidia-smi clocks.max.sm: 1980 MHz H100 SXM5/H200, 1755 MHz H100 PCIe, 1410 MHz
#   A100) and the SM count (132 / 114 / 108): 4.18e12 ex2/s for the H100 SXM5. FlashAttention-3
#   (arXiv 2407.08608, sec. 3.1) quotes 3.9e12/s, the same 16/clk/SM at the 1830 MHz clock of
#   NVIDIA's tensor-core figures (989.4e12 = 132 SMs x 4096 flop/clk x 1.83e9).
HBM_PEAK_BYTES_PER_S = {
    "H200": 4.8e12,
    "H100 PCIe": 2.0e12,
    "H100 NVL": 3.9e12,
    "H100": 3.35e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100 80GB": 2.0e12,
    "A100": 1.555e12,
}
TENSOR_PEAK_FLOP_PER_S = {  # dense, {"bf16": .., "tf32": ..} (fp16 = bf16)
    "H200": {"bf16": 989.4e12, "tf32": 494.7e12},
    "H100 PCIe": {"bf16": 756e12, "tf32": 378e12},
    "H100": {"bf16": 989.4e12, "tf32": 494.7e12},
    "A100": {"bf16": 312e12, "tf32": 156e12},
}
SFU_PEAK_OPS_PER_S = {
    "H200": 132 * 16 * 1.98e9,
    "H100 PCIe": 114 * 16 * 1.755e9,
    "H100": 132 * 16 * 1.98e9,
    "A100": 108 * 16 * 1.41e9,
}


def _lookup(table: dict, name: str):
    for key, value in table.items():
        if key in name:
            return value
    return None


def hbm_peak(device: torch.device) -> float | None:
    return _lookup(HBM_PEAK_BYTES_PER_S, device_name(device)) if device.type == "cuda" else None


def sfu_peak(device: torch.device) -> float | None:
    return _lookup(SFU_PEAK_OPS_PER_S, device_name(device)) if device.type == "cuda" else None


def tensor_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense tensor-core flop/s for dtype (fp32 counts as tf32), or None off CUDA / unknown GPU."""
    if device.type != "cuda":
        return None
    entry = _lookup(TENSOR_PEAK_FLOP_PER_S, device_name(device))
    return None if entry is None else entry["tf32" if dtype == torch.float32 else "bf16"]


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(device: torch.device) -> dict[str, str]:
    """Columns every benchmark row carries."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "git": git_revision(),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(device)`` for CUDA (so Triton launches, streams and events belong to
    ``device``, not to the current device), else a no-op."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def cuda_elapsed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call of ``fn``, timed by CUDA events on ``device``'s current stream.

    Events recorded without a stream go to the *current* device's stream: with ``--device
    cuda:1`` they timed cuda:0 (idle) and reported near-zero times. Here the device is entered
    and the events record on its stream.
    """
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        torch.cuda.synchronize(device)
        return float(start.elapsed_time(end))


def time_quantiles(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int = 3,
    rep: int = 20,
    quantiles: tuple[float, ...] = (0.2, 0.5, 0.8),
    min_time_s: float = 0.0,
) -> list[float]:
    """Run fn repeatedly and return the requested time quantiles in milliseconds.

    On CUDA, CUDA events time each call and the L2 cache is flushed between calls (as
    triton.testing.do_bench does), so memory-bound kernels are not flattered by warm caches.
    """
    with on_device(device):
        for _ in range(warmup):
            fn()
    sync(device)
    times: list[float] = []
    if device.type == "cuda":
        flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)
        for _ in range(rep):
            with torch.cuda.device(device):
                flush.zero_()
            times.append(cuda_elapsed_ms(fn, device))
    else:
        t_total = 0.0
        i = 0
        while i < rep or t_total < min_time_s:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            times.append(dt * 1e3)
            t_total += dt
            i += 1
    t = torch.tensor(times, dtype=torch.float64)
    return [float(torch.quantile(t, q)) for q in quantiles]


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak device memory allocated during one call of fn, above what was allocated before.

    Only measurable on CUDA; returns None on CPU (CPU benchmarks report tracemalloc-free figures
    from their own estimates where relevant).
    """
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def append_rows(csv_name: str, rows: list[dict[str, object]]) -> Path:
    """Append rows to benchmarks/results/<csv_name>, writing the header when the file is new.

    Columns are the union of the file's header and the rows' keys: a row without a column gets an
    empty cell, and a row with a new column widens the file in place (earlier rows get empty
    cells there). Rows can so be appended one at a time as they are measured.
    """
    if not rows:
        return RESULTS_DIR / csv_name
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / csv_name
    fields = list(dict.fromkeys(k for r in rows for k in r))
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as f:
            existing = next(csv.reader(f), [])
        merged = existing + [k for k in fields if k not in existing]
        if merged != existing:
            with path.open(newline="") as f:
                old_rows = list(csv.DictReader(f))
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=merged, restval="")
                writer.writeheader()
                writer.writerows(old_rows)
        fields, new = merged, False
    else:
        new = True
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def format_table(rows: list[dict[str, object]], columns: list[str]) -> str:
    """A fixed-width text table of the given columns."""
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


_LOAD_SCRIPT = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a)
"""


@contextlib.contextmanager
def competing_load(threads: int):
    """Run a CPU-bound process with `threads` busy threads (matmuls) for the duration of the block.

    For benchmarks that must hold up on a shared machine. Yields the load process (None for 0);
    ends it (by its own pid) on exit, whatever happens inside.
    """
    if threads <= 0:
        yield None
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "ACTIVE"}
    proc = subprocess.Popen([sys.executable, "-c", _LOAD_SCRIPT, str(threads)], env=env)
    try:
        time.sleep(1.0)  # let it reach its loop before anything is timed
        yield proc
    finally:
        proc.kill()
        proc.wait()
