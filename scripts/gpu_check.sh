#!/usr/bin/env bash
# First check on a GPU machine, from the repo root, in under 8 minutes, with no network:
#   bash scripts/gpu_check.sh                      # everything; total budget 470 s
#   bash scripts/gpu_check.sh --wheels .whl        # + a two-step bf16 SPSR-G run (deepspeed etc. from wheels)
#   bash scripts/gpu_check.sh --no-gpu             # only the steps that need no GPU (CI runs this)
# Options: --budget S (default 470, or GPU_CHECK_BUDGET), --results DIR (default benchmarks/results),
#          --static-only TEXT (only the static-report cases whose name contains TEXT),
#          --python PY (default: $SPSR_PYTHON, else .venv/bin/python, else python3).
#
# Works on a bare machine with Python >= 3.10, torch >= 2.11, triton >= 3.6, numpy, pytest,
# setuptools (the lent GPU machines: Python 3.12, torch 2.11 cu130, triton 3.6, pytest, pytest-xdist,
# scikit-image, matplotlib, pyyaml, pillow; no deepspeed, webdataset, lpips or DALI).
#
# Steps, each under its own `timeout -s INT` (pytest and the benchmarks then stop cleanly and keep
# what they wrote) and clipped to what is left of the budget; a failed or timed-out step is
# recorded and the next one runs:
#   install   offline: the --wheels DIR wheels, then pip install --no-deps --no-build-isolation
#             --no-index --target <tmp>/site . (with the carried setuptools); PYTHONPATH=<tmp>/site:<repo>
#   imports   spsr_kernels, spsr_hpc, versions against the floors, the benchmarks' configs found
#             in this checkout (SPSR_REPO); device.txt (GPU name, driver, git revision)
#   warm-up   (GPU) the kernel tests with every core (pytest-xdist when present): each Triton
#             specialisation is compiled once into the cache before anything is timed
#   tests     (GPU) each kernel test file natively -> <run>/tests_<file>.xml (JUnit, written
#             also when the step's time runs out; per-test limit with pytest-timeout when present)
#   train     (GPU; with --wheels after importing deepspeed and webdataset as a step of its own)
#             one bf16 SPSR-G run of 2 steps on one GPU, then the paper-size step vs the
#             reference (fp32 and bf16 rows) -> <results>/train_vs_reference.csv
#   benches   (GPU) gradient-map and InfoNCE benchmarks, fp32 then bf16 -> <results>/*.csv, each
#             row appended as soon as it is measured; the torch.compile baselines last
#   static    sm_90 compiled-code report (no GPU) -> <results>/kernels_static.{csv,md}
# The whole output goes to <run>/log.txt and each step's status to <run>/steps.txt, with
# <run> = <results>/gpu_check_<UTC time>/. Exit 0 when every step that ran passed.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

no_gpu=0
wheels=""
budget="${GPU_CHECK_BUDGET:-470}"
results="benchmarks/results"
static_only=""
py="${SPSR_PYTHON:-}"
die() { echo "error: $*" >&2; exit 2; }
# value OPTION "$@": the option's argument, or exit 2 naming the option
value() { [[ $# -ge 2 && "$2" != --* ]] || die "$1 needs a value (see --help)"; printf '%s' "$2"; }
while (($#)); do
    case "$1" in
        --no-gpu) no_gpu=1 ;;
        --wheels) wheels="$(value "$@")" || exit 2; shift ;;
        --budget) budget="$(value "$@")" || exit 2; shift ;;
        --results) results="$(value "$@")" || exit 2; shift ;;
        --static-only) [[ $# -ge 2 ]] || die "--static-only needs text"; static_only="$2"; shift ;;
        --python) py="$(value "$@")" || exit 2; shift ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done
[[ "$budget" =~ ^[0-9]+$ ]] || die "--budget $budget: seconds, a whole number (e.g. 470)"
[[ -z "$py" || -x "$py" || -n "$(command -v "$py" 2>/dev/null)" ]] || die "--python $py: no such interpreter"
[[ ! -e "$results" || -d "$results" ]] || die "--results $results is a file, not a folder"
if [[ -z "$py" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then py="$repo/.venv/bin/python"; else py="$(command -v python3 || command -v python)"; fi
fi
if [[ -n "$wheels" && ! -d "$wheels" ]]; then
    echo "error: --wheels $wheels is not a folder; make one with scripts/gpu_wheels.sh" >&2
    exit 2
fi
mkdir -p "$results" || die "--results $results: cannot create that folder"
results="$(cd "$results" && pwd)" || die "--results $results: cannot enter that folder"
run_dir="$results/gpu_check_$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$run_dir"
steps="$run_dir/steps.txt"
: >"$steps"
site="$(mktemp -d "${TMPDIR:-/tmp}/spsr_gpu_check.XXXXXX")"
trap 'rm -rf "$site"' EXIT
# The interpreter must stay off: these checks are about the compiled kernels.
unset TRITON_INTERPRET
# SPSR_REPO: the benchmarks read configs/ and stamp rows with the git revision of this checkout,
# not of the throwaway install folder that spsr_hpc is imported from.
export SPSR_RESULTS_DIR="$results" SPSR_REPO="$repo" PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
exec > >(tee -a "$run_dir/log.txt") 2>&1

mode="GPU"
((no_gpu)) && mode="no-GPU"
echo "== gpu_check ($mode) $(date -u +%FT%TZ) on $(hostname); python: $py; budget ${budget}s; results: $results; run: $run_dir"

status=0
# step NAME LIMIT_S COMMAND...: run under min(LIMIT_S, what is left of the budget); log the result.
# SIGINT first (pytest writes its JUnit file and the benchmarks keep their rows), KILL 15 s later.
step() {
    local name="$1" limit="$2"
    shift 2
    local left=$((budget - SECONDS))
    if ((left < 15)); then
        echo "$name: skipped, ${left}s of the budget left" | tee -a "$steps"
        status=1
        return 1
    fi
    ((limit > left - 5)) && limit=$((left - 5))
    echo "== $name (limit ${limit}s, ${SECONDS}s elapsed)"
    local t0=$SECONDS rc
    if [[ "${GPU_CHECK_DRY_RUN:-0}" == 1 ]] && [[ "$name" != install && "$name" != imports ]]; then
        printf 'DRY %s:' "$name"; printf ' %q' "$@"; printf '\n'  # tests: the plan, nothing run
        rc=0
    else
        timeout -s INT --kill-after=15 "$limit" "$@"
        rc=$?
    fi
    local verdict="ok"
    ((rc == 124 || rc == 137)) && verdict="timed out"
    ((rc != 0 && rc != 124 && rc != 137)) && verdict="failed"
    echo "$name: $verdict (exit $rc) in $((SECONDS - t0))s" | tee -a "$steps"
    ((rc != 0)) && status=1
    return "$rc"
}
skip() { echo "$1: skipped ($2)" | tee -a "$steps"; }

# --- install (offline) ---------------------------------------------------------------------------
install() {
    # The wheels first: they carry setuptools (pyproject's license string needs >= 77), which the
    # project's build below imports through PYTHONPATH instead of the machine's own.
    if [[ -n "$wheels" ]]; then
        shopt -s nullglob
        local whl=("$wheels"/*.whl)
        ((${#whl[@]})) || { echo "no .whl files in $wheels"; return 1; }
        "$py" -m pip install --quiet --no-deps --no-index --no-compile --target "$site/site" "${whl[@]}" || return 1
    fi
    PYTHONPATH="$site/site${PYTHONPATH:+:$PYTHONPATH}" \
        "$py" -m pip install --quiet --no-deps --no-build-isolation --no-index --target "$site/site" "$repo" || return 1
    rm -rf "$repo/build"  # setuptools' build folder (the egg-info is gitignored and harmless)
}
export py site repo wheels run_dir
export -f install
if ! step "install" 120 bash -c install; then
    echo "gpu_check: the offline install failed; nothing else can run"
    cat "$steps"
    exit 1
fi
export PYTHONPATH="$site/site:$repo"

# --- imports and versions ------------------------------------------------------------------------
step "imports" 60 "$py" - <<'EOF' > >(tee "$run_dir/device.txt")
import platform, subprocess, sys
import torch
import spsr_kernels
from spsr_kernels._triton import HAS_TRITON, TORCH_MIN, TRITON_MIN, TRITON_MISSING, version_tuple
import spsr_hpc, spsr_hpc.bench.gradient_map, spsr_hpc.bench.info_nce, spsr_hpc.config  # noqa: F401
from spsr_hpc.bench.common import REPO_ROOT, git_revision
from spsr_hpc.bench.train_vs_reference import PAPER_CONFIG
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "missing"
print(f"python {platform.python_version()}  torch {torch.__version__}  triton {tv}  cuda {torch.version.cuda}")
print(f"spsr_kernels from {spsr_kernels.__file__}")
bad = []
if version_tuple(torch.__version__) < TORCH_MIN:
    bad.append(f"torch {torch.__version__} is below the supported {'.'.join(map(str, TORCH_MIN))}")
if not HAS_TRITON:
    bad.append(TRITON_MISSING)
import importlib.util
for name in ("deepspeed", "webdataset", "lpips", "nvidia.dali"):  # only the training step needs them
    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        found = False
    print(f"{name}: {'installed' if found else 'absent'}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name} sm_{p.major}{p.minor} {p.total_memory / 2**30:.1f} GiB {p.multi_processor_count} SMs")
    try:
        print(subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version",
                              "--format=csv"], capture_output=True, text=True, timeout=20).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
else:
    print("no CUDA device visible")
print("git", git_revision(), "checkout", REPO_ROOT)
if not PAPER_CONFIG.is_file():
    bad.append(f"the benchmarks' config {PAPER_CONFIG} does not exist (SPSR_REPO={REPO_ROOT})")
if bad:
    sys.exit("error: " + "; ".join(bad))
EOF

has_cuda=0
if ((!no_gpu)) && { [[ "${GPU_CHECK_DRY_RUN:-0}" == 1 ]] ||
                    "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; }; then
    has_cuda=1  # a dry run (GPU_CHECK_DRY_RUN=1, tests) prints the GPU steps' commands instead
fi
if ((!no_gpu && !has_cuda)); then
    echo "gpu_check: no usable CUDA device; the GPU steps are skipped (use --no-gpu to say so)" | tee -a "$steps"
    status=1
fi

timeout_opt=()
"$py" -c "import pytest_timeout" 2>/dev/null && timeout_opt=(-p timeout --timeout=90)
kernel_tests=(tests/test_gradient_map.py tests/test_info_nce.py)
if ((has_cuda)); then
    # --- warm-up: compile every specialisation the tests and benchmarks use, on every core -------
    xdist=()
    "$py" -c "import xdist" 2>/dev/null && xdist=(-n "$(($(nproc) > 8 ? 8 : $(nproc)))")
    step "warm-up (compile)" 150 "$py" -m pytest "${kernel_tests[@]}" -m "gpu or not slow" -q -p no:cacheprovider \
        "${xdist[@]}" --junitxml="$run_dir/warmup.xml"
    # --- kernel tests natively, one JUnit file per file --------------------------------------------
    for f in "${kernel_tests[@]}"; do
        name="$(basename "$f" .py)"
        step "tests ${name#test_}" 75 "$py" -m pytest "$f" -m "gpu or not slow" -q -p no:cacheprovider \
            --durations=10 "${timeout_opt[@]}" --junitxml="$run_dir/tests_${name#test_}.xml"
    done
elif ((no_gpu)); then
    skip "warm-up, tests, benchmarks" "--no-gpu"
fi

# --- one bf16 SPSR-G run on one GPU (needs deepspeed, webdataset: --wheels) ----------------------
# Before the kernel benchmarks: its rows (train_vs_reference.csv) are what no CPU can measure, and
# a benchmark that runs to its limit must not leave it without time. Into the throwaway folder:
# the log keeps the losses and the summary line.
train_steps() {
    if ! step "train: shards of the bundled photos" 60 "$py" launch/make_shards.py --bundled \
            --out "$site/shards" --crop 128 --step 128 --workers 4 --no-progress; then
        skip "train bf16 SPSR-G (2 steps, 1 GPU)" "no shards"
        return
    fi
    step "train bf16 SPSR-G (2 steps, 1 GPU)" 120 "$py" launch/train.py --config configs/tiny_spsr_g.yaml \
        "data.shards=$site/shards" "logging.run_dir=$site/train" train.device=cuda train.bf16=true \
        train.max_steps=2 train.fusion_warmup_steps=1 checkpoint.every=0 logging.image_every=0 \
        logging.tensorboard=false logging.progress_bar=false logging.log_every=1 val.dir=null
    # The paper-size SPSR-G step rows (reference fp32, ours fp32, ours bf16 + channels_last),
    # interleaved -> <results>/train_vs_reference.csv
    step "train step vs reference (paper size)" 150 "$py" launch/bench_train.py --vs-reference --rounds 7
}
if ((has_cuda)) && [[ -n "$wheels" ]]; then
    # A step of its own, so that an import error of the carried wheels is in log.txt.
    if step "wheels import (deepspeed, webdataset)" 60 "$py" -c \
            "import deepspeed, webdataset; print('deepspeed', deepspeed.__version__, 'from', deepspeed.__file__)"; then
        train_steps
    else
        skip "train bf16 SPSR-G" "the carried wheels do not import (log.txt has the error)"
    fi
elif ((has_cuda)) && "$py" -c "import deepspeed, webdataset" >/dev/null 2>&1; then
    train_steps  # installed on the machine itself
elif ((has_cuda)); then
    skip "train bf16 SPSR-G" "deepspeed/webdataset not importable: pass --wheels DIR (scripts/gpu_wheels.sh)"
else
    skip "train bf16 SPSR-G" "needs a GPU"
fi

# --- kernel benchmarks: each row appended as soon as it is measured -------------------------------
# The fused kernels and the eager baselines at every size first; the torch.compile baselines
# (a cold Inductor compile per shape) last, so that they cannot use up a step's time first.
if ((has_cuda)); then
    for dtype in float32 bfloat16; do
        step "gradient_map bench $dtype" 45 "$py" launch/bench_kernels.py --op gradient_map --dtype "$dtype" \
            --providers triton,eager_conv,eager_slice
    done
    for dtype in float32 bfloat16; do
        step "info_nce bench $dtype" 60 "$py" launch/bench_kernels.py --op info_nce --dtype "$dtype" \
            --sizes 1024 10000 --batches 1 8 --providers triton chunked naive
    done
    step "info_nce bench NSE batch" 35 "$py" launch/bench_kernels.py --op info_nce --dtype bfloat16 \
        --sizes 10000 --batches 48 --providers triton chunked
    step "gradient_map bench compile baseline" 60 "$py" launch/bench_kernels.py --op gradient_map \
        --dtype bfloat16 --providers compile_slice
    step "info_nce bench compile baseline" 60 "$py" launch/bench_kernels.py --op info_nce --dtype bfloat16 \
        --sizes 1024 10000 --batches 1 8 --providers compile
fi

# --- static sm_90 report (no GPU needed) ---------------------------------------------------------
static_limit=150  # on the GPU machine: what is left after the GPU steps (a CPU run can make it later)
((no_gpu)) && static_limit=600  # alone here: ~70 s of one core, minutes on a loaded 2-core machine
step "static sm_90 report" "$static_limit" "$py" launch/bench_kernels.py --static --static-only "$static_only"

echo "== gpu_check done in ${SECONDS}s, status $status"
cat "$steps"
exit "$status"
