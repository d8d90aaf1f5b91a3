#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install spsr-hpc into it
# in editable mode with the dev and DALI extras. Idempotent: re-running after the first time
# only reinstalls when pyproject.toml changed.
#
#   SPSR_VENV      where the venv lives (default: <repo>/.venv)
#   SPSR_PYTHON    interpreter used to create it (default: python3)
#   SPSR_EXTRAS    extras to install (default: dev,dali-cuda13)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SPSR_VENV:-$repo/.venv}"
py="${SPSR_PYTHON:-python3}"
extras="${SPSR_EXTRAS:-dev,dali-cuda13}"

if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating virtual environment at $venv"
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
fi

stamp="$venv/.spsr-installed"
want="$(cat "$repo/pyproject.toml" | sha256sum | cut -d' ' -f1) $extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

# Machines of this project carry torch 2.14.1 / torchvision 0.29.1 wheels on local disk;
# install those first so pip never downloads a multi-GB CUDA build. Elsewhere (a cluster
# with its own CUDA build of torch already in the venv) this step is skipped.
if ! "$venv/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
    if compgen -G "/opt/wheels/torch-2.14.1*" >/dev/null || compgen -G "/opt/pypi-more/files/torch-2.14.1*" >/dev/null; then
        echo "[setup] installing torch 2.14.1 / torchvision 0.29.1 from local wheels"
        "$venv/bin/python" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
    fi
fi

echo "[setup] installing spsr-hpc[$extras] (editable)"
"$venv/bin/python" -m pip install --quiet -e "$repo[$extras]"
echo "$want" > "$stamp"
echo "[setup] done: $venv"
