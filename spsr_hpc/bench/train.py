"""Training throughput (samples/s) of a run config, 1..N processes, synthetic in-memory batches.

Synthetic batches isolate the training step (G + every D, DeepSpeed engines, gradient
all-reduce) from data loading, whose speed benchmarks/results of spsr_hpc.data cover.

    python launch/bench_train.py                                   # tiny SPSR-G, 1 and 2 procs, CPU
    python launch/bench_train.py --config configs/spsr_g.yaml --procs 1 --steps 20 \
        perceptual.random_weights=true train.bf16=true             # GPU, full size

Rows go to benchmarks/results/train.csv with provenance (device, versions, git revision).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from spsr_hpc.bench.common import REPO_ROOT, append_rows, format_table, positive_int, provenance
from spsr_hpc.bench.train_setup import FIXED_OVERRIDES, SyntheticBatches

DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny_spsr_g.yaml"


def measure(config: str, overrides: list[str], warmup: int, steps: int) -> dict:
    """Inside a (possibly launched) process: time `steps` optimizer steps after `warmup`."""
    from spsr_hpc import distributed as sdist
    from spsr_hpc.config import load_config
    from spsr_hpc.train.trainer import Trainer

    run_dir = tempfile.mkdtemp(prefix="bench_train_")
    cfg = load_config(
        config,
        [*FIXED_OVERRIDES, *overrides, f"logging.run_dir={run_dir}", f"train.max_steps={warmup + steps}"],
    )
    loader = SyntheticBatches(cfg.data.batch_size, cfg.data.patch_size, cfg.data.scale)
    trainer = Trainer(cfg, source=config, loader=loader)
    for _ in range(warmup):
        trainer.train_step()
    sdist.barrier()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    sdist.barrier()
    dt = time.perf_counter() - t0
    trainer.close()
    return {
        "config": str(Path(config).name),
        "method": cfg.loss.method,
        "procs": trainer.world,
        "threads_per_proc": torch.get_num_threads(),
        "device_type": trainer.device.type,
        "bf16": cfg.train.bf16,
        "zero_stage": cfg.deepspeed.zero_stage,
        "hr_patch": cfg.data.patch_size * cfg.data.scale,
        "batch_per_proc": cfg.data.batch_size,
        "global_batch": trainer.global_batch,
        "steps": steps,
        "s_per_step": dt / steps,
        "samples_per_s": trainer.global_batch * steps / dt,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if trainer.device.type == "cuda" else None,
        "overrides": " ".join(overrides),
    }


def _worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    from spsr_hpc import distributed as sdist
    from spsr_hpc.train.engines import destroy_distributed

    try:
        result = measure(args.config, args.overrides, args.warmup, args.steps)
    finally:
        destroy_distributed()
    if sdist.is_main_process():
        Path(args.out).write_text(json.dumps(result))


def run(
    config: str,
    procs: list[int],
    overrides: list[str],
    warmup: int,
    steps: int,
    cores: int | None = None,
    write: bool = True,
    threads: int | None = None,
) -> list[dict]:
    """Launch one measurement per process count (torchrun for > 1) and append CSV rows."""
    cores = cores or os.cpu_count() or 1
    rows = []
    for n in procs:
        n_threads = threads or (max(1, cores // n) if not torch.cuda.is_available() else 4)
        out = Path(tempfile.mkdtemp(prefix="bench_train_")) / "result.json"
        worker = [
            str(Path(__file__).resolve()),
            "--worker",
            "--config",
            config,
            "--out",
            str(out),
            "--warmup",
            str(warmup),
            "--steps",
            str(steps),
            "--threads",
            str(n_threads),
            *overrides,
        ]
        if n == 1:
            cmd = [sys.executable, *worker]
        else:
            cmd = [
                str(Path(sys.executable).with_name("torchrun")),
                "--standalone",
                "--nproc_per_node",
                str(n),
                *worker,
            ]
        env = {**os.environ, "OMP_NUM_THREADS": str(n_threads)}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(
                f"benchmark with {n} process(es) failed (rc {proc.returncode}):\n"
                f"{(proc.stdout + proc.stderr)[-4000:]}"
            )
        result = json.loads(out.read_text())
        device = torch.device("cuda" if result["device_type"] == "cuda" else "cpu")
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        rows.append({**provenance(device), **result, "loadavg_1m": round(load, 2)})
    if write:
        append_rows("train.csv", rows)
    return rows


def main(argv: list[str] | None = None) -> list[dict] | None:
    p = argparse.ArgumentParser(description="Training throughput (samples/s) of a run config.")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--procs", type=positive_int, nargs="+", default=[1, 2], help="process counts to measure")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=positive_int, default=5)
    p.add_argument("--threads-per-proc", type=int, default=None, help="default: cores // procs on CPU")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to the CSV")
    p.add_argument(
        "--vs-reference",
        action="store_true",
        help="time our SPSR-G step against a plain eager step with the public code's structure, "
        "interleaved in this process (default config: configs/spsr_g.yaml at the paper's size, batch 2); "
        "rows go to benchmarks/results/train_vs_reference.csv",
    )
    p.add_argument("--rounds", type=positive_int, default=7, help="--vs-reference: timed rounds (median)")
    p.add_argument("--no-bf16", action="store_true",
                   help="--vs-reference: fp32 sides only (default: also our bf16 step where the device "
                   "has native bf16)")
    p.add_argument(
        "--public-code",
        default=None,
        help="--vs-reference: path to a checkout of the authors' SPSR repository (github.com/Maclory/SPSR); "
        "also times their SPSRModel (nothing of it is copied here)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = p.parse_args(argv)
    if not Path(args.config).is_file():
        p.error(f"--config {args.config}: no such file (the run configs are in configs/)")
    if args.warmup < 0:
        p.error(f"--warmup {args.warmup}: must be at least 0")
    if args.worker:
        _worker(args)
        return None
    if args.vs_reference:
        from spsr_hpc.bench.train_vs_reference import PAPER_CONFIG, print_rows, run_vs_reference

        if args.threads_per_proc:
            torch.set_num_threads(args.threads_per_proc)
        config = args.config if args.config != str(DEFAULT_CONFIG) else str(PAPER_CONFIG)
        rows = run_vs_reference(
            config,
            args.overrides,
            rounds=args.rounds,
            warmup=args.warmup,
            public_code=args.public_code,
            write=not args.no_write,
            bf16=False if args.no_bf16 else None,
        )
        print_rows(rows)
        return rows
    rows = run(
        args.config,
        args.procs,
        args.overrides,
        args.warmup,
        args.steps,
        write=not args.no_write,
        threads=args.threads_per_proc,
    )
    print(
        format_table(
            rows,
            [
                "device",
                "config",
                "procs",
                "threads_per_proc",
                "global_batch",
                "hr_patch",
                "s_per_step",
                "samples_per_s",
                "loadavg_1m",
            ],
        )
    )
    return rows


if __name__ == "__main__":
    main()
