"""Gradient-map microbenchmark: Triton kernel vs PyTorch eager (conv2d, slices) vs torch.compile.

    python launch/bench_kernels.py --op gradient_map [--quick] [--no-csv] [--dtype bfloat16]
    python -m spsr_hpc.bench.gradient_map --shapes 8,3,1024,1024,1 --passes fwd+bwd

For each shape (B, C, H, W, padding), provider and pass (forward, backward, forward+backward)
it reports p20/p50/p80 time, achieved bandwidth over the bytes the op must move (forward reads
x and writes M; backward reads x and dM and writes dx; forward+backward is the sum), that
bandwidth as a fraction of the device's HBM peak, and the peak memory above the inputs. Rows are
appended to benchmarks/results/gradient_map.csv with provenance. On CPU only the PyTorch
providers run (the Triton kernels need a GPU; the interpreter is a test tool, not a backend).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch

from spsr_hpc.bench import common
from spsr_kernels import gradient_map, gradient_map_ref
from spsr_kernels.gradient_map import _gradient_map_torch

CSV_NAME = "gradient_map.csv"
PASSES = ("fwd", "bwd", "fwd+bwd")
PROVIDERS = ("triton", "eager_conv", "eager_slice", "compile_slice")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# (B, C, H, W, padding): a training batch of 128 patches for both map variants, and large images.
FULL_SHAPES = ((16, 3, 128, 128, 1), (16, 3, 128, 128, 2), (8, 3, 1024, 1024, 1))
QUICK_SHAPES = ((4, 3, 64, 64, 1), (4, 3, 64, 64, 2), (2, 3, 256, 256, 1))


def _parse_shapes(text: str) -> tuple[tuple[int, int, int, int, int], ...]:
    shapes = []
    for item in text.split(";"):
        parts = [int(p) for p in item.split(",")]
        if len(parts) != 5 or parts[4] not in (1, 2):
            raise argparse.ArgumentTypeError(f"shape {item!r} must be B,C,H,W,padding with padding 1 or 2")
        shapes.append(tuple(parts))
    return tuple(shapes)


def _provider_fn(name: str, compiled: Callable | None) -> Callable[[torch.Tensor, int], torch.Tensor]:
    if name == "triton":
        return lambda x, p: gradient_map(x, p, backend="triton")
    if name == "eager_conv":
        return gradient_map_ref
    if name == "eager_slice":
        return _gradient_map_torch
    if name == "compile_slice":
        assert compiled is not None
        return compiled
    raise ValueError(f"unknown provider {name!r}; expected one of {PROVIDERS}")


def _pass_fn(
    op: Callable, pass_name: str, x: torch.Tensor, grad: torch.Tensor, padding: int
) -> Callable[[], object]:
    if pass_name == "fwd":
        x_in = x.detach()

        def run() -> object:
            with torch.no_grad():
                return op(x_in, padding)

        return run
    x_req = x.detach().requires_grad_(True)
    if pass_name == "bwd":
        y = op(x_req, padding)
        return lambda: torch.autograd.grad(y, x_req, grad, retain_graph=True)
    return lambda: torch.autograd.grad(op(x_req, padding), x_req, grad)


def _bytes_moved(pass_name: str, n_in: int, n_out: int, elem: int) -> int:
    fwd = (n_in + n_out) * elem
    bwd = (n_in + n_out + n_in) * elem
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_name]


def run(
    args: argparse.Namespace, on_row: Callable[[dict[str, object]], None] | None = None
) -> list[dict[str, object]]:
    """Measure every (shape, provider, pass); ``on_row`` gets each row as soon as it is measured
    (main appends it to the CSV then, so a time limit or crash keeps the figures so far)."""
    device = torch.device(args.device)
    with common.on_device(device):  # Triton launches and CUDA events on this device
        return _run(args, device, on_row)


def _run(
    args: argparse.Namespace, device: torch.device, on_row: Callable[[dict[str, object]], None] | None
) -> list[dict[str, object]]:
    dtype = DTYPES[args.dtype]
    providers = [p for p in args.providers.split(",") if p]
    passes = [p for p in args.passes.split(",") if p]
    for p in providers:
        if p not in PROVIDERS:
            raise SystemExit(f"--providers: unknown provider {p!r}; choose from {','.join(PROVIDERS)}")
    for p in passes:
        if p not in PASSES:
            raise SystemExit(f"--passes: unknown pass {p!r}; choose from {','.join(PASSES)}")
    if device.type != "cuda" and "triton" in providers:
        providers.remove("triton")
        print("gradient_map: Triton figures need a CUDA GPU; measuring the PyTorch providers only on", device)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    warmup, rep = (3, 10) if args.quick else ((5, 50) if device.type == "cuda" else (3, 10))
    rep = args.rep or rep

    compiled = None
    if "compile_slice" in providers:
        # One static-shape specialisation per (shape, grad mode): the fair "what inductor fuses" baseline.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(shapes))
        compiled = torch.compile(_gradient_map_torch, dynamic=False)

    peak_bw = common.hbm_peak(device)
    prov = common.provenance(device)
    rows: list[dict[str, object]] = []
    for b, c, h, w, padding in shapes:
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.rand(b, c, h, w, generator=gen).to(device=device, dtype=dtype)
        ho, wo = h + 2 * (padding - 1), w + 2 * (padding - 1)
        grad = torch.randn(b, c, ho, wo, generator=gen).to(device=device, dtype=dtype)
        eager_p50: dict[str, float] = {}
        for provider in providers:
            op = _provider_fn(provider, compiled)
            for pass_name in passes:
                fn = _pass_fn(op, pass_name, x, grad, padding)
                p20, p50, p80 = common.time_quantiles(fn, device, warmup=warmup, rep=rep)
                moved = _bytes_moved(pass_name, x.numel(), grad.numel(), x.element_size())
                gbps = moved / (p50 * 1e-3) / 1e9
                if provider == "eager_conv":
                    eager_p50[pass_name] = p50
                peak = common.peak_memory_bytes(fn, device)
                rows.append({
                    **prov,
                    "op": "gradient_map",
                    "shape": f"{b}x{c}x{h}x{w}",
                    "padding": padding,
                    "dtype": args.dtype,
                    "provider": provider,
                    "pass": pass_name,
                    "p20_ms": p20,
                    "p50_ms": p50,
                    "p80_ms": p80,
                    "bytes": moved,
                    "gbps": gbps,
                    "hbm_peak_gbps": peak_bw / 1e9 if peak_bw else None,
                    "frac_hbm_peak": gbps * 1e9 / peak_bw if peak_bw else None,
                    "speedup_vs_eager_conv": (eager_p50[pass_name] / p50) if pass_name in eager_p50 else None,
                    "peak_mem_mb": peak / 2**20 if peak is not None else None,
                })  # fmt: skip
                if on_row is not None:
                    on_row(rows[-1])
        del x, grad
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradient_map bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        type=common.bench_device, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument(
        "--shapes",
        type=_parse_shapes,
        default=None,
        help="'B,C,H,W,padding;...' (default: 16x3x128x128 p1 and p2; 8x3x1024x1024 p1)",
    )
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {PROVIDERS}")
    parser.add_argument("--passes", default=",".join(PASSES), help=f"comma list of {PASSES}")
    parser.add_argument(
        "--rep", type=int, default=None, help="timed repetitions (default 50 on GPU, 10 on CPU)"
    )
    parser.add_argument("--quick", action="store_true", help="small shapes, few reps (CPU smoke run, < 60 s)")
    parser.add_argument("--no-csv", action="store_true", help="print only; do not append to the CSV")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("gradient_map bench: TRITON_INTERPRET is set; interpreted kernels are not timed. Unset it.")
        return 2
    written: list[dict[str, object]] = []

    def write(row: dict[str, object]) -> None:  # at once: a later crash or time limit keeps it
        if not args.no_csv:
            common.append_rows(CSV_NAME, [row])
            written.append(row)
        print(f"{row['provider']:14s} {row['shape']} p{row['padding']} {row['pass']:8s} "
              f"p50 {row['p50_ms']:.3f} ms", file=sys.stderr, flush=True)

    rows = run(args, on_row=write)
    columns = ["shape", "padding", "dtype", "provider", "pass", "p20_ms", "p50_ms", "p80_ms", "gbps",
               "frac_hbm_peak", "speedup_vs_eager_conv", "peak_mem_mb"]  # fmt: skip
    peak = rows[0]["hbm_peak_gbps"] if rows else None
    print(f"gradient_map on {rows[0]['device'] if rows else args.device}; HBM peak {peak} GB/s;"
          " GB/s counts the bytes the op must move")  # fmt: skip
    print(common.format_table(rows, columns))
    if written:
        print(f"appended {len(written)} rows to {common.RESULTS_DIR / CSV_NAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
