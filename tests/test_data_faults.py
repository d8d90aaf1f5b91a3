"""Honest data accounting: shards checked against their manifest before any model is built
(data.verify_shards), and samples lost in a truncated shard counted as samples (manifest count -
samples read), not as error events."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spsr_hpc.data import DataConfig, read_manifest, write_shards
from spsr_hpc.data.wds_loader import SKIP_REASONS, WebDatasetLoader, plan_streams
from spsr_hpc.preflight import data_problems

REPO = Path(__file__).resolve().parents[1]
N = 12  # samples in the shard


@pytest.fixture()
def shard_dir(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    (tmp_path / "hr").mkdir()
    for i in range(N):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(tmp_path / "hr" / f"{i}.png")
    write_shards(tmp_path / "hr", tmp_path / "shards", scale=4, workers=0, progress=False)
    return tmp_path / "shards"


def _shard(shard_dir: Path) -> Path:
    names = [s["name"] for s in read_manifest(shard_dir)["shards"]]
    assert len(names) == 1
    return shard_dir / names[0]


def _readable_samples(path: Path) -> int:
    """Independent reference: samples whose members Python's tarfile reads in full before the
    data ends (a sample counts when at least one member of it is complete)."""
    keys: set[str] = set()
    try:
        with tarfile.open(path, "r|") as tar:
            for m in tar:
                if m.isfile():
                    data = tar.extractfile(m).read()
                    if len(data) == m.size:
                        keys.add(m.name.split(".", 1)[0])
    except (tarfile.TarError, OSError):
        pass
    return len(keys)


def _cfg(shard_dir: Path, **kw) -> DataConfig:
    return DataConfig(shards=str(shard_dir), batch_size=2, patch_size=4, scale=4, num_workers=0,
                      shuffle_buffer=1, **kw)


def test_verify_shards_names_a_truncated_shard_and_the_fix(shard_dir):
    shard = _shard(shard_dir)
    assert data_problems(_cfg(shard_dir)) == []
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    (line,) = data_problems(_cfg(shard_dir))
    assert str(shard) in line and f"{size // 2} bytes" in line and f"manifest says {size}" in line
    assert "make_shards" in line and "data.verify_shards=off" in line
    assert data_problems(_cfg(shard_dir, verify_shards="off")) == []


def test_verify_shards_sha256_finds_a_changed_byte_that_size_misses(shard_dir):
    shard = _shard(shard_dir)
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert data_problems(_cfg(shard_dir, verify_shards="size")) == []
    (line,) = data_problems(_cfg(shard_dir, verify_shards="sha256"))
    assert str(shard) in line and "sha256" in line


def test_verify_shards_is_a_config_error_before_any_model(shard_dir, tmp_path):
    shard = _shard(shard_dir)
    shard.write_bytes(shard.read_bytes()[:-4096])
    r = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--config",
         str(REPO / "configs" / "tiny_psnr.yaml"),
         f"data.shards={shard_dir}", f"logging.run_dir={tmp_path / 'run'}", "data.patch_size=4",
         "data.batch_size=2", "train.max_steps=2", "model.generator.nf=8", "model.generator.nb=1",
         "val.dir=null", "logging.progress_bar=false", "logging.tensorboard=false"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(shard) in errors[0] and "manifest" in errors[0], r.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_samples_lost_in_a_truncated_shard_are_counted_as_samples(shard_dir):
    shard = _shard(shard_dir)
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2])
    readable = _readable_samples(shard)
    assert 1 <= readable < N - 2, readable
    cfg = _cfg(shard_dir)
    loader = WebDatasetLoader(cfg, [str(shard)], [N], rank=0, world_size=1, seed=0)
    from spsr_hpc.data.wds_loader import _EpochStream

    ds = _EpochStream(cfg, plan_streams([str(shard)], [N], 0, 1, 1), rank=0, seed=0, epoch=0, start_batch=0,
                      batches_per_epoch=1, skipped=loader._skipped, shard_index={str(shard): 0})
    stream = ds._raw_samples(ds.plans[0], 0)
    # shuffle_buffer 1: the k-th sample out is the (k+1)-th read, so `readable` samples out means
    # one pass over the shard ended and the next one began (but did not end).
    for _ in range(readable):
        next(stream)
    counts = loader.skip_counts()
    lost = int(counts[0, SKIP_REASONS.index("unreadable_tar")])
    assert lost == N - readable, (lost, N, readable)
    assert int(counts.sum()) == lost


def test_dali_pipeline_error_becomes_one_error_naming_shards_and_fix(monkeypatch):
    """DALI stops its pipeline at an undecodable image (pipe.run() raises; the pipeline is
    unusable after that). Stand-in pipeline here (no DALI on this machine): the loader turns the
    error into a ShardReadError naming the rank's shards, DALI's first line and the fix."""
    from spsr_hpc.data import dali_loader
    from spsr_hpc.data.loader_state import LoaderState, ShardReadError

    class BrokenPipe:
        runs = 0

        def run(self):
            BrokenPipe.runs += 1
            if BrokenPipe.runs == 2:
                raise RuntimeError("Critical error in pipeline:\nError in thread 0: [decoders__Image] "
                                   "could not decode a.tar:p_3.hr.png\nStacktrace ...")
            return (np.zeros((2, 8, 8, 3)), np.zeros((2, 32, 32, 3)))

    monkeypatch.setattr(dali_loader, "_build_pipeline", lambda *a, **k: BrokenPipe())
    monkeypatch.setattr(dali_loader, "_to_torch", lambda t, device: t)
    loader = object.__new__(dali_loader.DaliLoader)
    loader.cfg = DataConfig(shards=["/d/a.tar", "/d/b.tar"], batch_size=2, loader="dali")
    loader.shards, loader.rank, loader.world_size = ["/d/a.tar", "/d/b.tar"], 1, 2
    loader.gpu, loader.device_id, loader.device = False, None, "cpu"
    loader.state = LoaderState(0, 1, 2, 5)
    it = iter(loader)
    next(it)
    with pytest.raises(ShardReadError) as info:
        next(it)
    msg = str(info.value)
    assert "rank 1" in msg and "batch 1" in msg and "/d/a.tar, /d/b.tar" in msg
    assert "could not decode a.tar:p_3.hr.png" in msg and "Stacktrace" not in msg
    assert "data.loader=webdataset" in msg and "make_shards" in msg


def test_nse_pretraining_checks_shards_and_counts_lost_samples(tmp_path):
    """launch/pretrain_nse.py: a truncated shard is refused at start (rc 2); with
    data.verify_shards=off it trains and logs the lost samples as samples."""
    rng = np.random.default_rng(1)
    (tmp_path / "hr").mkdir()
    for i in range(N):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "hr" / f"{i}.png")
    write_shards(tmp_path / "hr", tmp_path / "shards", scale=4, workers=0, progress=False)
    shard = _shard(tmp_path / "shards")
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2])
    readable = _readable_samples(shard)
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "launch" / "pretrain_nse.py"), "--config",
           str(REPO / "configs" / "tiny_nse_contrastive.yaml"), f"data.shards={tmp_path / 'shards'}",
           f"logging.run_dir={run}", "train.max_steps=4", "logging.log_every=1", "logging.progress_bar=false",
           "logging.tensorboard=false", "checkpoint.every=0", "data.hr_patch_size=64", "data.batch_size=2",
           "data.shuffle_buffer=1", "data.batches_per_epoch=8"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "differ from their manifest" in r.stderr, r.stderr[-3000:]
    r = subprocess.run([*cmd, "data.verify_shards=off"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    import json

    last = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()][-1]
    lost = last["data/skipped/unreadable_tar"]
    # 4 steps x 2 samples = 8 > readable: at least one pass over the shard ended.
    assert lost >= N - readable and lost % (N - readable) == 0, (lost, N, readable)
    assert last["data/skipped"] == lost
