"""NSE pretraining runs: tiny 2-process runs of each method, exact resume, the NSE export."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spsr_hpc.config import load_config
from spsr_hpc.nse.config import NSEPretrainConfig
from spsr_hpc.nse.export import load_nse, read_nse_metadata, save_nse
from spsr_hpc.nse.pretrain import lr_milestones

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(bundled_shards) -> Path:
    return bundled_shards


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lr_milestones_every_k_epochs():
    assert lr_milestones(10, 20)[:3] == [200, 400, 600]
    assert len(lr_milestones(10, 20)) == 64


def test_configs_load_and_defaults_are_spec():
    c = load_config(REPO / "configs/nse_contrastive.yaml", schema=NSEPretrainConfig)
    obj = c.objective
    assert (obj.method, obj.scale, obj.max_anchors_per_image) == ("contrastive", 64.0, None)
    assert (c.data.hr_patch, c.train.global_batch, c.optim.lr, c.optim.lr_step_epochs, c.optim.lr_gamma) == (
        400, 48, 1e-3, 20, 0.2)
    j = load_config(REPO / "configs/nse_jigsaw.yaml", schema=NSEPretrainConfig)
    assert (j.objective.method, j.optim.lr, j.optim.lr_step_epochs) == ("jigsaw", 1e-4, 30)
    with pytest.raises(ValueError, match=r"objective\.strategies"):
        load_config(REPO / "configs/nse_contrastive.yaml", ["objective.strategies=[d]"],
                    schema=NSEPretrainConfig)
    with pytest.raises(ValueError, match="hr_only"):
        load_config(REPO / "configs/tiny_nse_jigsaw.yaml", ["data.hr_only=false", "data.hr_patch_size=null"],
                    schema=NSEPretrainConfig)


def test_export_roundtrip(tmp_path):
    from spsr_hpc.models import NSEConfig, build_nse

    cfg = NSEConfig(width=16, out_dim=8)
    nse = build_nse(cfg)
    path = save_nse(nse, cfg, tmp_path / "nse.safetensors", extra={"method": "jigsaw"})
    meta = read_nse_metadata(path)
    assert meta["method"] == "jigsaw" and meta["receptive_field"] == "28" and meta["stride"] == "4"
    loaded = load_nse(path)
    assert not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), nse(x).detach())
    # The generic checkpoint loader of spsr_hpc.models reads it too (SPSR-P/J `nse.pretrained`).
    again = build_nse(NSEConfig(width=16, out_dim=8, pretrained=str(path)))
    torch.testing.assert_close(again(x), nse(x))
    with pytest.raises(FileNotFoundError, match="pretrain one"):
        load_nse(tmp_path / "missing.safetensors")


def test_export_on_a_full_disk_keeps_the_old_file_and_leaves_no_tmp(tmp_path, monkeypatch):
    """Before: safetensors' own exception (exit status 1 from pretrain_nse) and a nse.safetensors.tmp
    left behind. Now OutputWriteError (the pretrainer turns it into exit status 4 with the newest
    checkpoint named, as the SR trainer's export: tests/test_resume.py)."""
    import spsr_hpc.nse.export as export
    from spsr_hpc.files import OutputWriteError
    from spsr_hpc.models import NSEConfig, build_nse

    cfg = NSEConfig(width=16, out_dim=8)
    path = save_nse(build_nse(cfg), cfg, tmp_path / "nse.safetensors")
    before = path.read_bytes()

    def full_disk(state, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(export, "save_file", full_disk)
    with pytest.raises(OutputWriteError, match=r"nse\.safetensors: \[Errno 28\] No space left on device"):
        save_nse(build_nse(cfg), cfg, path)
    assert path.read_bytes() == before and not list(tmp_path.glob("*.tmp"))


_RESUME_SCRIPT = """
import sys
from spsr_hpc.config import load_config
from spsr_hpc.nse.config import NSEPretrainConfig
from spsr_hpc.nse.pretrain import NSEPretrainer
cfg_path, base = sys.argv[1], sys.argv[2:]
# One process, one process group for all three runs (DeepSpeed keeps global group state).
for run_dir, steps in ((sys.argv[-2], 4), (sys.argv[-1], 2), (sys.argv[-1], 4)):
    cfg = load_config(cfg_path, [*base[:-2], f"logging.run_dir={run_dir}", f"train.max_steps={steps}"],
                      schema=NSEPretrainConfig)
    NSEPretrainer(cfg).train()
"""


@pytest.mark.slow
def test_resume_is_exact(shards, tmp_path):
    """4 steps straight == 2 steps, stop, resume, 2 more (weights bit-identical, same losses and lr)."""
    base = [f"data.shards={shards}", "logging.progress_bar=false", "logging.tensorboard=false",
            "checkpoint.every=2", "train.epochs=1", "data.batches_per_epoch=3", "data.batch_size=2",
            "data.hr_patch_size=64", "logging.log_every=1", "optim.lr_step_epochs=1"]
    cmd = [sys.executable, "-c", _RESUME_SCRIPT, str(REPO / "configs/tiny_nse_contrastive.yaml"), *base,
           str(tmp_path / "a"), str(tmp_path / "b")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resumed from" in out.stdout + out.stderr
    a, b = load_file(str(tmp_path / "a/nse.safetensors")), load_file(str(tmp_path / "b/nse.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    rec_a, rec_b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [r["step"] for r in rec_b] == [1, 2, 3, 4]  # the second run continued at step 3
    assert [(r["loss/total"], r["lr"]) for r in rec_a] == [(r["loss/total"], r["lr"]) for r in rec_b]
    # Decayed after epoch 1 (3 steps), in both runs.
    assert rec_a[2]["lr"] == pytest.approx(0.2 * rec_a[1]["lr"])
    assert read_nse_metadata(tmp_path / "b/nse.safetensors")["step"] == "4"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("method", ["contrastive", "jigsaw"])
def test_two_process_tiny_run(method, shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(_free_port()),
        str(REPO / "launch/pretrain_nse.py"), "--config", str(REPO / f"configs/tiny_nse_{method}.yaml"),
        f"data.shards={shards}", f"logging.run_dir={run_dir}", "train.max_steps=4", "logging.log_every=1",
        "logging.progress_bar=false", "checkpoint.every=2", "data.hr_patch_size=64", "data.batch_size=2",
        "data.batches_per_epoch=null",  # the default epoch: the number of training images
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 rank(s)" in out.stdout + out.stderr
    images = json.loads((shards / "manifest.json").read_text())["num_files"]
    assert f"epoch = data.samples_per_epoch={images} samples: the number of training images" in (
        out.stdout + out.stderr)
    assert f"-> {-(-images // 4)} steps of 2 x 1 x 2" in out.stdout + out.stderr
    records = _metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in records)
    assert all(r["anchors_per_s"] > 0 for r in records)
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_0000002", "step_0000004"]
    assert sorted(p.name for p in (run_dir / "checkpoints/step_0000004").glob("rank_*.pt")) == [
        "rank_00000.pt", "rank_00001.pt"]
    nse = load_nse(run_dir / "nse.safetensors")
    assert read_nse_metadata(run_dir / "nse.safetensors")["method"] == method
    assert nse(torch.rand(1, 3, 64, 64)).shape == (1, 32, 16, 16)
    assert (run_dir / "config.yaml").is_file() and any((run_dir / "tb").iterdir())


def test_triton_loss_backend_without_a_gpu_is_refused_at_start(shards, tmp_path, monkeypatch):
    """objective.loss_backend=triton on a machine without CUDA (and without the interpreter)
    passed --validate and raised a ValueError traceback at step 1; now a start-up problem."""
    from spsr_hpc.preflight import run_input_problems

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    overrides = [f"data.shards={shards}", f"logging.run_dir={tmp_path}", "objective.loss_backend=triton",
                 "train.device=cpu"]
    cfg = load_config(REPO / "configs/tiny_nse_contrastive.yaml", overrides, schema=NSEPretrainConfig)
    problems = run_input_problems(cfg)
    assert len(problems) == 1 and "objective.loss_backend=triton" in problems[0], problems
    assert "auto or torch" in problems[0]
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs the kernels on the CPU (slow)
    assert run_input_problems(cfg) == []
    monkeypatch.setenv("TRITON_INTERPRET", "true")  # read as triton reads it (it was "== '1'" only)
    assert run_input_problems(cfg) == []


def test_full_run_dir_stops_with_a_checkpoint_and_exit_4(shards, tmp_path, small_tmpfs):
    """logging.run_dir on a disk that fills mid-run (a real tmpfs; checkpoints elsewhere). Before:
    a traceback from metrics.jsonl's flush, exit status 1, the steps since the last checkpoint
    lost. Now every rank stops with a checkpoint, exit status 4, and the re-run resumes."""
    mnt = small_tmpfs("8k")  # config.yaml and a few metrics lines fit
    ck = tmp_path / "ck"
    base = [sys.executable, str(REPO / "launch/pretrain_nse.py"), "--config",
            str(REPO / "configs/tiny_nse_contrastive.yaml"), f"data.shards={shards}",
            "logging.progress_bar=false", "logging.tensorboard=false", "logging.log_every=1",
            f"checkpoint.dir={ck}", "checkpoint.every=0", "data.batches_per_epoch=10", "data.batch_size=2",
            "data.hr_patch_size=64"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*base, f"logging.run_dir={mnt / 'r'}", "train.epochs=50"], capture_output=True,
                       text=True, timeout=300, cwd=REPO, env=env)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 4 and len(errors) == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"{mnt / 'r' / 'metrics.jsonl'}: [Errno 28] No space left on device" in errors[0], errors[0]
    stopped = [p.name for p in ck.iterdir()]
    assert len(stopped) == 1 and f"with checkpoint {ck / stopped[0]};" in errors[0], errors[0]
    r = subprocess.run([*base, f"logging.run_dir={tmp_path / 'r2'}", "train.epochs=2"], capture_output=True,
                       text=True, timeout=300, cwd=REPO, env=env)
    assert r.returncode == 0 and f"resumed from {ck / stopped[0]}" in r.stdout + r.stderr, r.stderr[-3000:]
    assert (tmp_path / "r2" / "nse.safetensors").is_file()
