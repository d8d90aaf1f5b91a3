"""Benchmark of the fused InfoNCE loss (spsr_kernels.info_nce) against its baselines.

Providers: ``triton`` (the fused kernels; CUDA only), ``chunked`` (the PyTorch tile path the
CPU uses), ``naive`` (info_nce_ref, materialises the (B, N, M) logits) and ``compile``
(torch.compile of the naive reference). Sizes follow NSE contrastive pretraining (docs/method.md §6):
all N = M positions of an H×W feature map are anchors, d = 32, τ = 64, and each anchor excludes
keys within Chebyshev radius 4 (receptive field ~16 px at stride 4) of its target and of its two
horizontal context positions (C = 3 centres).

Figures per (provider, B, N): forward / backward / total time quantiles (ms, p20/p50/p80),
peak memory of the loss (CUDA: peak allocated above the inputs; CPU: peak RSS above the start,
measured with /proc/self/clear_refs + VmHWM, next to an analytic estimate), logits/s,
exponentials/s and, on CUDA, their fraction of the SFU (ex2) peak. The naive providers are
reported as "skipped: needs X GB" where their logits would not fit, and "out of memory" if the
device runs out anyway.

    python -m spsr_hpc.bench.info_nce --quick            # CPU: a couple of minutes on 2 cores
    python -m spsr_hpc.bench.info_nce                    # CUDA: the full grid
    python -m spsr_hpc.bench.info_nce --sizes 10000 --batches 48 --providers triton chunked

Rows are appended to benchmarks/results/info_nce.csv with provenance (device, versions, git).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from spsr_hpc.bench import common
from spsr_kernels import info_nce, info_nce_ref

PROVIDERS = ("triton", "chunked", "naive", "compile")
CSV_NAME = "info_nce.csv"
FIELDS = [
    "provider", "B", "N", "M", "d", "radius", "centres", "dtype", "scale",
    *(f"{p}_ms_{q}" for p in ("fwd", "bwd", "total") for q in ("p20", "p50", "p80")),
    "peak_mem_MB", "mem_method", "mem_estimate_MB", "logits_per_s_fwd", "exps_per_s_total",
    "sfu_peak_per_s", "sfu_fraction", "sfu_peak_source", "status", "cpu_load_1m", "cpu_threads",
    "date", "device", "torch", "triton", "git",
]  # fmt: skip


def grid_shape(n: int) -> tuple[int, int]:
    """(H, W) with H·W = n and W the largest divisor of n not above sqrt(n)."""
    w = math.isqrt(n)
    while n % w:
        w -= 1
    return n // w, w


def make_inputs(
    B: int, N: int, d: int, offset: int, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """All positions are anchors; centres = target and its two horizontal context positions.

    Returns pred (B, N, d), keys (B, N, d), pos_index (B, N), exclude_centers (B, N, 3), W.
    """
    _, W = grid_shape(N)
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(B, N, d, generator=g).to(device=device, dtype=dtype)
    keys = torch.randn(B, N, d, generator=g).to(device=device, dtype=dtype)
    pos = torch.arange(N, device=device).expand(B, N).contiguous()
    row, col = pos // W, pos % W
    left = row * W + (col - offset).clamp(0, W - 1)
    right = row * W + (col + offset).clamp(0, W - 1)
    centres = torch.stack([pos, left, right], dim=-1)
    return pred, keys, pos, centres, W


def estimate_bytes(
    provider: str, B: int, N: int, M: int, d: int, elem: int, device: torch.device | str | None = None
) -> int:
    """Analytic extra memory of one forward+backward of the loss (beyond inputs and their grads)."""
    if provider in ("naive", "compile"):
        # fp32 logits, their masked copy, the mask, and the backward's two (B, N, M) temporaries.
        return B * N * M * (4 * 4 + 2)
    vecs = B * (N + M) * d
    if provider == "chunked":
        from spsr_kernels.info_nce import _torch_tiles

        chunk_n, chunk_m = _torch_tiles(B, N, M, None, device)
        excluded = B * N * 3 * (2 * 4 - 1) ** 2 * 8  # removed-key lists, 3 centres, radius 4
        # normalised copies, their fp32 gradients and the normalisation backward's temporaries
        # (~6 fp32 copies), the removed-key lists and one fp32 tile of logits.
        return vecs * 4 * 6 + excluded + 4 * B * chunk_n * chunk_m
    # triton: normalised copies in the input dtype (saved), fp32 norms, per-anchor LSE, positive
    # logit and upstream gradient; the kernels write dpred/dkeys directly (fused chain rule); the
    # exclusion bitmap (one bit per logit, int32 words) while a launcher runs.
    return vecs * elem + B * (N + M) * 4 + B * N * 4 * 3 + B * N * ((M + 31) // 32) * 4


class _RssPeak:
    """Peak resident memory above the starting point, for CPU runs (Linux only)."""

    def __enter__(self) -> _RssPeak:
        with contextlib.suppress(OSError):  # hand freed heap back so reuse cannot hide growth
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        self.start = self._read("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        self.peak = self._read("VmHWM") - self.start

    @staticmethod
    def _read(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} missing from /proc/self/status")


def _time_backward(
    fwd: Callable[[], torch.Tensor], device: torch.device, *, warmup: int, rep: int
) -> list[float]:
    """p20/p50/p80 ms of backward alone, each after a fresh untimed forward (compiled backwards
    donate buffers, so one graph cannot be replayed with retain_graph)."""
    times = []
    for i in range(warmup + rep):
        with common.on_device(device):
            loss = fwd()
        common.sync(device)
        if device.type == "cuda":
            elapsed = common.cuda_elapsed_ms(loss.backward, device)
        else:
            t0 = time.perf_counter()
            loss.backward()
            elapsed = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(elapsed)
    t = torch.tensor(times, dtype=torch.float64)
    return [float(torch.quantile(t, q)) for q in (0.2, 0.5, 0.8)]


def _make_fn(provider: str, kw: dict) -> Callable[..., torch.Tensor]:
    if provider == "triton":
        return lambda p, k, pos: info_nce(p, k, pos, backend="triton", **kw)
    if provider == "chunked":
        return lambda p, k, pos: info_nce(p, k, pos, backend="torch", **kw)
    if provider == "naive":
        return lambda p, k, pos: info_nce_ref(p, k, pos, **kw)
    if provider == "compile":
        compiled = torch.compile(info_nce_ref, dynamic=False)
        return lambda p, k, pos: compiled(p, k, pos, **kw)
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def bench_one(
    provider: str, B: int, N: int, d: int, radius: int, dtype: torch.dtype, device: torch.device, args
) -> dict[str, object]:
    offset = radius  # context positions sit just outside the target's receptive-field overlap
    M = N
    row: dict[str, object] = {
        "provider": provider, "B": B, "N": N, "M": M, "d": d, "radius": radius, "centres": 3,
        "dtype": str(dtype).replace("torch.", ""), "scale": 64.0,
    }  # fmt: skip
    elem = torch.finfo(dtype).bits // 8
    est = estimate_bytes(provider, B, N, M, d, elem, device)
    row["mem_estimate_MB"] = est / 2**20
    if provider == "triton" and device.type != "cuda":
        row["status"] = "skipped: needs CUDA (CPU runs the kernels only in the test interpreter)"
        return row
    budget = torch.cuda.mem_get_info(device)[0] * 0.9 if device.type == "cuda" else args.cpu_mem_gb * 2**30
    if provider in ("naive", "compile") and est > budget:
        row["status"] = f"skipped: needs {est / 2**30:.1f} GB"
        return row

    pred, keys, pos, centres, W = make_inputs(B, N, d, offset, device, dtype)
    pred.requires_grad_(True)
    keys.requires_grad_(True)
    kw = dict(scale=64.0, grid_width=W, exclude_centers=centres, exclude_radius=radius, reduction="mean")
    fn = _make_fn(provider, kw)
    warmup, rep = (1, 3) if device.type == "cpu" else (5, 20)

    def fwd() -> torch.Tensor:
        return fn(pred, keys, pos)

    def total() -> None:
        pred.grad = keys.grad = None
        fwd().backward()

    try:
        loss = fwd()  # also triggers compilation before any timing
        loss.backward()
        f_q = common.time_quantiles(fwd, device, warmup=warmup, rep=rep)
        t_q = common.time_quantiles(total, device, warmup=warmup, rep=rep)
        b_q = _time_backward(fwd, device, warmup=warmup, rep=rep)
        pred.grad = keys.grad = None
        if device.type == "cuda":
            row["peak_mem_MB"] = common.peak_memory_bytes(total, device) / 2**20
            row["mem_method"] = "cuda max_memory_allocated above inputs"
        else:
            with _RssPeak() as rss:
                total()
            row["peak_mem_MB"] = rss.peak / 2**20
            row["mem_method"] = "cpu peak RSS delta (VmHWM after clear_refs)"
    except torch.OutOfMemoryError:
        row["status"] = "out of memory"
        return row
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for name, q in (("fwd", f_q), ("bwd", b_q), ("total", t_q)):
        row.update({f"{name}_ms_p20": q[0], f"{name}_ms_p50": q[1], f"{name}_ms_p80": q[2]})
    logits = B * N * M
    row["logits_per_s_fwd"] = logits / (f_q[1] * 1e-3)
    # Exponentials per logit per fwd+bwd: triton recomputes the tile in both backward kernels
    # (3); the chunked path and autograd of logsumexp need one in forward and one in backward (2).
    exps = logits * (3 if provider == "triton" else 2)
    row["exps_per_s_total"] = exps / (t_q[1] * 1e-3)
    peak = common.sfu_peak(device)
    row["sfu_peak_per_s"] = peak
    row["sfu_fraction"] = row["exps_per_s_total"] / peak if peak else None
    # Tensor-core work per fwd+bwd: the forward's P·Kᵀ, and in backward two recomputed P·Kᵀ (one
    # per kernel) and the dP, dK products: 5 (B, N, M, d) matmuls of 2 flop per multiply-add.
    tc_peak = common.tensor_peak(device, dtype)
    flops = 5 * 2 * logits * d
    row["tensor_peak_flop_per_s"] = tc_peak
    row["tensor_fraction_total"] = flops / (t_q[1] * 1e-3) / tc_peak if tc_peak else None
    row["status"] = "ok"
    return row


def load_revision(rev: str, workdir: str):
    """kernels/info_nce.py as of git revision `rev`, imported beside the current module (for
    before/after runs in one process). Its custom ops go to their own torch.library namespace
    so they do not clash with the current ones; Triton needs the source in a file (workdir)."""
    proc = subprocess.run(
        ["git", "show", f"{rev}:kernels/info_nce.py"], cwd=common.REPO_ROOT, capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(f"--baseline-rev {rev}: git show failed: {proc.stderr.strip()}")
    tag = "".join(c if c.isalnum() else "_" for c in rev)
    path = os.path.join(workdir, f"_info_nce_at_{tag}.py")
    with open(path, "w") as f:
        f.write(proc.stdout.replace('"spsr_kernels::', f'"spsr_kernels_at_{tag}::'))
    name = f"spsr_kernels._info_nce_at_{tag}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def bench_interleaved(
    providers: list[str], B: int, N: int, d: int, radius: int, dtype: torch.dtype, device: torch.device,
    args, baseline=None,
) -> list[dict[str, object]]:
    """Forward+backward of every provider in turn, `args.interleave` rounds (the order reversed
    every other round, so drift in machine load hits all alike); per provider the p20/p50/p80
    time and the median over rounds of its speed-up over naive in the same round."""
    pred, keys, pos, centres, W = make_inputs(B, N, d, radius, device, dtype)
    pred.requires_grad_(True)
    keys.requires_grad_(True)
    kw = dict(scale=64.0, grid_width=W, exclude_centers=centres, exclude_radius=radius, reduction="mean")
    fns = {}
    for name in providers:
        if name == "baseline":
            fwd = (lambda p, k, q: baseline.info_nce(p, k, q, backend="torch", **kw)) if baseline else None
            name = f"chunked@{args.baseline_rev}"
        else:
            fwd = _make_fn(name, kw)
        fns[name] = fwd

    def total(fwd) -> float:
        pred.grad = keys.grad = None
        common.sync(device)
        t0 = time.perf_counter()
        fwd(pred, keys, pos).backward()
        common.sync(device)
        return (time.perf_counter() - t0) * 1e3

    times: dict[str, list[float]] = {name: [] for name in fns}
    loads = []
    for fwd in fns.values():
        total(fwd)  # warm-up (and compilation)
    for r in range(args.interleave):
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            times[name].append(total(fns[name]))
        loads.append(os.getloadavg()[0])
    rows = []
    for name, t in times.items():
        q = [statistics.quantiles(t, n=10, method="inclusive")[i] for i in (1, 4, 7)] if len(t) > 1 else t * 3
        row: dict[str, object] = {
            "provider": name, "B": B, "N": N, "M": N, "d": d, "radius": radius, "centres": 3,
            "dtype": str(dtype).replace("torch.", ""), "scale": 64.0,
            "total_ms_p20": float(q[0]), "total_ms_p50": float(q[1]), "total_ms_p80": float(q[2]),
            "status": "ok", "mode": f"interleaved fwd+bwd, {args.interleave} rounds",
            "rounds": args.interleave, "load_threads": args.load_threads,
            "cpu_load_1m": statistics.median(loads),
            "cpu_load_1m_min": min(loads), "cpu_load_1m_max": max(loads),
        }  # fmt: skip
        if "naive" in times:
            row["speedup_vs_naive"] = statistics.median(n / x for n, x in zip(times["naive"], t))
        rows.append(row)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m spsr_hpc.bench.info_nce", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   type=common.bench_device, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--sizes", nargs="+", type=int, default=None, help="N = M values (default: paper's grid)")
    p.add_argument("--batches", nargs="+", type=int, default=None, help="B values (default 1 8 48)")
    p.add_argument("--d", type=int, default=32)
    p.add_argument("--radius", type=int, default=4, help="exclusion radius, ceil(RF 16 px / stride 4)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--cpu-mem-gb", type=float, default=6.0, help="CPU memory the naive providers may use")
    p.add_argument(
        "--quick", action="store_true", help="CPU-sized grid: N in 1024 4096 10000, B=1 (~2 min on 2 cores)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU intra-op threads (default 1: on a shared machine OpenMP barriers dominate small ops)",
    )
    p.add_argument(
        "--interleave",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="time fwd+bwd of the providers in turn for ROUNDS rounds and report each one's median "
        "speed-up over naive (needs 'naive' among --providers for the ratio); 0: the per-provider mode",
    )
    p.add_argument(
        "--load-threads", type=int, default=0, help="run a competing CPU load of this many threads meanwhile"
    )
    p.add_argument(
        "--baseline-rev",
        default=None,
        metavar="REV",
        help="with --interleave: also time the chunked path of kernels/info_nce.py at git revision REV "
        "(provider chunked@REV), for before/after comparisons in one run",
    )
    p.add_argument("--no-csv", action="store_true", help="print only; do not append to the CSV")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    sizes = args.sizes or ([1024, 4096, 10000] if args.quick else [1024, 4096, 10000, 16384])
    batches = args.batches or ([1] if args.quick else [1, 8, 48])
    rows = []
    prov = common.provenance(device)
    if args.interleave:
        return _main_interleaved(args, device, dtype, sizes, batches, prov)
    for B in batches:
        for N in sizes:
            for provider in args.providers:
                if args.quick and provider == "compile" and N > 4096:
                    continue  # compiling the naive graph at 10^8 logits adds minutes on 2 cores
                with common.on_device(device):  # Triton launches and CUDA events on this device
                    row = bench_one(provider, B, N, args.d, args.radius, dtype, device, args)
                row.update(prov)
                row["sfu_peak_source"] = (
                    "spsr_hpc.bench.common.SFU_PEAK_OPS_PER_S" if device.type == "cuda" else ""
                )
                row["cpu_load_1m"] = os.getloadavg()[0] if device.type == "cpu" else None
                row["cpu_threads"] = torch.get_num_threads() if device.type == "cpu" else None
                rows.append(row)
                _write([row], args)  # at once: a later crash or time limit keeps this figure
                print(
                    f"{provider:8s} B={B:<3d} N=M={N:<6d} {row.get('status')}"
                    + (f"  total p50 {row['total_ms_p50']:.1f} ms" if row.get("status") == "ok" else ""),
                    file=sys.stderr,
                    flush=True,
                )
    columns = [
        "provider", "B", "N", "fwd_ms_p50", "bwd_ms_p50", "total_ms_p50", "peak_mem_MB", "mem_estimate_MB",
        "logits_per_s_fwd", "exps_per_s_total", "sfu_fraction", "status",
    ]  # fmt: skip
    print(f"device: {prov['device']}  dtype: {args.dtype}  d={args.d}  radius={args.radius}  centres=3")
    print(common.format_table(rows, columns))
    if not args.no_csv:
        print(f"appended {len(rows)} rows to {common.RESULTS_DIR / CSV_NAME}")
    return 0


def _write(rows: list[dict[str, object]], args) -> None:
    if not args.no_csv:
        # FIELDS first (a skipped row lacks the figures), then any extra columns.
        fields = FIELDS + [k for k in dict.fromkeys(k for r in rows for k in r) if k not in FIELDS]
        common.append_rows(CSV_NAME, [{k: r.get(k) for k in fields} for r in rows])


def _main_interleaved(args, device, dtype, sizes, batches, prov) -> int:
    providers = [p for p in args.providers if not (p == "triton" and device.type != "cuda")]
    rows = []
    with tempfile.TemporaryDirectory() as workdir, common.competing_load(args.load_threads):
        baseline = None
        if args.baseline_rev:
            baseline = load_revision(args.baseline_rev, workdir)
            providers.append("baseline")
        for B in batches:
            for N in sizes:
                args_n = (B, N, args.d, args.radius, dtype, device, args, baseline)
                with common.on_device(device):
                    done = bench_interleaved(providers, *args_n)
                for row in done:
                    row.update(prov)
                    row["cpu_threads"] = torch.get_num_threads() if device.type == "cpu" else None
                _write(done, args)
                rows += done
    columns = ["provider", "B", "N", "total_ms_p20", "total_ms_p50", "total_ms_p80", "speedup_vs_naive",
               "cpu_load_1m", "load_threads"]  # fmt: skip
    print(f"device: {prov['device']}  dtype: {args.dtype}  d={args.d}  radius={args.radius}  centres=3  "
          f"threads={torch.get_num_threads()}  competing load threads={args.load_threads}")  # fmt: skip
    print(common.format_table(rows, columns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
