"""Our SPSR-G training step vs a plain eager step with the public code's structure.

    python launch/bench_train.py --vs-reference                       # paper size, 7 rounds
    python launch/bench_train.py --vs-reference --public-code ~/SPSR  # + the authors' SPSRModel
    python launch/bench_train.py --vs-reference --no-bf16             # fp32 rows only

Both sides run in this one process on the same synthetic batches and the same initial weights
(the reference, spsr_hpc/bench/train_reference.py, copies our networks before any step):
the paper's architecture (nf 64, nb 23, two VGG discriminators, VGG19 perceptual with random
weights: the same FLOPs as ImageNet weights, which nothing here may download), LR 32 -> HR 128,
batch 2. The reference runs fp32; our step runs twice, as two trainers: fp32 (the same maths as
the reference: the "same-maths" row) and, where the device has native bf16
(:mod:`spsr_hpc.precision`), with ``train.bf16=true train.channels_last=true`` (bf16 autocast,
fp32 weights; the "bf16" row). After warm-up steps, each round times one step of every side, in
alternating order; the result is the median over rounds of the per-round ratio, which cancels
most of the drift of a shared machine. Rows (one per compared side, with its ``precision``) go to
benchmarks/results/train_vs_reference.csv with the device, versions, git revision, threads and
the 1-minute load average before and after.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from spsr_hpc.bench.common import REPO_ROOT, append_rows, format_table, provenance
from spsr_hpc.bench.train_setup import FIXED_OVERRIDES, SyntheticBatches

PAPER_CONFIG = REPO_ROOT / "configs" / "spsr_g.yaml"
# The paper's networks with nothing that reads files or writes output (the benchmark's own settings).
_PAPER = [
    "model.generator.pretrained=null",
    "perceptual.random_weights=true",
    "data.batch_size=2",
    "train.ema_decay=null",
    *FIXED_OVERRIDES,
]
REFERENCE = "reference (public-code structure, eager)"
OURS = "spsr-hpc"
OURS_BF16 = "spsr-hpc bf16 (autocast)"
BF16_OVERRIDES = ["train.bf16=true", "train.channels_last=true"]
"""Our bf16 side: autocast with fp32 weights, channels_last (on the 2-core AMD EPYC, one thread,
process CPU time per paper-size step: bf16 6.35 s, bf16 + channels_last 5.87 s; docs/training.md)."""


def _load() -> float:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else float("nan")


def _batches(trainer: Any, n: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    cfg = trainer.cfg.data
    return SyntheticBatches(cfg.batch_size, cfg.patch_size, cfg.scale, n=n, seed=seed).batches


def run_vs_reference(
    config: str | Path = PAPER_CONFIG,
    overrides: list[str] | None = None,
    *,
    rounds: int = 7,
    warmup: int = 2,
    public_code: str | Path | None = None,
    write: bool = True,
    bf16: bool | None = None,
) -> list[dict[str, Any]]:
    """Time our step (fp32, and bf16), the reference step (and the authors' SPSRModel)
    interleaved; CSV rows. ``bf16``: None = add the bf16 side where the device has native bf16,
    True = require it (ValueError naming the reason where it has not), False = fp32 sides only."""
    from spsr_hpc.bench.train_reference import ReferenceSPSRStep
    from spsr_hpc.config import load_config
    from spsr_hpc.precision import bf16_unsupported
    from spsr_hpc.train.engines import destroy_distributed
    from spsr_hpc.train.trainer import Trainer

    if rounds < 1 or warmup < 1:
        raise ValueError(f"rounds and warmup must be >= 1, got rounds={rounds}, warmup={warmup}")
    overrides = list(overrides or [])
    if any(o.replace(" ", "").startswith(("train.bf16=", "train.channels_last=")) for o in overrides):
        raise ValueError(
            "--vs-reference sets train.bf16 and train.channels_last itself (fp32 side: both off, bf16 "
            "side: both on); use --no-bf16 for the fp32 sides only"
        )
    run_dir = tempfile.mkdtemp(prefix="bench_vs_ref_")
    cfg = load_config(config, [*_PAPER, *overrides, f"logging.run_dir={run_dir}"])
    if bf16 is not False:
        reason = bf16_unsupported(cfg.train.device)
        if reason is not None and bf16:
            raise ValueError(f"--vs-reference bf16 side: {reason}; pass --no-bf16")
        if reason is not None:
            print(f"[bench] no bf16 side: {reason}", file=sys.stderr, flush=True)
        bf16 = reason is None
    batches: list[dict[str, torch.Tensor]] = []

    class _Cycle:
        def __iter__(self):
            while True:
                yield from batches

    load_start = _load()
    t_build = time.perf_counter()
    trainer = Trainer(cfg, source=str(config), loader=_Cycle())
    batches.extend(_batches(trainer))
    ref = ReferenceSPSRStep.from_trainer(trainer)
    sides: dict[str, Callable[[dict[str, torch.Tensor]], object]] = {
        OURS: lambda _b: trainer.train_step(),
        REFERENCE: lambda b: ref.step(b["lr"].to(trainer.device), b["hr"].to(trainer.device)),
    }
    precision = {OURS: "fp32", REFERENCE: "fp32"}
    trainers = [trainer]
    if bf16:
        # Same seed, so the same initial weights as the fp32 trainer (and the reference).
        cfg16 = load_config(config, [*_PAPER, *overrides, *BF16_OVERRIDES,
                                     f"logging.run_dir={tempfile.mkdtemp(prefix='bench_vs_ref_bf16_')}"])
        trainer16 = Trainer(cfg16, source=str(config), loader=_Cycle())
        trainers.append(trainer16)
        sides[OURS_BF16] = lambda _b: trainer16.train_step()
        precision[OURS_BF16] = "bf16"
    if public_code is not None:
        from spsr_hpc.bench.public_spsr import PublicSPSRStep

        public = PublicSPSRStep(public_code, trainer)
        sides["public SPSRModel (authors' code)"] = public.step
        precision["public SPSRModel (authors' code)"] = "fp32"
    build_s = time.perf_counter() - t_build
    times: dict[str, list[float]] = {k: [] for k in sides}
    counters = {k: 0 for k in sides}

    def one(name: str) -> float:
        batch = batches[counters[name] % len(batches)]
        counters[name] += 1
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sides[name](batch)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(warmup):
        for name in sides:
            one(name)
    loads = []
    t_rounds = time.perf_counter()
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            times[name].append(one(name))
        loads.append(_load())
        print(f"[bench] round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items())
              + f" (load {loads[-1]})", file=sys.stderr, flush=True)
    rounds_s = time.perf_counter() - t_rounds
    for t in trainers:
        t.close()
    destroy_distributed()

    base = REFERENCE
    prov = provenance(trainer.device)
    rows = []
    for name, ts in times.items():
        ratios = [b / t for b, t in zip(times[base], ts)]  # > 1: this side is faster than the reference
        rows.append(
            {
                **prov,
                "side": name,
                "precision": precision[name],
                "config": Path(config).name,
                "overrides": " ".join(overrides + (BF16_OVERRIDES if name == OURS_BF16 else [])),
                "threads": torch.get_num_threads(),
                "batch": cfg.data.batch_size,
                "hr_patch": cfg.data.patch_size * cfg.data.scale,
                "rounds": rounds,
                "warmup": warmup,
                "median_s": statistics.median(ts),
                "min_s": min(ts),
                "max_s": max(ts),
                "speedup_vs_reference_median": statistics.median(ratios),
                "speedup_min": min(ratios),
                "speedup_max": max(ratios),
                "loadavg_1m_start": load_start,
                "loadavg_1m_median": statistics.median(loads),
                "loadavg_1m_max": max(loads),
                "wall_s": round(build_s + rounds_s, 1),
            }
        )
    if write:
        append_rows("train_vs_reference.csv", rows)
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(
        format_table(
            rows,
            ["device", "side", "precision", "threads", "median_s", "speedup_vs_reference_median",
             "speedup_min", "speedup_max", "loadavg_1m_median", "git"],
        )
    )


__all__ = [
    "BF16_OVERRIDES", "OURS", "OURS_BF16", "PAPER_CONFIG", "REFERENCE", "print_rows", "run_vs_reference",
]
