"""Which bf16 mechanism (docs/training.md, "Precision (bf16)"): DeepSpeed's bf16 engine vs
autocast on an fp32 engine, on a conv stack, plus the DeepSpeed bf16 + BatchNorm failure.

    python -m spsr_hpc.bench.precision_mechanisms --rounds 15 --threads 2

Sides, each one DeepSpeed engine (ZeRO 0, torch Adam) around the same seeded 20-layer 64-channel
3×3 conv stack, batch 2 at 32×32, forward + backward + optimizer step, timed interleaved:

* ``fp32``: fp32 engine;
* ``deepspeed_bf16``: ``bf16.enabled=true`` (bf16 weights, fp32 masters), bf16 input;
* ``autocast``: fp32 engine, ``torch.autocast(bfloat16)`` around the forward;
* ``autocast_fused``: the same with fused Adam (what the trainer uses).

Also runs conv → BatchNorm2d → conv under the DeepSpeed bf16 engine and records its error
(DeepSpeed 0.19.8: "expected scalar type BFloat16 but found Float"). Rows go to
benchmarks/results/precision_mechanisms.csv with device, versions and load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch
from torch import nn

from spsr_hpc.bench.common import append_rows, format_table, provenance

SIDES = ("fp32", "deepspeed_bf16", "autocast", "autocast_fused")


def _ds(bf16: bool) -> dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 0}, "bf16": {"enabled": bf16}, "steps_per_print": 10**9}


def _stack(layers: int = 20, ch: int = 64) -> nn.Module:
    torch.manual_seed(0)
    mods: list[nn.Module] = [nn.Conv2d(3, ch, 3, padding=1)]
    for _ in range(layers - 2):
        mods += [nn.Conv2d(ch, ch, 3, padding=1), nn.LeakyReLU(0.2)]
    mods.append(nn.Conv2d(ch, 3, 3, padding=1))
    return nn.Sequential(*mods)


def batchnorm_under_deepspeed_bf16() -> str:
    """'ok' or the error of conv → BatchNorm2d → conv under a DeepSpeed bf16 engine."""
    from spsr_hpc.train.engines import build_engine

    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 3, 3, padding=1))
    try:
        e = build_engine(m, _ds(True), lr=1e-4)
        y = e(torch.randn(2, 3, 16, 16).bfloat16())
        e.backward(y.float().mean())
        e.step()
    except Exception as ex:  # what is recorded is the failure itself
        return f"{type(ex).__name__}: {str(ex).splitlines()[0]}"
    return "ok"


def run(rounds: int = 15, warmup: int = 2, write: bool = True) -> list[dict[str, Any]]:
    from spsr_hpc.train.engines import build_engine, destroy_distributed, init_distributed

    init_distributed("gloo")
    bn = batchnorm_under_deepspeed_bf16()
    engines = {
        "fp32": build_engine(_stack(), _ds(False), lr=1e-4),
        "deepspeed_bf16": build_engine(_stack(), _ds(True), lr=1e-4),
        "autocast": build_engine(_stack(), _ds(False), lr=1e-4),
        "autocast_fused": build_engine(_stack(), _ds(False), lr=1e-4, fused=True),
    }
    x = torch.randn(2, 3, 32, 32)

    def step(name: str) -> float:
        e = engines[name]
        t0 = time.perf_counter()
        if name == "deepspeed_bf16":
            y = e(x.bfloat16())
        elif name.startswith("autocast"):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = e(x)
        else:
            y = e(x)
        e.backward(y.float().square().mean())
        e.step()
        return time.perf_counter() - t0

    for _ in range(warmup):
        for name in SIDES:
            step(name)
    load0 = os.getloadavg()[0]
    times: dict[str, list[float]] = {k: [] for k in SIDES}
    for r in range(rounds):
        for name in SIDES if r % 2 == 0 else reversed(SIDES):
            times[name].append(step(name))
    load1 = os.getloadavg()[0]
    destroy_distributed()
    med = {k: statistics.median(v) for k, v in times.items()}
    prov = provenance(torch.device("cpu"))
    rows = [{**prov, "side": k, "threads": torch.get_num_threads(), "rounds": rounds,
             "median_ms": round(med[k] * 1e3, 2), "speedup_vs_fp32": round(med["fp32"] / med[k], 3),
             "deepspeed_bf16_batchnorm": bn, "loadavg_1m_start": round(load0, 2),
             "loadavg_1m_end": round(load1, 2)} for k in SIDES]
    if write:
        append_rows("precision_mechanisms.csv", rows)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.rounds, write=not args.no_write)
    print(format_table(rows, ["device", "side", "threads", "median_ms", "speedup_vs_fp32", "loadavg_1m_start",
                              "deepspeed_bf16_batchnorm"]))
    return rows


if __name__ == "__main__":
    main()
