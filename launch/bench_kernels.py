"""Kernel microbenchmarks: Triton vs PyTorch eager vs torch.compile (docs/kernels_*.md).

    python launch/bench_kernels.py                       # every op, full shapes
    python launch/bench_kernels.py --op gradient_map --quick --no-csv
    python launch/bench_kernels.py --op gradient_map --dtype bfloat16 --passes fwd+bwd
    python launch/bench_kernels.py --static              # compiled-code report, no GPU needed

--quick, --no-csv and --device go to every op; any other option is passed to the op's own
benchmark (so it needs a single --op). Each op's `spsr_hpc.bench.<op>.main(argv)` prints a
table and appends rows to benchmarks/results/<op>.csv.

--static compiles every shipped kernel configuration for sm_90 with the ptxas bundled in the
triton wheel (tests/aot_compile_kernels.py, no GPU) and reports per kernel: registers, spills
(stack/local bytes and STL instructions), shared memory, global loads and how many are 128-bit
vectors (LDG.E.128 / LDGSTS.128), and SASS instructions per logit in the key loop (InfoNCE) or
per element (gradient map). It writes benchmarks/results/kernels_static.csv and
kernels_static.md with the git revision.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

OPS = ("gradient_map", "info_nce")


def _device(spec: str) -> str:
    from spsr_hpc.bench.common import bench_device  # imports torch: only when --device is given

    return bench_device(spec)


def _load_main(op: str):
    try:
        module = importlib.import_module(f"spsr_hpc.bench.{op}")
    except ModuleNotFoundError as err:
        if err.name != f"spsr_hpc.bench.{op}":
            raise  # a dependency of the benchmark is missing: show the real error
        return None
    return module.main


def _static_rows(records: list[dict]) -> list[dict]:
    rows = []
    for r in records:
        c = r["constexprs"]
        threads = 32 * r["num_warps"]
        if r["kernel"].startswith("_info_nce"):
            unit, per_thread = "logit (loop)", c["BLOCK_N"] * c["BLOCK_M"] / threads
            per_unit = r["loop_instr"] / per_thread if r.get("loop_instr") else None
        elif r["kernel"] == "_exclusion_words_kernel":
            # No loop: the whole kernel (both branches) per bit of the bitmap it writes.
            unit, per_thread = "bitmap bit", c["BLOCK_N"] * c["WORDS"] * 32 / threads
            per_unit = r["instr"] / per_thread if r.get("instr") else None
        else:
            unit, per_thread = "element", c["BLOCK_H"] * c["BLOCK_W"] / threads
            per_unit = r["instr"] / per_thread if r.get("instr") else None
        tiles = "x".join(str(c[k]) for k in ("BLOCK_N", "BLOCK_M", "BLOCK_D", "BLOCK_H", "BLOCK_W") if k in c)
        loads = (r.get("ldg") or 0) + (r.get("ldgsts") or 0)
        vec = (r.get("ldg128") or 0) + (r.get("ldgsts128") or 0)
        rows.append({
            "case": r["case"], "kernel": r["kernel"], "tiles": tiles, "warps": r["num_warps"],
            "stages": r["num_stages"], "registers": r["registers"],
            "spill_bytes": (r["stack"] or 0) + (r["local"] or 0), "stl": r.get("stl"),
            "shared_B": r["shared"], "global_loads": loads, "vector_loads_128b": vec,
            "instr": r.get("instr"), "loop_instr": r.get("loop_instr"), "unit": unit,
            "instr_per_unit": round(per_unit, 1) if per_unit else None,
        })  # fmt: skip
    return rows


def _masked_summary(rows: list[dict]) -> str:
    """The exclusion kernels' key loop (masked branch included) against the same kernel without
    exclusion, in SASS instructions per logit: the cost of a key tile that needs the mask."""
    per = {(r["case"], r["kernel"]): r["instr_per_unit"] for r in rows}
    lines = ["Masked key tile vs unmasked, instructions per logit (goal: at most 1.5x):", ""]
    lines += ["| dtype, d | kernel | unmasked | masked | ratio |", "|---|---|---|---|---|"]
    for (case, kernel), masked in per.items():
        if not case.startswith("info_nce") or not case.endswith("exclusion=True"):
            continue
        plain = per.get((case.replace("exclusion=True", "exclusion=False"), kernel))
        if plain and masked:
            label = case.removeprefix("info_nce ").removesuffix(" exclusion=True")
            lines.append(f"| {label} | {kernel} | {plain} | {masked} | {masked / plain:.2f}x |")
    return "\n".join(lines)


def run_static(no_csv: bool, only: str = "") -> int:
    """Compile every shipped configuration for sm_90 and report what the SASS shows."""
    sys.path.insert(0, str(REPO))
    import torch

    from spsr_hpc.bench import common

    prov = common.provenance(torch.device("cpu"))  # before the (minutes-long) compile
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = REPO / "tests" / "aot_compile_kernels.py"
    cmd = [sys.executable, str(script), "--sass", *(["--only", only] if only else [])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    records = [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith("AOT_KERNEL")]
    errors = [line for line in lines if line.startswith(("AOT_ERROR", "AOT_SKIP"))]
    for line in errors:
        print(line[:2000], file=sys.stderr)
    if not records:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    rows = _static_rows(records)
    columns = list(rows[0])
    table = common.format_table(rows, columns)
    header = (
        f"sm_90 compile report (ptxas bundled with triton {prov['triton']}), git {prov['git']}, "
        f"{prov['date']}; instructions per logit = SASS instructions in the key loop / logits per "
        "thread per iteration (the exclusion kernels' loop includes the masked branch)"
    )
    summary = _masked_summary(rows)
    print(header)
    print(table)
    print(summary)
    if not no_csv:
        common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        (common.RESULTS_DIR / "kernels_static.md").write_text(f"{header}\n\n```\n{table}\n```\n\n{summary}\n")
        keep = {"date": prov["date"], "triton": prov["triton"], "git": prov["git"], "target": "sm_90"}
        path = common.append_rows("kernels_static.csv", [{**row, **keep} for row in rows])
        print(f"wrote {common.RESULTS_DIR / 'kernels_static.md'}; appended {len(rows)} rows to {path}")
    return 1 if errors or proc.returncode else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Other options go to the op."
    )
    parser.add_argument("--op", choices=(*OPS, "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="small shapes and few repetitions")
    parser.add_argument("--no-csv", action="store_true", help="do not append rows to benchmarks/results/")
    parser.add_argument("--device", default=None, type=_device,
                        help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--static", action="store_true", help="sm_90 compiled-code report instead of timings (no GPU needed)"
    )
    parser.add_argument(
        "--static-only", default="", metavar="TEXT",
        help="--static: only the cases whose name contains TEXT (e.g. 'gradient_map torch.float32 padding=1')"
    )
    args, rest = parser.parse_known_args(argv)
    if args.static:
        return run_static(args.no_csv, args.static_only)
    if rest and args.op == "all":
        parser.error(f"options {rest} are op-specific; pick one with --op")
    common = [*(["--quick"] if args.quick else []), *(["--no-csv"] if args.no_csv else []),
              *(["--device", args.device] if args.device else [])]  # fmt: skip

    status = 0
    for op in OPS if args.op == "all" else (args.op,):
        op_main = _load_main(op)
        if op_main is None:
            print(f"[bench_kernels] {op}: spsr_hpc/bench/{op}.py is not there yet; skipped.")
            status = status or (1 if args.op != "all" else 0)
            continue
        print(f"[bench_kernels] === {op} ===", flush=True)
        status = op_main([*common, *rest]) or status
    return status


if __name__ == "__main__":
    sys.exit(main())
