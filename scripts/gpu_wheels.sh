#!/usr/bin/env bash
# Wheels for the training step of scripts/gpu_check.sh on a GPU machine without a network:
#   bash scripts/gpu_wheels.sh [DIR]            # default DIR: .whl (add /.whl/ to .git/info/exclude)
# then, there: bash scripts/gpu_check.sh --wheels DIR
#
# Run here, with a network (PyPI). Target: CPython 3.12 on manylinux x86_64 (override with
# GPU_WHEELS_PYTHON=3.11 etc.). The GPU machine already has torch, numpy, pyyaml, tqdm, psutil,
# packaging, ninja, py-cpuinfo, msgpack, einops, nvidia-ml-py, typing-extensions, scipy and
# torchvision; it lacks these, fetched here at the versions the project's venv was tested with:
#   deepspeed 0.19.8 (sdist only: built here into a pure-Python wheel, no ops compiled) and its
#     missing dependencies hjson, pydantic, pydantic-core (compiled: the target's wheel),
#     annotated-types, typing-inspection;
#   webdataset 1.0.2 and braceexpand;
#   lpips 0.1.4 (the metrics import it; its VGG/AlexNet weights are not needed by the step);
#   typing-extensions 4.16.0 (pydantic 2.14 needs >= 4.16; the machine's own may be older);
#   setuptools 84.2.1 (gpu_check builds the project with --no-build-isolation, and pyproject's
#     license string needs setuptools >= 77; the machine's own may be older).
# One version of each (two would stop the --no-deps install there); ~6 MB in all.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${1:-}" in
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    -*) echo "error: unknown option $1; usage: bash scripts/gpu_wheels.sh [DIR]" >&2; exit 2 ;;
esac
if (($# > 1)); then
    echo "error: one folder expected, got $#: $*; usage: bash scripts/gpu_wheels.sh [DIR]" >&2
    exit 2
fi
dir="${1:-$repo/.whl}"
pyver="${GPU_WHEELS_PYTHON:-3.12}"
py="${SPSR_PYTHON:-$repo/.venv/bin/python}"
[[ -x "$py" ]] || py="$(command -v python3)"
if [[ -e "$dir" && ! -d "$dir" ]]; then
    echo "error: $dir is a file, not a folder: name another DIR" >&2
    exit 2
fi
mkdir -p "$dir"
# Without a network pip's own error names a package only: say what this step needs.
trap 'rc=$?; ((rc)) && echo "error: fetching the wheels failed (exit $rc): this step needs PyPI (a network); run it on a machine that has one and carry $dir to the GPU machine" >&2' EXIT
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
binary=(hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        webdataset==1.0.2 braceexpand==0.1.7 typing-extensions==4.16.0 setuptools==84.2.1)
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    "${platforms[@]}" -d "$dir" "${binary[@]}"
# lpips and deepspeed publish no wheel for every tag: build pure-Python wheels (the setup scripts
# need torch importable here; DS_BUILD_OPS=0 compiles no DeepSpeed op ahead of time).
DS_BUILD_OPS=0 "$py" -m pip wheel --quiet --no-deps --no-build-isolation -w "$dir" deepspeed==0.19.8 lpips==0.1.4
trap - EXIT
# A wheel tagged for this machine's Python only would not install there.
for whl in "$dir"/*.whl; do
    case "$(basename "$whl")" in
        *-py3-none-any.whl|*-py2.py3-none-any.whl|*-cp"${pyver/./}"-*) ;;
        *) echo "error: $whl is not for CPython $pyver; remove it and run again" >&2; exit 1 ;;
    esac
done
ls -l "$dir"
echo "wheels in $dir; on the GPU machine: bash scripts/gpu_check.sh --wheels $dir"
