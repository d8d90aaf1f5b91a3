"""NSE pretraining step benchmark: anchors/s and peak memory, fused InfoNCE vs the naive loss.

One step = NSE forward on (B, 3, P, P) random crops, every valid anchor of every image for each
strategy, InfoNCE, backward, Adam step (the body of spsr_hpc.nse.pretrain without DeepSpeed).
The fused loss is `spsr_kernels.info_nce` (Triton on CUDA, the chunked PyTorch path on CPU);
the naive loss is `info_nce_ref`, which materialises the (B, N, M) logits. A naive row that
would not fit is reported as skipped with the memory its loss needs, extrapolated from the
(naive − fused) peak per logit measured at a size that fits.

Peak memory: CUDA max_memory_allocated above the pre-step level on GPU; on CPU each row runs in
a child process and reports the growth of its peak resident set (ru_maxrss) during the steps.

    python -m spsr_hpc.bench.nse_pretrain                  # GPU: P=400, batches 8 and 48
    python -m spsr_hpc.bench.nse_pretrain --patch 128      # CPU-sized
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from typing import Any

import torch

from spsr_hpc.bench.common import append_rows, format_table, peak_memory_bytes, provenance, time_quantiles
from spsr_hpc.models import NSE
from spsr_hpc.models.nse import ContextPredictor
from spsr_hpc.nse.contrastive import ContrastiveObjective
from spsr_hpc.nse.sampling import context_offsets, count_anchors, num_contexts, overlap_radius

CSV_NAME = "nse_pretrain.csv"
# Naive bytes per logit measured at the probe size, used to size rows that would not fit.
PROBE_BATCH = 2
COLUMNS = [
    "bench", "loss", "backend", "batch", "patch", "strategies", "anchors_per_step", "keys_per_map",
    "ms_p20", "ms_p50", "ms_p80", "anchors_per_s", "peak_gb", "naive_need_gb", "status",
    "date", "device", "torch", "triton", "git",
]


def _objective(strategies: list[str], backend: str, device: torch.device) -> ContrastiveObjective:
    nse = NSE()
    preds = {s: ContextPredictor(nse.out_dim, num_contexts(s), hidden=256, layers=3) for s in strategies}
    return ContrastiveObjective(nse, preds, loss_backend=backend).to(device)


def anchors_per_step(batch: int, patch: int, strategies: list[str]) -> tuple[int, int]:
    """(anchors per step, keys per map) with every valid anchor, default NSE geometry."""
    nse = NSE()
    side = patch // nse.stride
    radius = overlap_radius(nse.receptive_field(), nse.stride)
    n = sum(count_anchors(side, side, context_offsets(s, radius)) for s in strategies)
    return batch * n, side * side


def run_row(batch: int, patch: int, strategies: list[str], loss: str, rep: int) -> dict[str, Any]:
    """Time one configuration in this process; returns the measured fields."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    obj = _objective(strategies, "naive" if loss == "naive" else "auto", device)
    opt = torch.optim.Adam(obj.parameters(), lr=1e-3)
    hr = torch.rand(batch, 3, patch, patch, device=device)

    def step() -> None:
        loss_v, _, _ = obj(hr, torch.Generator().manual_seed(0))
        opt.zero_grad(set_to_none=True)
        loss_v.backward()
        opt.step()

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up (and Adam state allocation) before the memory and time measurements
    if device.type == "cuda":
        peak = peak_memory_bytes(step, device)
    else:
        step()
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    q = time_quantiles(step, device, warmup=0 if device.type == "cpu" else 2, rep=rep)
    anchors, _ = anchors_per_step(batch, patch, strategies)
    return {"ms_p20": q[0], "ms_p50": q[1], "ms_p80": q[2], "anchors_per_s": anchors / (q[1] / 1e3),
            "peak_gb": peak / 1e9 if peak is not None else None}


def _run_isolated(batch: int, patch: int, strategies: list[str], loss: str, rep: int) -> dict[str, Any]:
    """CPU: one child process per row, so ru_maxrss measures this row alone."""
    spec = json.dumps([batch, patch, strategies, loss, rep])
    cmd = [sys.executable, "-m", "spsr_hpc.bench.nse_pretrain", "--child", spec]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def available_gb(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free / 1e9
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] * 1024 / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[8, 48])
    p.add_argument("--patch", type=int, default=400)
    p.add_argument("--strategies", nargs="+", default=["h", "v", "c"], choices=["h", "v", "c"])
    p.add_argument("--rep", type=int, default=None, help="timed steps per row (default 20 GPU, 3 CPU)")
    p.add_argument("--naive-budget-gb", type=float, default=None,
                   help="skip naive rows needing more (default: 80%% of free memory)")
    p.add_argument("--no-save", action="store_true", help="print only, do not append to the CSV")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child is not None:
        batch, patch, strategies, loss, rep = json.loads(a.child)
        torch.set_num_threads(max(1, torch.get_num_threads()))
        print(json.dumps(run_row(batch, patch, strategies, loss, rep)))
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rep = a.rep or (20 if device.type == "cuda" else 3)
    runner = run_row if device.type == "cuda" else _run_isolated
    budget = a.naive_budget_gb or 0.8 * available_gb(device)
    # Naive loss memory per logit: (naive − fused) peak at a size that fits everywhere, so the
    # network's own activations do not count; the estimate is a lower bound of a naive step.
    probe_patch = min(a.patch, 128)
    probe_n = runner(PROBE_BATCH, probe_patch, a.strategies, "naive", 1)["peak_gb"]
    probe_f = runner(PROBE_BATCH, probe_patch, a.strategies, "fused", 1)["peak_gb"]
    probe_anchors, probe_keys = anchors_per_step(PROBE_BATCH, probe_patch, a.strategies)
    bytes_per_logit = max(probe_n - probe_f, 0.0) * 1e9 / (probe_anchors * probe_keys)
    rows = []
    prov = provenance(device)
    fused_backend = "triton" if device.type == "cuda" else "torch-chunked"
    for batch in a.batches:
        anchors, keys = anchors_per_step(batch, a.patch, a.strategies)
        for loss in ("fused", "naive"):
            row: dict[str, Any] = {
                "bench": "nse_pretrain_step", "loss": loss, "batch": batch, "patch": a.patch,
                "strategies": "".join(a.strategies), "anchors_per_step": anchors, "keys_per_map": keys,
                "backend": fused_backend if loss == "fused" else "naive",
            }  # fmt: skip
            need_gb = bytes_per_logit * anchors * keys / 1e9
            if loss == "naive" and need_gb > budget:
                status = f"skipped: out of memory (needs ~{need_gb:.1f} GB, {budget:.1f} GB free)"
                row.update({"status": status, "naive_need_gb": need_gb})
            else:
                try:
                    row.update(runner(batch, a.patch, a.strategies, loss, rep))
                    row["status"] = "ok"
                except (RuntimeError, torch.OutOfMemoryError) as e:
                    row["status"] = f"failed: {str(e).splitlines()[0][:120]}"
                if loss == "naive":
                    row["naive_need_gb"] = need_gb
            full = {**row, **prov}
            rows.append({c: full.get(c) for c in COLUMNS})
    shown = ["loss", "batch", "patch", "anchors_per_step", "ms_p50", "anchors_per_s", "peak_gb", "status",
             "device"]
    print(format_table(rows, shown))
    if not a.no_save:
        path = append_rows(CSV_NAME, rows)
        print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
