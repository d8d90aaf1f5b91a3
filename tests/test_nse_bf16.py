"""NSE pretraining in bf16 (``train.bf16=true``: the NSE and its heads under bf16 autocast, the
contrastive loss through the fused InfoNCE's bf16 path, weights and export fp32): contrastive
resumes bit-exact, jigsaw trains; both export fp32 weights. Failed on the code before bf16 on
CPU existed (train.bf16 was refused on CPU at config load)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_nse_pretrain import _RESUME_SCRIPT, REPO, _metrics

from spsr_hpc.precision import cpu_bf16_native

NATIVE = cpu_bf16_native() or torch.cuda.is_available()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not NATIVE, reason="no native bf16")]

BASE = ["logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.every=2", "train.epochs=1",
        "data.batches_per_epoch=3", "data.batch_size=2", "data.hr_patch_size=64", "logging.log_every=1",
        "optim.lr_step_epochs=1", "train.bf16=true"]


def _run(method: str, shards: Path, a: Path, b: Path) -> str:
    cmd = [sys.executable, "-c", _RESUME_SCRIPT, str(REPO / f"configs/tiny_nse_{method}.yaml"),
           f"data.shards={shards}", *BASE, str(a), str(b)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.mark.parametrize("method", ["contrastive", "jigsaw"])
def test_bf16_pretraining_resumes_bit_exact_and_exports_fp32(method, bundled_shards, tmp_path):
    """4 steps straight == 2 steps, stop, resume, 2 more, in bf16: same fp32 export, same losses."""
    log = _run(method, bundled_shards, tmp_path / "a", tmp_path / "b")
    assert "resumed from" in log
    a, b = load_file(str(tmp_path / "a/nse.safetensors")), load_file(str(tmp_path / "b/nse.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == torch.float32, k
        assert torch.equal(a[k], b[k]), k
    rec_a, rec_b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [r["step"] for r in rec_b] == [1, 2, 3, 4]
    assert [(r["loss/total"], r["lr"]) for r in rec_a] == [(r["loss/total"], r["lr"]) for r in rec_b]
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rec_a)
