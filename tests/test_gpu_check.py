"""scripts/gpu_check.sh keeps working between GPU leases: its --no-gpu steps (offline install into a
throwaway folder, imports and versions, the static sm_90 report) run here, and the version floors
it checks agree with pyproject.toml."""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _probe_wheel(folder: Path) -> Path:
    """A minimal valid pure-Python wheel (one module), written with zipfile."""
    name = "spsr_gpu_check_probe-0.0.0"
    files = {
        "spsr_gpu_check_probe.py": "VALUE = 1\n",
        f"{name}.dist-info/METADATA": "Metadata-Version: 2.1\nName: spsr-gpu-check-probe\nVersion: 0.0.0\n",
        f"{name}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"),
    }
    record = "".join(f"{path},,\n" for path in files) + f"{name}.dist-info/RECORD,,\n"
    path = folder / f"{name}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for arc, text in files.items():
            z.writestr(arc, text)
        z.writestr(f"{name}.dist-info/RECORD", record)
    return path


def _floor(requirement: str) -> tuple[int, ...]:
    text = (REPO / "pyproject.toml").read_text()
    m = re.search(rf'"{requirement}>=([0-9.]+)', text)
    assert m, f"pyproject.toml declares no floor for {requirement}"
    return tuple(int(x) for x in m.group(1).split("."))


def test_version_floors_agree():
    import test_kernels_aot

    from spsr_kernels import _triton

    assert _floor("torch") == _triton.TORCH_MIN
    assert _floor("triton") == _triton.TRITON_MIN == test_kernels_aot.TRITON_MIN
    assert _triton.version_tuple("3.6.0+git9f1c2") == (3, 6, 0)
    assert _triton.version_tuple("2.11.0a0+cu130") == (2, 11, 0)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils timeout")
def test_gpu_check_no_gpu(tmp_path):
    """~40 s on 2 cores: pip's offline build, one import pass, one static-report case."""
    results = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SPSR_RESULTS_DIR")}
    env.update(SPSR_PYTHON=sys.executable, TMPDIR=str(tmp_path))
    before = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--no-gpu", "--results", str(results),
         "--static-only", "gradient_map torch.float32 padding=1 contiguous W=77"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    (run,) = results.glob("gpu_check_*")
    steps = (run / "steps.txt").read_text()
    for name in ("install: ok", "imports: ok", "static sm_90 report: ok"):
        assert name in steps, steps
    assert "warm-up, tests, benchmarks: skipped (--no-gpu)" in steps
    device = (run / "device.txt").read_text()
    assert "torch " in device and "spsr_kernels from " + str(tmp_path) in device, device
    # spsr_hpc comes from the throwaway install, yet the benchmarks read this checkout's configs
    # and stamp their rows with its revision (SPSR_REPO), not "unknown".
    assert f"checkout {REPO}" in device and "git unknown" not in device, device
    with (results / "kernels_static.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["kernel"] for r in rows} == {"_gradient_map_fwd_kernel", "_gradient_map_bwd_kernel"}
    assert all(r["case"] == "gradient_map torch.float32 padding=1 contiguous W=77" for r in rows)
    assert all(int(r["registers"]) > 0 for r in rows)
    assert "log.txt" in {p.name for p in run.iterdir()}
    after = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    assert after == before, "gpu_check --no-gpu changed the working tree"
    assert not list(tmp_path.glob("spsr_gpu_check.*")), "the throwaway install folder was left behind"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_refuses_a_missing_wheels_folder(tmp_path):
    script = str(REPO / "scripts" / "gpu_check.sh")
    proc = subprocess.run(["bash", script, "--wheels", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --wheels ") and "scripts/gpu_wheels.sh" in proc.stderr


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils timeout")
def test_gpu_check_gpu_plan(tmp_path):
    """The GPU path's wiring without a GPU (GPU_CHECK_DRY_RUN=1: install and imports run, the GPU
    steps print their commands): every step in order, a JUnit file per test file, the per-test
    limit when pytest-timeout is there, the bf16 training step when deepspeed imports. ~20 s."""
    wheels = tmp_path / "whl"
    wheels.mkdir()
    _probe_wheel(wheels)  # the --wheels install must take it offline
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SPSR_RESULTS_DIR")}
    env.update(SPSR_PYTHON=sys.executable, TMPDIR=str(tmp_path), GPU_CHECK_DRY_RUN="1")
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--wheels", str(wheels),
         "--results", str(tmp_path / "r")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    plan = [line[4:] for line in proc.stdout.splitlines() if line.startswith("DRY ")]
    names = [p.split(":", 1)[0] for p in plan]
    # The training rows before the kernel benchmarks (no benchmark running to its limit can starve
    # them); the carried wheels' import a step of its own (its error in the log, not hidden).
    assert names == [
        "warm-up (compile)", "tests gradient_map", "tests info_nce",
        "wheels import (deepspeed, webdataset)",
        "train", "train bf16 SPSR-G (2 steps, 1 GPU)", "train step vs reference (paper size)",
        "gradient_map bench float32", "gradient_map bench bfloat16",
        "info_nce bench float32", "info_nce bench bfloat16", "info_nce bench NSE batch",
        "gradient_map bench compile baseline", "info_nce bench compile baseline",
        "static sm_90 report",
    ]  # fmt: skip
    (run,) = (tmp_path / "r").glob("gpu_check_*")
    assert f"--junitxml={run}/tests_gradient_map.xml" in plan[1]
    assert f"--junitxml={run}/tests_info_nce.xml" in plan[2]
    if importlib.util.find_spec("pytest_timeout") is not None:
        assert "--timeout=90" in plan[1]
    assert "import\\ deepspeed" in plan[3]  # printf %q quoting
    assert "train.bf16=true" in plan[5] and "train.device=cuda" in plan[5]
    assert "launch/bench_train.py --vs-reference" in plan[6]
    assert "--dtype bfloat16" in plan[8] and "--batches 48" in plan[11]
    # torch.compile baselines (a cold compile per shape) only after every fused-kernel row
    assert all("compile" not in p for p in plan[7:12]), plan[7:12]
    assert "--providers compile_slice" in plan[12] and "--providers compile" in plan[13]
    assert "install: ok" in (run / "steps.txt").read_text()


def test_bench_repo_root(monkeypatch, tmp_path):
    """Where the benchmarks find configs/ and the git revision: $SPSR_REPO, else the checkout the
    module lies in, else (a non-editable install outside any checkout) the working directory."""
    from spsr_hpc.bench import common

    monkeypatch.setenv("SPSR_REPO", str(tmp_path))
    assert common._repo_root() == tmp_path.resolve()
    monkeypatch.delenv("SPSR_REPO")
    assert common._repo_root() == REPO
    installed = tmp_path / "site" / "spsr_hpc" / "bench"
    installed.mkdir(parents=True)
    shutil.copy(common.__file__, installed / "common.py")
    spec = importlib.util.spec_from_file_location("installed_common", installed / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert module._repo_root() == elsewhere
