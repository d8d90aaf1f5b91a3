"""Loader throughput: samples/s of the WebDataset and DALI loaders on shards of the bundled photos.

    python launch/bench_loaders.py                      # all loaders, CPU unless CUDA is present
    python launch/bench_loaders.py --loaders dali --batches 100

The shards are sub-images (default 256 px, step 128, scale 4) of scikit-image's bundled training
photos, made once in --work-dir. Each loader yields batches of 128-px HR / 32-px LR patches with
the full augmentation; after --warmup batches, --batches batches are timed (wall clock, including
the host-to-device copy for a GPU pipeline). Rows go to benchmarks/results/loaders.csv with
provenance (device, versions, git revision).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from spsr_hpc.bench.common import append_rows, device_name, format_table, provenance
from spsr_hpc.data import DataConfig, build_train_loader, export_bundled_photos, write_shards
from spsr_hpc.data.dali_loader import dali_missing_message


def _prepare_shards(work_dir: Path, crop: int, step: int) -> tuple[Path, int]:
    train_dir, _ = export_bundled_photos(work_dir / "photos")
    manifest = write_shards(
        train_dir,
        work_dir / f"shards_c{crop}_s{step}",
        scale=4,
        crop_size=crop,
        step=step,
        shard_size_mb=4,
        progress=False,
    )
    return work_dir / f"shards_c{crop}_s{step}", manifest["num_samples"]


def _time_loader(cfg: DataConfig, warmup: int, batches: int) -> list[float]:
    loader = build_train_loader(cfg, rank=0, world_size=1)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        batch = next(it)
        if batch["hr"].is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    it.close()
    return times


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--loaders", nargs="+", default=["webdataset", "dali"], choices=["webdataset", "dali"],
        help="loaders to time (default both; dali is skipped with a note when DALI is not installed)",
    )
    parser.add_argument(
        "--workers", nargs="+", type=int, default=[0, 2], help="WebDataset worker counts to try (default 0 2)"
    )
    parser.add_argument("--dali-threads", type=int, default=min(4, os.cpu_count() or 1),
                        help="DALI CPU threads (default min(4, cores))")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per batch (default 16)")
    parser.add_argument("--patch", type=int, default=32, help="LR patch side (HR = 4x; default 32)")
    parser.add_argument("--crop", type=int, default=256, help="sub-image size of the shards (default 256)")
    parser.add_argument("--step", type=int, default=128, help="sub-image stride of the shards (default 128)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first (default 5)")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per loader (default 40)")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "spsr_bench_loaders"),
                        help="where the photos and shards are made, once (default: <tmp>/spsr_bench_loaders)")
    parser.add_argument(
        "--csv", default="loaders.csv",
        help="file under benchmarks/results (default loaders.csv; '' = do not write)",
    )
    return parser


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if Path(args.work_dir).exists() and not Path(args.work_dir).is_dir():
        parser.error(f"--work-dir {args.work_dir} is a file, not a folder: choose another --work-dir")
    for name in ("batch_size", "patch", "crop", "step", "batches", "dali_threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if any(w < 0 for w in args.workers) or args.warmup < 0:
        parser.error("--workers and --warmup must be at least 0")

    shards, n_samples = _prepare_shards(Path(args.work_dir), args.crop, args.step)
    cuda = torch.cuda.is_available()
    prov = provenance(torch.device("cuda" if cuda else "cpu"))
    cpu_name = device_name(torch.device("cpu"))
    runs: list[tuple[str, dict]] = []
    if "webdataset" in args.loaders:
        runs += [("webdataset", {"num_workers": w}) for w in args.workers]
    dali_missing = dali_missing_message() if "dali" in args.loaders else None
    if dali_missing:
        print(f"note: dali skipped: {dali_missing}")
    elif "dali" in args.loaders:
        runs += [("dali", {"dali_device": "cpu"})] + ([("dali", {"dali_device": "gpu"})] if cuda else [])

    rows = []
    for loader, extra in runs:
        cfg = DataConfig(
            shards=str(shards),
            loader=loader,
            batch_size=args.batch_size,
            patch_size=args.patch,
            scale=4,
            shuffle_buffer=64,
            batches_per_epoch=args.warmup + args.batches,
            dali_threads=args.dali_threads,
            **extra,
        )
        times = _time_loader(cfg, args.warmup, args.batches)
        t = torch.tensor(times, dtype=torch.float64)
        gpu_pipeline = loader == "dali" and extra.get("dali_device") == "gpu"
        rows.append(
            {
                **prov,
                "device": torch.cuda.get_device_name() if gpu_pipeline else cpu_name,
                "loader": loader,
                "pipeline": "gpu" if gpu_pipeline else "cpu",
                "workers_or_threads": extra.get("num_workers", args.dali_threads),
                "batch_size": args.batch_size,
                "hr_patch": 4 * args.patch,
                "shard_samples": n_samples,
                "shard_crop": args.crop,
                "batches": args.batches,
                "samples_per_s": args.batch_size * args.batches / float(t.sum()),
                "batch_ms_p20": float(torch.quantile(t, 0.2)) * 1e3,
                "batch_ms_p50": float(torch.quantile(t, 0.5)) * 1e3,
                "batch_ms_p80": float(torch.quantile(t, 0.8)) * 1e3,
            }
        )
    print(
        format_table(
            rows,
            [
                "loader",
                "pipeline",
                "workers_or_threads",
                "batch_size",
                "hr_patch",
                "samples_per_s",
                "batch_ms_p50",
                "device",
            ],
        )
    )
    if args.csv:
        path = append_rows(args.csv, rows)
        print(f"appended {len(rows)} row(s) to {path}")
    return rows
