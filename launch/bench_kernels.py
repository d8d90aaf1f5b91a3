"""Kernel microbenchmarks: Triton vs PyTorch eager vs torch.compile (DESIGN.md, user job 3).

    python launch/bench_kernels.py                       # every op, full shapes
    python launch/bench_kernels.py --op gradient_map --quick --no-csv
    python launch/bench_kernels.py --op gradient_map --dtype bfloat16 --passes fwd+bwd

--quick, --no-csv and --device go to every op; any other option is passed to the op's own
benchmark (so it needs a single --op). Each op's `spsr_hpc.bench.<op>.main(argv)` prints a
table and appends rows to benchmarks/results/<op>.csv.
"""

from __future__ import annotations

import argparse
import importlib
import sys

OPS = ("gradient_map", "info_nce")


def _load_main(op: str):
    try:
        module = importlib.import_module(f"spsr_hpc.bench.{op}")
    except ModuleNotFoundError as err:
        if err.name != f"spsr_hpc.bench.{op}":
            raise  # a dependency of the benchmark is missing: show the real error
        return None
    return module.main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Other options go to the op."
    )
    parser.add_argument("--op", choices=(*OPS, "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="small shapes and few repetitions")
    parser.add_argument("--no-csv", action="store_true", help="do not append rows to benchmarks/results/")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    args, rest = parser.parse_known_args(argv)
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
