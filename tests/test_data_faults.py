"""Honest data accounting: shards checked against their manifest before any model is built
(data.verify_shards), and samples lost in a truncated shard counted as samples (manifest count -
samples read), not as error events."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spsr_hpc.data import DataConfig, read_manifest, write_shards
from spsr_hpc.data.wds_loader import SKIP_REASONS, WebDatasetLoader, plan_streams
from spsr_hpc.preflight import data_problems

pytestmark = pytest.mark.usefixtures("release_dali_pipelines")  # conftest.py

REPO = Path(__file__).resolve().parents[1]
N = 12  # samples in the shard


def _noise_shards(tmp_path: Path, size: int, seed: int) -> Path:
    """N random size x size photos in tmp_path/hr, written as x4 shards to tmp_path/shards."""
    rng = np.random.default_rng(seed)
    (tmp_path / "hr").mkdir()
    for i in range(N):
        pixels = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / "hr" / f"{i}.png")
    write_shards(tmp_path / "hr", tmp_path / "shards", scale=4, workers=0, progress=False)
    return tmp_path / "shards"


@pytest.fixture()
def shard_dir(tmp_path) -> Path:
    return _noise_shards(tmp_path, 32, seed=0)


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


HAS_DALI = (
    importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
)
requires_dali = pytest.mark.skipif(not HAS_DALI, reason="nvidia-dali is not installed")


def _corrupt_member(shard: Path, name: str) -> None:
    """Overwrite member ``name``'s data with zeros in place: the tar and the DALI index stay valid."""
    with tarfile.open(shard) as tar:
        m = tar.getmember(name)
    raw = bytearray(shard.read_bytes())
    raw[m.offset_data : m.offset_data + m.size] = bytes(m.size)
    shard.write_bytes(bytes(raw))


def _dali_batches(shard_dir: Path) -> tuple[int, str]:
    """Batches the real DALI CPU pipeline yields before it raises, and the error's message."""
    from spsr_hpc.data import build_train_loader
    from spsr_hpc.data.loader_state import ShardReadError

    loader = build_train_loader(_cfg(shard_dir, loader="dali", dali_device="cpu", dali_threads=1,
                                     verify_shards="off"), rank=0, world_size=1)
    n = 0
    with pytest.raises(ShardReadError) as info:
        for _ in range(3):  # epochs of 6 batches; DALI fails at the first one that holds the sample
            for _ in loader:
                n += 1
    return n, str(info.value)


@requires_dali
def test_dali_stops_at_an_undecodable_image_naming_shard_and_sample(shard_dir):
    """Real DALI 2.4 CPU pipeline, one PNG zeroed inside a valid tar: fn.decoders.image fails
    inside pipe.run() (its message names no sample) within the first epoch; nothing is skipped.
    The error names the operator, the shard and the sample key (found by find_damage), exit status
    6 and the fix. Before the fix the message said only "Critical error in pipeline: ..."."""
    shard = _shard(shard_dir)
    _corrupt_member(shard, "3.hr.png")
    assert data_problems(_cfg(shard_dir)) == []  # same size: only sha256 sees it before start
    assert len(data_problems(_cfg(shard_dir, verify_shards="sha256"))) == 1
    n, msg = _dali_batches(shard_dir)
    assert n < N // 2, n  # an epoch is 6 batches: DALI stopped inside the first one
    assert "fn.decoders.image" in msg and f"{shard}: sample(s) 3 do not decode (3.hr.png)" in msg, msg
    assert "exit status 6" in msg and "make_shards" in msg and "data.loader=webdataset" in msg
    assert "Stacktrace" not in msg and "traceback" not in msg and "\n" not in msg


@pytest.mark.parametrize("loader", ["webdataset", pytest.param("dali", marks=requires_dali)])
@pytest.mark.parametrize("scale", [2, 8])
def test_shards_of_another_scale_are_refused_when_the_loader_is_built(shard_dir, loader, scale):
    """x4 shards with data.scale 2 or 8, given as a list of .tar files (no manifest to check, as
    preflight does). Before: DALI at scale 2 delivered LR 8x8 against a quarter of the HR area in
    silence, at 8 a slice error blamed on damaged shards; WebDataset skipped every sample as a
    size mismatch and stopped after 101 of them."""
    from spsr_hpc.data import build_train_loader

    shard = _shard(shard_dir)
    c = DataConfig(shards=str(shard), batch_size=2, patch_size=2, scale=scale, num_workers=0,
                   shuffle_buffer=1, loader=loader, dali_device="cpu", dali_threads=1)
    with pytest.raises(ValueError, match=rf"data.scale={scale} does not fit the shards: {shard}: sample 0 "
                                         r"has LR 8x8 and HR 32x32 \(made at scale 4\)"):
        build_train_loader(c, rank=0, world_size=1)


@requires_dali
def test_dali_names_an_image_smaller_than_the_patch(tmp_path):
    """Whole-image shards with one photo whose LR (4x4) is below the patch (8): DALI cannot skip
    it. Before: "nothing found in shards ... re-run launch/make_shards.py", which would write the
    same image again; now the sample, its size and the patch are named."""
    from spsr_hpc.data import build_train_loader
    from spsr_hpc.data.loader_state import ShardReadError

    rng = np.random.default_rng(0)
    (tmp_path / "hr").mkdir()
    for i in range(5):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "hr" / f"{i}.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "hr" / "tiny.png")
    write_shards(tmp_path / "hr", tmp_path / "shards", scale=4, workers=0, progress=False)
    c = DataConfig(shards=str(tmp_path / "shards"), batch_size=2, patch_size=8, scale=4, num_workers=0,
                   shuffle_buffer=1, loader="dali", dali_device="cpu", dali_threads=1, batches_per_epoch=6)
    with pytest.raises(ShardReadError) as info:
        for _ in build_train_loader(c, rank=0, world_size=1):
            pass
    msg = str(info.value)
    assert "sample tiny: LR 4x4 is smaller than the patch 8" in msg and "nothing found" not in msg, msg


def test_a_stream_whose_samples_are_all_in_a_lost_tail_names_the_shard(shard_dir):
    """One shard of 12 samples cut in half, 2 workers (samples 0-5 and 6-11), no verification: the
    second worker's samples are all in the unreadable tail. Before: a guess ("101 consecutive
    unusable samples; are the shards corrupt or made for another scale/patch size?"); now
    ShardReadError (exit status 6 in the trainers) naming the shard, the skip reasons and the fix."""
    from spsr_hpc.data import build_train_loader
    from spsr_hpc.data.loader_state import ShardReadError

    shard = _shard(shard_dir)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    c = DataConfig(shards=str(shard_dir), batch_size=2, patch_size=4, scale=4, num_workers=2,
                   shuffle_buffer=1, verify_shards="off")
    loader = build_train_loader(c, rank=0, world_size=1)
    with pytest.raises(ShardReadError, match=rf"worker 1: .*{shard}: \d+ unreadable_tar") as info:
        for _ in loader:
            pass
    assert "a damaged shard, re-run launch/make_shards.py" in str(info.value)


@requires_dali
def test_dali_stops_at_a_truncated_shard_naming_it(shard_dir):
    """data.verify_shards=size refuses a truncated shard before start (tested above); with
    verify_shards=off the real DALI reader fails inside pipe.run() ("offset is outside of the
    archive file") and the error names the shard, its size against the manifest and where its
    tar data ends. Before the fix it named neither."""
    shard = _shard(shard_dir)
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2])
    n, msg = _dali_batches(shard_dir)
    assert n < N // 2, n
    assert "fn.readers.webdataset" in msg and "outside of the archive" in msg, msg
    assert f"{shard}: {len(raw) // 2} bytes, the manifest says {len(raw)}" in msg, msg
    readable = _readable_samples(shard)
    assert f"{shard}: tar data ends after " in msg and f"{readable} of its {N} samples readable" in msg, msg
    assert "exit status 6" in msg


@requires_dali
def test_dali_bad_image_ends_nse_pretraining_with_one_error_line_and_status_6(tmp_path):
    """launch/pretrain_nse.py with data.loader=dali (CPU) and a zeroed PNG: one ``error:`` line
    naming the sample, exit status 6 (before the fix: a traceback, exit status 1)."""
    shards = _nse_shards(tmp_path)
    _corrupt_member(_shard(shards), "5.hr.png")
    r = subprocess.run([*_nse_cmd(tmp_path, shards), "data.loader=dali", "data.dali_threads=1"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 6, r.stdout[-2000:] + r.stderr[-3000:]
    assert len(errors) == 1 and "sample(s) 5 do not decode" in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr


def _nse_shards(tmp_path: Path) -> Path:
    return _noise_shards(tmp_path, 64, seed=1)


def _nse_cmd(tmp_path: Path, shards: Path) -> list[str]:
    return [sys.executable, str(REPO / "launch" / "pretrain_nse.py"), "--config",
            str(REPO / "configs" / "tiny_nse_contrastive.yaml"), f"data.shards={shards}",
            f"logging.run_dir={tmp_path / 'run'}", "train.max_steps=4", "logging.log_every=1",
            "logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.every=0",
            "data.hr_patch_size=64", "data.batch_size=2", "data.shuffle_buffer=1", "data.batches_per_epoch=8"]


def test_nse_pretraining_stops_above_max_skip_rate(tmp_path):
    """The SR trainer's train.max_skip_rate rule in NSE pretraining: a truncated shard read with
    verify_shards=off loses more than 1 % of the samples read, so the run stops at the first log
    step past train.skip_rate_min_samples with one ``error:`` line and exit status 6 (before the
    fix: NSE pretraining had no such keys, and ran to the end)."""
    shards = _nse_shards(tmp_path)
    shard = _shard(shards)
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2])
    cmd = [*_nse_cmd(tmp_path, shards), "data.verify_shards=off", "train.skip_rate_min_samples=1"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 6, r.stdout[-2000:] + r.stderr[-3000:]
    assert len(errors) == 1 and "above train.max_skip_rate=0.01" in errors[0], r.stderr[-3000:]
    assert f"{shard} (" in errors[0] and "unreadable_tar" in errors[0], errors


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


@requires_dali
@pytest.mark.distributed
def test_dali_error_on_one_rank_ends_every_rank_at_once(shard_dir, tmp_path):
    """torchrun, 2 ranks, DALI CPU: the sample split gives rank 1 the zeroed sample 9. Rank 1 prints
    its ``error:`` line and leaves at once with status 6; rank 0's next collective fails ("a peer
    rank is gone", 5) long before train.collective_timeout_s=300 (or torchrun ends it first).
    Before the fix rank 1 lingered in its teardown and torchrun killed it (SIGTERM, no status 6
    in its report). ~10 s."""
    _corrupt_member(_shard(shard_dir), "9.hr.png")
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run(
        [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
         str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "tiny_psnr.yaml"),
         f"data.shards={shard_dir}", f"logging.run_dir={tmp_path / 'run'}", "data.loader=dali",
         "data.dali_threads=1", "data.patch_size=4", "data.batch_size=2", "data.shuffle_buffer=1",
         "data.verify_shards=off", "train.max_steps=20", "train.collective_timeout_s=300",
         "model.generator.nf=8", "model.generator.nb=1", "val.dir=null", "logging.progress_bar=false",
         "logging.tensorboard=false"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    out = r.stdout + r.stderr
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert r.returncode != 0 and errors, out[-4000:]
    assert any(ln.startswith("error: rank 1: DALI stopped") and "sample(s) 9 do not decode" in ln
               for ln in errors), errors
    # Rank 0 fails its collective ("a peer rank is gone", 5) unless torchrun's SIGTERM comes first.
    assert all(ln.startswith("error: rank 1:") or "a peer rank is gone" in ln for ln in errors), errors
    assert "exitcode  : 6" in out, out[-3000:]  # before the fix: rank 1 was SIGTERMed (-15)


def _run_cfg(shard_dir: Path, tmp_path: Path, *overrides: str):
    from spsr_hpc.config import load_config

    return load_config(REPO / "configs" / "tiny_psnr.yaml", [
        f"data.shards={shard_dir}", f"logging.run_dir={tmp_path / 'run'}", "data.patch_size=4",
        "val.dir=null", *overrides,
    ])  # fmt: skip


def test_shards_of_another_scale_or_too_small_crops_are_refused_at_start(tmp_path):
    """make_shards records its scale and crop size in the manifest: shards made at ×2 for a ×4
    run (or cut smaller than the HR patch) are one start-up problem naming the fix. Before, every
    sample was refused in the loader and the run died after 3001 of them with a RuntimeError."""
    from spsr_hpc.preflight import run_input_problems

    hr = tmp_path / "hr"
    hr.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(hr / f"{i}.png")
    write_shards(hr, tmp_path / "x2", scale=2, workers=0, progress=False)
    write_shards(hr, tmp_path / "crops", scale=4, crop_size=16, step=16, workers=0, progress=False)
    problems = run_input_problems(_run_cfg(tmp_path / "x2", tmp_path))
    assert len(problems) == 1 and "made at scale 2" in problems[0] and "data.scale=2" in problems[0], problems
    x2 = _run_cfg(tmp_path / "x2", tmp_path, "data.scale=2", "model.generator.scale=2")
    assert run_input_problems(x2) == []
    problems = run_input_problems(_run_cfg(tmp_path / "crops", tmp_path, "data.patch_size=8"))
    assert len(problems) == 1 and "16x16 HR crops" in problems[0] and "HR training patch is 32" in problems[0]
    assert run_input_problems(_run_cfg(tmp_path / "crops", tmp_path, "data.patch_size=4")) == []


def test_unusable_validation_folder_device_and_run_dir_are_refused_at_start(shard_dir, tmp_path):
    """Validation reads val.dir's first val.max_images images at every validation: an empty
    folder or an undecodable image there stopped the run at its first validation, losing the
    steps since the last checkpoint (before this check; a traceback, exit status 1). A missing
    CUDA device and a run_dir that is a file were tracebacks too."""
    from spsr_hpc.preflight import run_input_problems

    val = tmp_path / "val"
    val.mkdir()
    problems = run_input_problems(_run_cfg(shard_dir, tmp_path, f"val.dir={val}"))
    assert len(problems) == 1 and "holds no image files" in problems[0] and "val.dir=null" in problems[0]
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(val / "a.png")
    good = (val / "a.png").read_bytes()
    (val / "b.png").write_bytes(good[: len(good) // 2])  # a truncated PNG: its header still reads
    problems = run_input_problems(_run_cfg(shard_dir, tmp_path, f"val.dir={val}"))
    assert len(problems) == 1 and "b.png" in problems[0] and "1 unreadable image" in problems[0], problems
    assert run_input_problems(_run_cfg(shard_dir, tmp_path, f"val.dir={val}", "val.max_images=1")) == []
    (tmp_path / "afile").write_text("x")
    problems = run_input_problems(_run_cfg(shard_dir, tmp_path, f"logging.run_dir={tmp_path / 'afile'}"))
    assert len(problems) == 1 and "is a file" in problems[0]
    if not torch.cuda.is_available():
        problems = run_input_problems(_run_cfg(shard_dir, tmp_path, "train.device=cuda"))
        assert len(problems) == 1 and "no CUDA device" in problems[0]
