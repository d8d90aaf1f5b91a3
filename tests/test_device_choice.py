"""The device a user chose, on a GPU host, without a GPU: DeepSpeed's accelerator, the backend,
one GPU per task (issue: first contact with a GPU node).

The GPU host is simulated in a fresh process (tests/fake_gpu_host.py): torch.cuda reports
devices and set_device refuses ordinals past the count, as on a node where each task sees one GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spsr_hpc import distributed as sdist
from spsr_hpc.train import engines

REPO = Path(__file__).resolve().parents[1]


def _fake_host(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    full = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                         "MASTER_PORT", "DS_ACCELERATOR", "_SPSR_DS_ACCELERATOR_SET")
            and not k.startswith("SLURM_")}
    full.update(env or {})
    full["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "fake_gpu_host.py"), *args],
                          cwd=tmp_path, env=full, capture_output=True, text=True, timeout=300)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize(
    ("local_rank", "count", "want"),
    [(0, 1, 0), (1, 1, 0), (3, 1, 0), (1, 8, 1), (7, 8, 7), (3, 2, 1), (2, 2, 0)],
)
def test_cuda_device_index(local_rank, count, want):
    assert sdist.cuda_device_index(local_rank, count) == want


def test_cuda_device_index_refuses_no_device():
    with pytest.raises(ValueError, match="no CUDA device"):
        sdist.cuda_device_index(0, 0)


def test_resolve_backend_follows_the_training_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert engines.resolve_backend("auto", torch.device("cpu")) == "gloo"
    assert engines.resolve_backend("auto", torch.device("cuda", 1)) == "nccl"
    assert engines.resolve_backend("gloo", torch.device("cuda", 0)) == "gloo"
    with pytest.raises(ValueError, match="nccl needs a CUDA training device"):
        engines.resolve_backend("nccl", torch.device("cpu"))


def test_select_ds_accelerator_refuses_a_contradicting_user_setting(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    monkeypatch.delenv("_SPSR_DS_ACCELERATOR_SET", raising=False)
    with pytest.raises(ValueError, match="DS_ACCELERATOR=cuda"):
        engines.select_ds_accelerator(torch.device("cpu"))


def test_align_local_rank_one_gpu_per_task(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("SPSR_LAUNCHER_LOCAL_RANK", raising=False)
    assert engines.align_local_rank(torch.device("cpu")) == {}
    assert os.environ["LOCAL_RANK"] == "1"
    assert engines.align_local_rank(torch.device("cuda", 0)) == {
        "SPSR_LAUNCHER_LOCAL_RANK": "1", "LOCAL_RANK": "0"}
    assert os.environ["LOCAL_RANK"] == "0"


@pytest.mark.parametrize("scenario", ["cpu_trainer", "cpu_trainer_after_import"])
def test_cpu_training_on_a_gpu_host_stays_on_cpu(tmp_path, scenario):
    """train.device=cpu with two visible GPUs: DeepSpeed's CPU accelerator, gloo, every engine's
    parameters on the CPU after one SPSR-G step (DeepSpeed used to pick CUDA and move them), also
    when deepspeed had already been imported and had chosen CUDA."""
    out = _fake_host(tmp_path, scenario, "2", str(tmp_path / "run"))
    if scenario == "cpu_trainer_after_import":
        assert out["accelerator_before"] == "cuda"
    assert out["rank_device"] == "cuda:0"  # the host does look like a GPU host
    assert out["accelerator"] == "cpu"
    assert out["backend"] == "gloo"
    assert out["param_devices"] == ["cpu"]
    assert out["engine_devices"] == ["cpu"]
    assert out["set_device_calls"] == []


def test_one_gpu_per_task_never_selects_a_missing_ordinal(tmp_path):
    """LOCAL_RANK=1 with one visible GPU (srun --gpus-per-task=1): this rank's device is cuda:0,
    and DeepSpeed's own engine start-up selects cuda:0 too, never ordinal 1."""
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(engines._free_port())}
    out = _fake_host(tmp_path, "one_gpu_per_task", "1", env=env)
    assert out["error"] is None
    assert out["accelerator"] == "cuda"
    assert out["rank_device"] == "cuda:0"
    assert out["engine_device"] == "cuda:0"
    assert out["set_device_calls"] and set(out["set_device_calls"]) == {0}
    assert (out["local_rank"], out["launcher_local_rank"]) == ("0", "1")
