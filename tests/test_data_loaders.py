"""Training loaders (WebDataset and DALI CPU): alignment, augmentation, rank split, resume, bad data."""

import hashlib
import importlib.util
import io
import itertools
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from spsr_hpc.data import DataConfig, build_train_loader, imresize, to_uint8, write_shards
from spsr_hpc.data.augment import aligned_patch, dihedral
from spsr_hpc.data.wds_loader import plan_streams

pytestmark = pytest.mark.usefixtures("release_dali_pipelines")  # conftest.py

S = 4  # scale
N_IMAGES = 12
HR_SIZE = 64  # LR 16
# DALI is an optional dependency (pyproject extras dali-cuda12 / dali-cuda13).
HAS_DALI = (
    importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
)
requires_dali = pytest.mark.skipif(not HAS_DALI, reason="nvidia-dali is not installed")
LOADERS = ["webdataset", pytest.param("dali", marks=requires_dali)]


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    small = rng.random((h // 8 + 2, w // 8 + 2, 3))
    return to_uint8(np.clip(imresize(small, 8)[:h, :w], 0, 1))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """HR and LR uint8 arrays of the source images, and their folder."""
    d = tmp_path_factory.mktemp("hr")
    rng = np.random.default_rng(0)
    hrs, lrs = [], []
    for i in range(N_IMAGES):
        hr = smooth_image(rng, HR_SIZE, HR_SIZE)
        Image.fromarray(hr).save(d / f"img{i:02d}.png")
        hrs.append(hr)
        lrs.append(to_uint8(imresize(hr.astype(np.float64) / 255, 1 / S)))
    return d, hrs, lrs


@pytest.fixture(scope="module")
def many_shards(photos, tmp_path_factory):
    """One sample per shard (12 shards): the shard-level split."""
    out = tmp_path_factory.mktemp("many")
    m = write_shards(photos[0], out, scale=S, shard_size_mb=1e-3, workers=0, progress=False)
    assert m["num_shards"] == N_IMAGES
    return out


@pytest.fixture(scope="module")
def uneven_shards(photos, tmp_path_factory):
    """Shards of 5, 5 and 2 samples."""
    out = tmp_path_factory.mktemp("uneven")
    m = write_shards(photos[0], out, scale=S, shard_size_mb=0.06, workers=0, progress=False)
    assert [s["samples"] for s in m["shards"]] == [5, 5, 2]
    return out


@pytest.fixture(scope="module")
def one_shard(photos, tmp_path_factory):
    """All samples in one shard: the sample-index modulo split."""
    out = tmp_path_factory.mktemp("one")
    m = write_shards(photos[0], out, scale=S, workers=0, progress=False)
    assert m["num_shards"] == 1
    return out


def cfg(shards, **kw) -> DataConfig:
    base = {
        "shards": str(shards),
        "batch_size": 4,
        "patch_size": 12,
        "scale": S,
        "num_workers": 0,
        "shuffle_buffer": 8,
        "seed": 0,
        "dali_threads": 1,
    }
    base.update(kw)
    return DataConfig(**base)


def full_image_cfg(shards, **kw) -> DataConfig:
    """Patches covering whole images, no augmentation: every yielded HR is a source image."""
    return cfg(shards, patch_size=HR_SIZE // S, hflip=False, vflip=False, transpose=False, **kw)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha1(to_uint8(t.numpy()).tobytes()).hexdigest()


def psnr_interior(hr: torch.Tensor, lr: torch.Tensor, border: int = 2) -> float:
    """PSNR of imresize(hr, 1/S) against lr, (3, h, w) tensors, excluding `border` LR pixels
    (the antialiasing kernel's reach). Computed in numpy float64."""
    hr_np = hr.permute(1, 2, 0).double().numpy()
    lr_np = lr.permute(1, 2, 0).double().numpy()
    d = imresize(hr_np, 1 / S)[border:-border, border:-border] - lr_np[border:-border, border:-border]
    return float(-10 * np.log10((d**2).mean()))


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=3)))
def test_dihedral_matches_numpy(flags):
    x = np.arange(2 * 3 * 3).reshape(2, 3, 3)
    ref = x
    if flags[0]:
        ref = np.fliplr(ref)
    if flags[1]:
        ref = np.flipud(ref)
    if flags[2]:
        ref = np.swapaxes(ref, 0, 1)
    np.testing.assert_array_equal(dihedral(x, *flags), ref)


def test_aligned_patch_every_combination(photos):
    _, hrs, lrs = photos
    seen = set()
    for seed in range(64):
        rng = np.random.default_rng(seed)
        lr_p, hr_p = aligned_patch(lrs[0], hrs[0], S, 12, rng, hflip=True, vflip=True, transpose=True)
        assert lr_p.shape == (12, 12, 3) and hr_p.shape == (48, 48, 3)
        assert (
            psnr_interior(
                torch.from_numpy(hr_p / 255.0).permute(2, 0, 1),
                torch.from_numpy(lr_p / 255.0).permute(2, 0, 1),
            )
            > 40
        )
        rng = np.random.default_rng(seed)
        rng.integers(0, 16 - 12 + 1), rng.integers(0, 16 - 12 + 1)
        seen.add(tuple(rng.random(3) < 0.5))
    assert len(seen) == 8


class _Windows:
    """Every LR window (image, dihedral flags, y, x) of the sources, to identify yielded patches."""

    def __init__(self, lrs, hrs, p):
        self.hrs, self.p = hrs, p
        self.keys, wins = [], []
        for i, lr in enumerate(lrs):
            for y in range(lr.shape[0] - p + 1):
                for x in range(lr.shape[1] - p + 1):
                    for flags in itertools.product([False, True], repeat=3):
                        self.keys.append((i, flags, y, x))
                        wins.append(dihedral(lr[y : y + p, x : x + p], *flags))
        self.wins = np.stack(wins)

    def find(self, lr_patch: np.ndarray):
        hits = np.flatnonzero((self.wins == lr_patch[None]).all(axis=(1, 2, 3)))
        return [self.keys[h] for h in hits]

    def hr_window(self, i, flags, y, x):
        hp = self.p * S
        return dihedral(self.hrs[i][y * S : y * S + hp, x * S : x * S + hp], *flags)


@pytest.mark.parametrize(
    "loader", [*LOADERS, pytest.param("dali-gpu", marks=[pytest.mark.gpu, requires_dali])]
)
def test_batches_aligned_under_every_flip_and_transpose(loader, many_shards, photos):
    _, hrs, lrs = photos
    p = 12
    extra = {"loader": "dali", "dali_device": "gpu"} if loader == "dali-gpu" else {"loader": loader}
    c = cfg(many_shards, patch_size=p, batches_per_epoch=16, **extra)
    windows = _Windows(lrs, hrs, p)
    seen_flags = set()
    for batch in build_train_loader(c, rank=0, world_size=1):
        assert batch["hr"].is_cuda == (loader == "dali-gpu")
        batch = {k: v.cpu() for k, v in batch.items()}
        assert batch["lr"].shape == (4, 3, p, p) and batch["hr"].shape == (4, 3, S * p, S * p)
        assert batch["lr"].dtype == torch.float32 and batch["hr"].min() >= 0 and batch["hr"].max() <= 1
        for lr, hr in zip(batch["lr"], batch["hr"]):
            assert psnr_interior(hr, lr) > 40
            lr_u8 = to_uint8(lr.permute(1, 2, 0).numpy())
            hr_u8 = to_uint8(hr.permute(1, 2, 0).numpy())
            matches = [k for k in windows.find(lr_u8) if np.array_equal(windows.hr_window(*k), hr_u8)]
            assert matches, "LR patch and HR patch are not the same crop/flip of one source"
            seen_flags.update(k[1] for k in matches)
    assert len(seen_flags) == 8


@pytest.mark.parametrize("n_shards", [1, 5, 12])
@pytest.mark.parametrize(("world", "workers"), [(1, 1), (2, 2), (3, 2), (4, 1)])
def test_stream_plans_partition_the_samples(n_shards, world, workers):
    counts = [N_IMAGES // n_shards + (i < N_IMAGES % n_shards) for i in range(n_shards)]
    shards = [f"s{i}" for i in range(n_shards)]
    owner = {}
    for rank in range(world):
        for w, plan in enumerate(plan_streams(shards, counts, rank, world, workers)):
            got = 0
            for name, off in zip(plan.shards, plan.offsets):
                c = counts[shards.index(name)]
                for pos in range(c):
                    if plan.keeps(off + pos):
                        assert (name, pos) not in owner, "a sample is read by two streams"
                        owner[(name, pos)] = (rank, w)
                        got += 1
            assert got == plan.num_samples
            assert got in (N_IMAGES // (world * workers), -(-N_IMAGES // (world * workers)))  # balanced
    assert len(owner) == N_IMAGES


@pytest.mark.parametrize(("world", "workers", "batch"), [
    (2, 2, 3), (1, 2, 3), (3, 1, 2), (1, 3, 2),  # the epoch's draws equal the samples
    (1, 2, 4), (1, 4, 4),  # 3 batches per epoch: not a multiple of the workers, or fewer
    (2, 2, 4), (1, 3, 5),  # more draws than samples (the last batch is partly repeats)
])  # fmt: skip
def test_one_default_epoch_reads_every_sample(uneven_shards, photos, world, workers, batch):
    """Shards of 5, 5 and 2 samples. Before: whole shards went to ranks and workers by stride, and
    every stream drew the same number of batches, so in an epoch the streams holding more samples
    left some unread while the others repeated theirs (2 ranks x 2 workers: 3 of 12 unread). And
    worker L draws the batches k = L mod nw: with 3 batches per epoch and 2 workers one draws
    twice as many as the other, with 4 workers one draws none; each rank's share is cut in
    proportion to the draws."""
    ids = {hashlib.sha1(h.tobytes()).hexdigest(): i for i, h in enumerate(photos[1])}
    c = full_image_cfg(uneven_shards, num_workers=workers if workers > 1 else 0, batch_size=batch)
    reads = [0] * N_IMAGES
    draws = 0
    for rank in range(world):
        loader = build_train_loader(c, rank=rank, world_size=world)
        assert len(loader) == -(-N_IMAGES // (batch * world))  # the default epoch
        for b in loader:
            draws += len(b["hr"])
            for h in b["hr"]:
                reads[ids[digest(h.permute(1, 2, 0))]] += 1
    assert min(reads) >= 1, reads  # every sample at least once
    if draws == N_IMAGES:
        assert reads == [1] * N_IMAGES  # and exactly once when the draws equal the samples


@pytest.mark.distributed
@pytest.mark.parametrize("shards_fixture", ["many_shards", "one_shard"])
def test_two_ranks_two_workers_disjoint_equal_length(shards_fixture, request, photos):
    shards = request.getfixturevalue(shards_fixture)
    all_ids = {hashlib.sha1(h.tobytes()).hexdigest() for h in photos[1]}
    c = full_image_cfg(shards, num_workers=2, batch_size=2, batches_per_epoch=6)
    seen, lengths = [], []
    for rank in range(2):
        loader = build_train_loader(c, rank=rank, world_size=2)
        ids, n = set(), 0
        for _epoch in range(2):
            for batch in loader:
                n += 1
                ids.update(digest(h.permute(1, 2, 0)) for h in batch["hr"])
        seen.append(ids)
        lengths.append((len(loader), n))
    assert lengths[0] == lengths[1] == (6, 12)
    assert not seen[0] & seen[1], "ranks saw the same sample"
    assert seen[0] | seen[1] <= all_ids
    assert len(seen[0] | seen[1]) >= N_IMAGES - 2  # nearly everything within two epochs


@pytest.mark.distributed
def test_corrupt_member_skipped_and_counted(one_shard, photos, tmp_path):
    src = one_shard / "shard-000000.tar"
    bad = tmp_path / "bad-000000.tar"
    with tarfile.open(src) as tin, tarfile.open(bad, "w") as tout:
        members = [m for m in tin if m.isfile()]
        for j, m in enumerate(members):
            data = tin.extractfile(m).read()
            if j == 3 * 2 and m.name.endswith("hr.png"):  # third sample's HR: garbage PNG
                data = b"\x89PNG\r\n\x1a\n" + b"\0" * 50
            if j == 3 * 5 + 1 and m.name.endswith("lr.png"):  # sixth sample's LR: truncated
                data = data[: len(data) // 3]
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    good_ids = {hashlib.sha1(h.tobytes()).hexdigest() for i, h in enumerate(photos[1]) if i not in (2, 5)}
    c = full_image_cfg(str(bad), num_workers=2, batch_size=2, batches_per_epoch=10)
    loader = build_train_loader(c, rank=0, world_size=1)
    ids = set()
    for batch in loader:
        ids.update(digest(h.permute(1, 2, 0)) for h in batch["hr"])
    assert ids <= good_ids and len(ids) >= 6
    assert loader.num_skipped >= 2


def test_rank_without_data_fails_at_startup(photos, tmp_path):
    d = tmp_path / "two"
    d.mkdir()
    for i in range(2):
        Image.fromarray(photos[1][i]).save(d / f"{i}.png")
    write_shards(d, tmp_path / "s", scale=S, workers=0, progress=False)
    with pytest.raises(
        ValueError, match=r"no data: 1 shard\(s\) with 2 sample\(s\) split over 3 rank\(s\) × 2 worker"
    ):
        build_train_loader(cfg(tmp_path / "s", num_workers=2), rank=0, world_size=3)  # samples [0, 0)
    # 2 ranks x 2 workers: one sample per rank, and an epoch of one batch, drawn by worker 0 alone;
    # worker 1 holds nothing and draws nothing (before: refused as "no data").
    build_train_loader(cfg(tmp_path / "s", num_workers=2), rank=1, world_size=2)
    if HAS_DALI:
        with pytest.raises(ValueError, match="no data"):
            build_train_loader(cfg(tmp_path / "s", loader="dali"), rank=2, world_size=3)


@pytest.mark.parametrize(
    ("loader", "workers"),
    [
        ("webdataset", 0),
        pytest.param("webdataset", 2, marks=pytest.mark.distributed),
        pytest.param("dali", 0, marks=requires_dali),
    ],
)
def test_deterministic_and_resumes_at_the_batch(loader, workers, many_shards):
    c = cfg(many_shards, loader=loader, num_workers=workers, batches_per_epoch=5)
    first = build_train_loader(c, rank=0, world_size=1)
    run = [b["hr"] for _ in range(2) for b in first]  # epochs 0 and 1
    assert first.state_dict()["epoch"] == 2
    second = build_train_loader(c, rank=0, world_size=1)
    again = [b["hr"] for _ in range(2) for b in second]
    assert all(torch.equal(a, b) for a, b in zip(run, again))
    assert not torch.equal(run[0], run[5])  # epochs differ
    other = next(
        iter(
            build_train_loader(
                cfg(many_shards, loader=loader, num_workers=workers, seed=1), rank=0, world_size=1
            )
        )
    )
    assert not torch.equal(other["hr"], run[0])
    # Stop after 3 batches of epoch 1, save, resume in a fresh loader.
    interrupted = build_train_loader(c, rank=0, world_size=1)
    for _ in interrupted:
        pass
    it = iter(interrupted)
    for _ in range(3):
        next(it)
    state = interrupted.state_dict()
    assert (state["epoch"], state["batches_consumed"]) == (1, 3)
    resumed = build_train_loader(c, rank=0, world_size=1)
    resumed.load_state_dict(state)
    rest = [b["hr"] for b in resumed]
    assert len(rest) == 2 and all(torch.equal(a, b) for a, b in zip(rest, run[8:]))
    # Another seed is refused. Before: another shuffle buffer (or another shard list of the same
    # epoch length) was accepted, and the resumed epoch read some samples twice, others not at all.
    fewer = str(many_shards / "shard-00000*.tar")  # 10 of the 12 shards, the epoch length kept
    for shards, change, match in [
        (many_shards, {"seed": 7}, "seed"),
        (many_shards, {"shuffle_buffer": 4}, "shuffle_buffer=8 but this loader has shuffle_buffer=4"),
        (fewer, {}, r"shards='12 shard\(s\), 12 samples, [0-9a-f]+' but this loader has shards='10 shard"),
    ]:
        other = cfg(shards, loader=loader, num_workers=workers, batches_per_epoch=5, **change)
        with pytest.raises(ValueError, match=match):
            build_train_loader(other, rank=0, world_size=1).load_state_dict(state)


@requires_dali
def test_dali_and_webdataset_yield_the_same_samples(many_shards, photos):
    all_ids = {hashlib.sha1(h.tobytes()).hexdigest() for h in photos[1]}
    for loader in ("webdataset", "dali"):
        c = full_image_cfg(many_shards, loader=loader, batch_size=3, batches_per_epoch=12)
        ids = set()
        for batch in build_train_loader(c, rank=0, world_size=1):
            for lr, hr in zip(batch["lr"], batch["hr"]):
                ids.add(digest(hr.permute(1, 2, 0)))
                np.testing.assert_array_equal(
                    to_uint8(lr.permute(1, 2, 0).numpy()),
                    to_uint8(imresize(to_uint8(hr.permute(1, 2, 0).numpy()) / 255.0, 1 / S)),
                )
        assert ids == all_ids, loader


@pytest.mark.parametrize("loader", LOADERS)
def test_hr_only(loader, one_shard):
    c = cfg(one_shard, loader=loader, hr_only=True, hr_patch_size=40, batches_per_epoch=2)
    batches = list(build_train_loader(c, rank=0, world_size=1))
    assert len(batches) == 2
    assert set(batches[0]) == {"hr"} and batches[0]["hr"].shape == (4, 3, 40, 40)


def test_epoch_length_default_and_samples_per_epoch(many_shards):
    assert len(build_train_loader(cfg(many_shards), rank=0, world_size=2)) == 2  # ceil(12 / (4 * 2))
    assert len(build_train_loader(cfg(many_shards, samples_per_epoch=100), rank=1, world_size=2)) == 13


def test_config_validation():
    with pytest.raises(ValueError, match=r"data\.loader"):
        DataConfig(loader="torch")
    with pytest.raises(ValueError, match=r"data\.batch_size"):
        DataConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"data\.hflip"):
        DataConfig(hflip="yes")
    with pytest.raises(ValueError, match="alternatives"):
        DataConfig(batches_per_epoch=3, samples_per_epoch=4)
    with pytest.raises(ValueError, match="hr_only"):
        DataConfig(hr_patch_size=400)
    with pytest.raises(ValueError, match=r"unknown key.*patchsize"):
        DataConfig.from_dict({"patchsize": 32})
    assert DataConfig(hr_only=True, hr_patch_size=400).hr_patch == 400
    assert DataConfig(patch_size=32, scale=4).hr_patch == 128
    with pytest.raises(ValueError, match=r"data\.shards"):
        build_train_loader(DataConfig(shards="/nonexistent/*.tar"), rank=0, world_size=1)


@pytest.fixture(scope="module")
def odd_shards(photos, tmp_path_factory):
    """11 samples, one per shard: a count that 2, 3 and 4 ranks do not divide."""
    src = tmp_path_factory.mktemp("odd_src")
    for i in range(11):
        Image.fromarray(photos[1][i]).save(src / f"img{i:02d}.png")
    out = tmp_path_factory.mktemp("odd")
    assert write_shards(src, out, scale=S, shard_size_mb=1e-3, workers=0, progress=False)["num_shards"] == 11
    return out


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize(("world", "batch"), [(2, 4), (3, 2), (4, 3)])
def test_ranks_partition_every_epoch(loader, world, batch, odd_shards, photos):
    """The per-rank promise with a sample count the ranks do not divide: within each epoch no
    sample reaches two ranks, and every sample reaches one (default epoch length). DALI used to
    read past a rank's part into the next rank's."""
    all_ids = {hashlib.sha1(h.tobytes()).hexdigest() for h in photos[1][:11]}
    c = full_image_cfg(odd_shards, loader=loader, batch_size=batch)
    parts = []
    for epoch in range(2):
        seen = []
        for rank in range(world):
            ld = build_train_loader(c, rank=rank, world_size=world)
            ld.set_epoch(epoch)
            ids = [digest(h.permute(1, 2, 0)) for b in ld for h in b["hr"]]
            assert len(ids) == len(ld) * batch
            seen.append(set(ids))
        for a, b in itertools.combinations(range(world), 2):
            assert not seen[a] & seen[b], f"epoch {epoch}: ranks {a} and {b} read the same sample"
        assert set().union(*seen) == all_ids, f"epoch {epoch}: samples no rank read"
        parts.append(seen)
    if loader == "dali":
        assert parts[0] != parts[1]  # the parts change between epochs (tar order drawn per epoch)
