#!/usr/bin/env bash
# GPU check of the fused kernels on a CUDA machine, from the repo root, in under 8 minutes:
#   bash scripts/gpu_check.sh            # total budget 470 s (override: GPU_CHECK_BUDGET=...)
#
# Steps, each under its own `timeout` and clipped to what is left of the budget, none able to
# stop the ones after it:
#   1. the device (nvidia-smi: name, memory, max clocks) -> <run dir>/device.txt
#   2. the kernel tests natively (compiled Triton, no interpreter; `gpu` tests included), one
#      step per file -> <run dir>/tests_{gradient_map,info_nce}.xml (JUnit, one record per test)
#   3. gradient-map benchmark, Triton vs eager (conv, slices) vs torch.compile, fwd / bwd /
#      fwd+bwd, fp32 then bf16 -> rows in benchmarks/results/gradient_map.csv
#   4. InfoNCE benchmark, Triton vs chunked vs naive vs torch.compile(naive), fwd+bwd, with the
#      NSE's exclusion (radius 4, 3 centres), N = M = 1024 and 10^4 (a 100x100 map) at B = 1, 8,
#      fp32 then bf16; then the NSE's full batch (B = 48) for the memory-frugal providers
#      -> rows in benchmarks/results/info_nce.csv, each written as soon as it is measured
#   5. the sm_90 compiled-code report (launch/bench_kernels.py --static; needs no GPU, so it
#      runs last and only if time is left) -> benchmarks/results/kernels_static.{csv,md}
# Every row carries the device name, versions and git revision. The whole output is logged to
# <run dir>/log.txt and each step's exit status to <run dir>/steps.txt, with <run dir> =
# benchmarks/results/gpu_check_<UTC time>/. A failing or timed-out step is recorded and the
# next one runs; figures already written stay. Commit benchmarks/results/ afterwards.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
if [[ -x "${SPSR_VENV:-$repo/.venv}/bin/python" ]]; then
    py="${SPSR_VENV:-$repo/.venv}/bin/python"
else
    py="$(command -v python || command -v python3)"
fi
budget="${GPU_CHECK_BUDGET:-470}"
run_dir="benchmarks/results/gpu_check_$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$run_dir"
steps="$run_dir/steps.txt"
# The interpreter must stay off: these checks are about the compiled kernels.
unset TRITON_INTERPRET
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee -a "$run_dir/log.txt") 2>&1

echo "== gpu_check $(date -u +%FT%TZ) on $(hostname); python: $py; budget ${budget}s; results: $run_dir"
if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no usable CUDA device; nothing to check" | tee -a "$steps"
    exit 2
fi
{
    "$py" -c "import torch, triton; print('device:', torch.cuda.get_device_name(0)); print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv 2>/dev/null
    git rev-parse --short HEAD 2>/dev/null
} | tee "$run_dir/device.txt"

status=0
# step NAME LIMIT_S COMMAND...: run under min(LIMIT_S, what is left of the budget); log the result.
step() {
    local name="$1" limit="$2"
    shift 2
    local left=$((budget - SECONDS))
    if ((left < 20)); then
        echo "$name: skipped, ${left}s of the budget left" | tee -a "$steps"
        status=1
        return
    fi
    ((limit > left - 5)) && limit=$((left - 5))
    echo "== $name (limit ${limit}s, ${SECONDS}s elapsed)"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    local verdict="ok"
    ((rc == 124 || rc == 137)) && verdict="timed out"
    ((rc != 0 && rc != 124 && rc != 137)) && verdict="failed"
    echo "$name: $verdict (exit $rc) in $((SECONDS - t0))s" | tee -a "$steps"
    ((rc != 0)) && status=1
}

# One step per file, each with its own JUnit record: a file that runs out of time (every kernel
# variant compiles on first use) loses only its own record.
step "tests gradient_map" 90 "$py" -m pytest tests/test_gradient_map.py -m "gpu or not slow" \
    -q -p no:cacheprovider --durations=10 --junitxml="$run_dir/tests_gradient_map.xml"
step "tests info_nce" 110 "$py" -m pytest tests/test_info_nce.py -m "gpu or not slow" \
    -q -p no:cacheprovider --durations=10 --junitxml="$run_dir/tests_info_nce.xml"
for dtype in float32 bfloat16; do
    step "gradient_map bench $dtype" 50 "$py" launch/bench_kernels.py --op gradient_map --dtype "$dtype"
done
for dtype in float32 bfloat16; do
    step "info_nce bench $dtype" 80 "$py" launch/bench_kernels.py --op info_nce --dtype "$dtype" \
        --sizes 1024 10000 --batches 1 8
done
step "info_nce bench NSE batch" 45 "$py" launch/bench_kernels.py --op info_nce --dtype bfloat16 \
    --sizes 10000 --batches 48 --providers triton chunked
# Needs no GPU (it is committed from CPU runs too): only with time to spare.
step "static report" 90 "$py" launch/bench_kernels.py --static

echo "== gpu_check done in ${SECONDS}s, status $status"
cat "$steps"
exit "$status"
