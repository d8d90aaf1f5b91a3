"""WebDataset loader: skipped samples counted per shard and reason (what the trainer reports)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from spsr_hpc.data import DataConfig, build_train_loader, write_shards
from spsr_hpc.data.wds_loader import SKIP_REASONS

N = 6  # images per shard


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two shards of N 64x64 images each (x4), then shard 1 rewritten with damage."""
    root = tmp_path_factory.mktemp("skips")
    rng = np.random.default_rng(0)
    for part in range(2):
        d = root / f"hr{part}"
        d.mkdir()
        for i in range(N):
            Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(d / f"p{part}_{i}.png")
        write_shards(d, root / f"s{part}", scale=4, workers=0, progress=False)
    good = root / "s0" / "shard-000000.tar"
    bad = root / "bad.tar"
    with tarfile.open(root / "s1" / "shard-000000.tar") as tin, tarfile.open(bad, "w") as tout:
        members = [m for m in tin if m.isfile()]
        for j, m in enumerate(members):
            data = tin.extractfile(m).read()
            if j == 0 and m.name.endswith("hr.png"):
                data = b"\x89PNG\r\n\x1a\n" + b"\0" * 50  # first sample: HR does not decode
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    with tarfile.open(bad) as t:
        last = [m for m in t if m.isfile()][-1]
    raw = bad.read_bytes()
    bad.write_bytes(raw[: last.offset_data + last.size // 2])  # truncated inside the last member
    return [str(good), str(bad)]


def test_skips_counted_per_shard_and_reason(shards):
    cfg = DataConfig(shards=shards, batch_size=2, patch_size=8, scale=4, num_workers=0,
                     shuffle_buffer=4, batches_per_epoch=4)
    loader = build_train_loader(cfg, rank=0, world_size=1)
    for _ in loader:
        pass
    counts = loader.skip_counts()
    assert counts.shape == (2, len(SKIP_REASONS)) and loader.skip_reasons == SKIP_REASONS
    assert sorted(loader.shards) == sorted(shards)
    good, bad = (list(loader.shards).index(s) for s in shards)
    assert counts[good].sum() == 0, "the good shard had skips"
    reason = {r: int(counts[bad, i]) for i, r in enumerate(SKIP_REASONS)}
    assert reason["bad_image"] >= 1
    # The truncation cuts the last member of the last sample, its .json: both images are whole,
    # so no sample is lost (samples are counted, not tar errors; test_data_faults.py truncates
    # whole samples away).
    assert reason["unreadable_tar"] == 0 and reason["missing_member"] == 0, reason
    assert loader.num_skipped == int(counts.sum())
