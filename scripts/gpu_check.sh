#!/usr/bin/env bash
# GPU check of the fused kernels, on a CUDA machine, from the repo root:
#   bash scripts/gpu_check.sh
# 1. the kernel tests natively (compiled Triton, no interpreter; `gpu` tests included),
# 2. the kernel benchmarks (Triton vs eager vs torch.compile), rows appended to
#    benchmarks/results/<op>.csv.
# Everything is logged to benchmarks/results/gpu_check_<UTC date>.log. Budget: 8 minutes
# (tests 180 s, gradient_map bench 120 s, info_nce bench 150 s, each under `timeout`).
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
if [[ -x "${SPSR_VENV:-$repo/.venv}/bin/python" ]]; then
    py="${SPSR_VENV:-$repo/.venv}/bin/python"
else
    py="$(command -v python || command -v python3)"
fi
mkdir -p benchmarks/results
log="benchmarks/results/gpu_check_$(date -u +%Y%m%dT%H%M%SZ).log"
# The interpreter must stay off: these checks are about the compiled kernels.
unset TRITON_INTERPRET
exec > >(tee -a "$log") 2>&1

echo "== gpu_check $(date -u +%FT%TZ) on $(hostname); python: $py"
"$py" - <<'PY' || { echo "gpu_check: no usable CUDA device; nothing to check"; exit 2; }
import sys, torch, triton
print("torch", torch.__version__, "triton", triton.__version__)
if not torch.cuda.is_available():
    sys.exit(1)
print("device:", torch.cuda.get_device_name(0))
PY
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>/dev/null || true

status=0
tests=()
for f in tests/test_gradient_map.py tests/test_info_nce.py; do
    [[ -f "$f" ]] && tests+=("$f") || echo "gpu_check: $f missing, skipped"
done
echo "== tests: ${tests[*]}"
SECONDS=0
timeout 180 "$py" -m pytest "${tests[@]}" -m "gpu or not slow" -q -p no:cacheprovider --durations=10 || status=1
echo "== tests took ${SECONDS}s (status so far: $status)"

# One op at a time (what `launch/bench_kernels.py --op all` runs), each with its own time limit.
for op_limit in gradient_map:120 info_nce:150; do
    op="${op_limit%%:*}"
    echo "== benchmark $op"
    SECONDS=0
    timeout "${op_limit##*:}" "$py" launch/bench_kernels.py --op "$op" || status=1
    echo "== benchmark $op took ${SECONDS}s"
done

echo "== gpu_check done, status $status; log: $log"
exit "$status"
