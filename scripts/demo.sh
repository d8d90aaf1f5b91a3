#!/usr/bin/env bash
# Set up the virtual environment (idempotent) and run the main job on bundled data:
# shards from scikit-image's photos, a PSNR stage, then ESRGAN and SPSR-G stages with DeepSpeed on two
# CPU processes, evaluation (LPIPS / PSNR / SSIM) against bicubic, and a report in runs/demo/report.md.
# Extra arguments go to launch/demo.py (e.g. --out runs/mydemo --nproc 1).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
cd "$repo"
exec "${SPSR_VENV:-$repo/.venv}/bin/python" launch/demo.py "$@"
