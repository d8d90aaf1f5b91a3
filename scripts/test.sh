#!/usr/bin/env bash
# Set up the virtual environment (idempotent) and run the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k gradient_map -x`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
cd "$repo"
exec "${SPSR_VENV:-$repo/.venv}/bin/python" -m pytest "$@"
