"""make_shards: layout, LR generation, crops, DALI index format, bad inputs, re-runs."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spsr_hpc.data import FolderDataset, imresize, modcrop, read_manifest, to_uint8, write_shards
from spsr_hpc.data.shards import crop_positions


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """uint8 (h, w, 3) with low-frequency content (bicubic-upsampled noise)."""
    small = rng.random((h // 8 + 2, w // 8 + 2, 3))
    big = imresize(small, 8)[:h, :w]
    return to_uint8(np.clip(big, 0, 1))


def save(img: np.ndarray, path: Path) -> Path:
    Image.fromarray(img).save(path)
    return path


def read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture
def hr_folder(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "HR"
    d.mkdir()
    save(smooth_image(rng, 34, 41), d / "a.png")  # not divisible by 4: mod-cropped to 32x40
    save(smooth_image(rng, 24, 24), d / "b.v2.png")  # a dot in the name
    return d


def test_generated_lr_equals_imresize_of_modcropped_hr(hr_folder, tmp_path):
    m = write_shards(hr_folder, tmp_path / "out", scale=4, workers=0, progress=False, command="test")
    assert m["num_samples"] == 2 and m["skipped_count"] == 0 and m["command"] == "test"
    members = read_tar(tmp_path / "out" / m["shards"][0]["name"])
    assert sorted(members) == ["a.hr.png", "a.json", "a.lr.png", "b_v2.hr.png", "b_v2.json", "b_v2.lr.png"]
    src = np.asarray(Image.open(hr_folder / "a.png"))
    hr = decode(members["a.hr.png"])
    np.testing.assert_array_equal(hr, modcrop(src, 4))
    expect_lr = to_uint8(imresize(modcrop(src, 4).astype(np.float64) / 255, 1 / 4))
    np.testing.assert_array_equal(decode(members["a.lr.png"]), expect_lr)
    meta = json.loads(members["a.json"])
    assert meta["hr_size"] == [32, 40] and meta["lr_size"] == [8, 10] and meta["source"] == "a.png"
    assert meta["source_size"] == [34, 41] and meta["crop"] is None and meta["scale"] == 4


def test_index_matches_dali_wds2idx(hr_folder, tmp_path):
    IndexCreator = pytest.importorskip("wds2idx", reason="DALI's wds2idx ships with nvidia-dali").IndexCreator
    m = write_shards(hr_folder, tmp_path / "out", scale=4, workers=0, progress=False)
    shard = tmp_path / "out" / m["shards"][0]["name"]
    with IndexCreator(str(shard), str(tmp_path / "ref.idx"), verbose=False) as ic:
        ic.create_index()
    assert (tmp_path / "ref.idx").read_text().split() == (
        tmp_path / "out" / m["shards"][0]["index"]
    ).read_text().split()


def test_crop_positions_like_basicsr():
    assert crop_positions(100, 48, 24) == [0, 24, 48, 52]
    assert crop_positions(96, 48, 24) == [0, 24, 48]
    assert crop_positions(40, 48, 24) == []


def test_subimages_align_with_full_lr(tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "HR"
    d.mkdir()
    src = save(smooth_image(rng, 40, 56), d / "img.png")
    m = write_shards(d, tmp_path / "out", scale=4, crop_size=24, step=16, workers=0, progress=False)
    hr_full = np.asarray(Image.open(src))
    lr_full = to_uint8(imresize(hr_full.astype(np.float64) / 255, 1 / 4))
    members = {}
    for s in m["shards"]:
        members.update(read_tar(tmp_path / "out" / s["name"]))
    keys = sorted(k[: -len(".json")] for k in members if k.endswith(".json"))
    assert len(keys) == 2 * 3 == m["num_samples"]  # y in {0, 16}, x in {0, 16, 32}
    for key in keys:
        y, x = json.loads(members[key + ".json"])["crop"]
        np.testing.assert_array_equal(decode(members[key + ".hr.png"]), hr_full[y : y + 24, x : x + 24])
        np.testing.assert_array_equal(
            decode(members[key + ".lr.png"]), lr_full[y // 4 : y // 4 + 6, x // 4 : x // 4 + 6]
        )


def test_bad_inputs_skipped_converted_and_counted(tmp_path):
    rng = np.random.default_rng(2)
    d = tmp_path / "HR"
    d.mkdir()
    save(smooth_image(rng, 16, 16), d / "good.png")
    save(smooth_image(rng, 16, 16)[..., 0], d / "grey.png")
    rgba = np.concatenate([smooth_image(rng, 16, 16), np.full((16, 16, 1), 7, np.uint8)], axis=2)
    save(rgba, d / "alpha.png")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    good_bytes = (d / "good.png").read_bytes()
    (d / "truncated.png").write_bytes(good_bytes[: len(good_bytes) // 2])
    (d / "notes.txt").write_text("not an image")
    grey16 = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(d / "deep.png")  # 16-bit grey PNG
    Image.fromarray(smooth_image(rng, 16, 16)).convert("P").save(d / "palette.png")
    with pytest.warns(UserWarning, match="skipping"):
        m = write_shards(d, tmp_path / "out", scale=4, workers=0, progress=False)
    assert m["num_samples"] == 5
    assert m["skipped_count"] == 2
    assert sorted(s["file"] for s in m["skipped"]) == ["corrupt.png", "truncated.png"]
    assert all("cannot decode" in s["reason"] for s in m["skipped"])
    conv = {c["file"]: c["conversion"] for c in m["converted"]}
    assert "grey" in conv["grey.png"] and "alpha dropped" in conv["alpha.png"]
    members = read_tar(tmp_path / "out" / m["shards"][0]["name"])
    grey = decode(members["grey.hr.png"])
    assert grey.shape == (16, 16, 3) and np.array_equal(grey[..., 0], grey[..., 2])
    np.testing.assert_array_equal(decode(members["alpha.hr.png"]), rgba[..., :3])
    assert "16-bit" in conv["deep.png"] and "palette" in conv["palette.png"]
    deep = decode(members["deep.hr.png"])
    np.testing.assert_array_equal(deep[..., 1], (grey16 // 257).astype(np.uint8))  # x*257/257 = x exactly


def test_lr_folder_matching_and_mismatch(tmp_path):
    rng = np.random.default_rng(3)
    hr_d, lr_d = tmp_path / "HR", tmp_path / "LR"
    hr_d.mkdir()
    lr_d.mkdir()
    for name in ("0001", "0002", "0003"):
        save(smooth_image(rng, 32, 24), hr_d / f"{name}.png")
    lr1 = smooth_image(rng, 8, 6)
    save(lr1, lr_d / "0001x4.png")  # DIV2K naming
    save(smooth_image(rng, 9, 6), lr_d / "0002x4.png")  # wrong size
    with pytest.warns(UserWarning, match="size mismatch"):
        m = write_shards(hr_d, tmp_path / "out", lr_dir=lr_d, scale=4, workers=0, progress=False)
    assert m["num_samples"] == 1 and not m["lr_generated"]
    reasons = {s["file"]: s["reason"] for s in m["skipped"]}
    assert "size mismatch" in reasons["0002.png"] and "6x9" in reasons["0002.png"]
    assert "no matching LR" in reasons["0003.png"]
    members = read_tar(tmp_path / "out" / m["shards"][0]["name"])
    np.testing.assert_array_equal(decode(members["0001.lr.png"]), lr1)


def test_rerun_skips_finished_work_and_rewrites_on_change(hr_folder, tmp_path):
    out = tmp_path / "out"
    m1 = write_shards(hr_folder, out, scale=4, workers=0, progress=False, shard_size_mb=1e-3)
    assert m1["num_shards"] == 2  # tiny target: one sample per shard
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    m2 = write_shards(hr_folder, out, scale=4, workers=0, progress=False, shard_size_mb=1e-3)
    assert m2 == m1 and stamps == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # A new parameter rewrites everything; the old second shard is removed, checksums are valid.
    m3 = write_shards(hr_folder, out, scale=4, workers=0, progress=False, shard_size_mb=10)
    assert m3["num_shards"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.idx", "shard-000000.tar"]
    import hashlib

    assert hashlib.sha256((out / "shard-000000.tar").read_bytes()).hexdigest() == m3["shards"][0]["sha256"]
    # Same inputs, rewritten with force: byte-identical shards (fixed tar metadata).
    m4 = write_shards(hr_folder, out, scale=4, workers=0, progress=False, shard_size_mb=10, force=True)
    assert m4["shards"] == m3["shards"]


def test_interrupted_run_never_looks_complete(hr_folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_shards(hr_folder, out, scale=4, workers=0, progress=False)
    from spsr_hpc.data import shards as shards_mod

    calls = {"n": 0}
    real_add = shards_mod._ShardWriter.add

    def failing_add(self, sample):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real_add(self, sample)

    monkeypatch.setattr(shards_mod._ShardWriter, "add", failing_add)
    with pytest.raises(KeyboardInterrupt):
        write_shards(hr_folder, out, scale=4, workers=0, progress=False, force=True)
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.tmp"))
    with pytest.raises(ValueError, match="manifest"):
        read_manifest(out)
    monkeypatch.undo()
    m = write_shards(hr_folder, out, scale=4, workers=0, progress=False)
    assert m["num_samples"] == 2


@pytest.mark.distributed
def test_parallel_workers_give_identical_shards(hr_folder, tmp_path):
    m0 = write_shards(hr_folder, tmp_path / "a", scale=4, workers=0, progress=False)
    m2 = write_shards(hr_folder, tmp_path / "b", scale=4, workers=2, progress=False)
    assert m0["shards"] == m2["shards"]


@pytest.mark.distributed
def test_conversion_workers_are_not_forks_of_the_caller(hr_folder, tmp_path):
    """write_shards' worker pool must not fork its caller: a fork inherits state that is not
    fork-safe. Found in CI: a DALI pipeline awaiting garbage collection was collected inside a
    forked worker, and its __del__ waited forever for DALI threads that live only in the parent,
    so the main job's shard step hung. Here the caller registers an at-fork handler that never
    returns in the child (any such state): with forked workers the call hangs, so it runs in its
    own process group under a time limit."""
    import os
    import signal
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    script = (
        "import os, sys, threading\n"
        f"sys.path.insert(0, {str(repo)!r})\n"
        "from spsr_hpc.data import write_shards\n"
        "os.register_at_fork(after_in_child=lambda: threading.Event().wait())\n"
        f"m = write_shards({str(hr_folder)!r}, {str(tmp_path / 'out')!r}, scale=4, workers=2,\n"
        "                  progress=False)\n"
        "print('samples', m['num_samples'])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the parent and its hung forked workers
        proc.communicate()
        pytest.fail("write_shards(workers=2) hung: its workers are forks of the caller")
    assert proc.returncode == 0 and "samples 2" in out, out[-2000:]


def test_parameter_errors(hr_folder, tmp_path):
    with pytest.raises(ValueError, match="multiples of scale"):
        write_shards(hr_folder, tmp_path / "o", scale=4, crop_size=30, step=16)
    with pytest.raises(ValueError, match="go together"):
        write_shards(hr_folder, tmp_path / "o", scale=4, crop_size=32)
    with pytest.raises(ValueError, match="does not exist"):
        write_shards(tmp_path / "nope", tmp_path / "o")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="no sample"), pytest.warns(UserWarning):
        write_shards(bad, tmp_path / "o", workers=0, progress=False)


def test_launch_script(hr_folder, tmp_path, capsys):
    import runpy

    mod = runpy.run_path(str(Path(__file__).parents[1] / "launch" / "make_shards.py"))
    rc = mod["main"](
        ["--hr", str(hr_folder), "--out", str(tmp_path / "o"), "--workers", "0", "--no-progress"]
    )
    assert rc == 0 and "2 samples in 1 shard(s)" in capsys.readouterr().out
    assert read_manifest(tmp_path / "o")["num_samples"] == 2
    assert (
        mod["main"](["--hr", str(hr_folder), "--out", str(tmp_path / "o2"), "--crop", "30", "--step", "8"])
        == 2
    )


def test_folder_dataset(tmp_path):
    rng = np.random.default_rng(4)
    hr_d, lr_d = tmp_path / "HR", tmp_path / "LR"
    hr_d.mkdir()
    lr_d.mkdir()
    img = smooth_image(rng, 35, 22)
    save(img, hr_d / "baby.png")
    ds = FolderDataset(hr_d, scale=4)
    item = ds[0]
    assert item["name"] == "baby" and item["hr"].dtype == np.uint8 and item["hr"].shape == (32, 20, 3)
    expect = to_uint8(imresize(modcrop(img, 4).astype(np.float64) / 255, 1 / 4)).transpose(2, 0, 1) / 255
    np.testing.assert_allclose(item["lr"].numpy(), expect, atol=1e-7)
    lr = smooth_image(rng, 8, 5)
    save(lr, lr_d / "baby_x4.png")
    item = FolderDataset(hr_d, lr_d, scale=4, hr_float=True)[0]
    np.testing.assert_allclose(item["lr"].numpy(), lr.transpose(2, 0, 1) / 255, atol=1e-7)
    assert item["hr"].shape == (3, 32, 20)
    (hr_d / "broken.png").write_bytes(b"broken")
    ds = FolderDataset(hr_d, scale=4)
    with pytest.raises(ValueError, match=r"broken\.png"):
        ds[[p.name for p in ds.hr_files].index("broken.png")]


@pytest.mark.slow
def test_export_bundled_photos_fixed_split_and_idempotent(tmp_path):
    from spsr_hpc.data import export_bundled_photos, load_bundled_photos

    photos = load_bundled_photos()
    assert {"astronaut", "coffee", "chelsea"} <= set(photos)
    train, val = export_bundled_photos(tmp_path, holdout=2)
    assert sorted(p.name for p in val.iterdir()) == ["chelsea.png", "coffee.png"]
    assert sorted(p.stem for p in train.iterdir()) == sorted(set(photos) - {"chelsea", "coffee"})
    np.testing.assert_array_equal(np.asarray(Image.open(train / "astronaut.png")), photos["astronaut"])
    stamps = {p: p.stat().st_mtime_ns for p in [*train.iterdir(), *val.iterdir()]}
    export_bundled_photos(tmp_path, holdout=2)
    assert stamps == {p: p.stat().st_mtime_ns for p in [*train.iterdir(), *val.iterdir()]}
    with pytest.raises(ValueError, match="holdout"):
        export_bundled_photos(tmp_path, holdout=len(photos))


def _photos(folder: Path, n: int, size: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        save(smooth_image(rng, size, size), folder / f"p{i}.png")
    return folder


def test_two_prefixes_share_a_folder_without_overwriting_each_other(tmp_path):
    """make_shards --prefix x4 then --prefix x2 into one folder. Before: both wrote manifest.json,
    so the second replaced the first's: the folder resolved to the x2 set only, a truncated x4
    shard passed verification, preflight refused the valid x4 set at scale 4 ("made at scale 2"),
    and re-running the first command rewrote its shards. Each set has its own manifest now."""
    from spsr_hpc.data import DataConfig, resolve_shards
    from spsr_hpc.data.shards import verify_shards
    from spsr_hpc.preflight import data_problems

    a, b, out = _photos(tmp_path / "a", 3, 64, 0), _photos(tmp_path / "b", 2, 32, 1), tmp_path / "out"
    m4 = write_shards(a, out, scale=4, prefix="x4", workers=0, progress=False)
    m2 = write_shards(b, out, scale=2, prefix="x2", workers=0, progress=False)
    assert read_manifest(out, "x4") == m4 and read_manifest(out, "x2") == m2  # both kept
    with pytest.raises(ValueError, match=r"holds several shard sets \(x2.manifest.json, x4.manifest.json\)"):
        resolve_shards(str(out))  # which set is meant must be said
    for prefix, scale in (("x4", 4), ("x2", 2)):
        spec = str(out / f"{prefix}-*.tar")
        assert data_problems(DataConfig(shards=spec, scale=scale, patch_size=8)) == [], prefix
        other = 2 if scale == 4 else 4
        (problem,) = data_problems(DataConfig(shards=spec, scale=other, patch_size=8))
        assert f"was made at scale {scale}" in problem
    shard = out / "x4-000000.tar"
    before = shard.stat().st_mtime_ns
    assert write_shards(a, out, scale=4, prefix="x4", workers=0, progress=False) == m4  # a no-op
    assert shard.stat().st_mtime_ns == before and read_manifest(out, "x2") == m2
    shard.write_bytes(shard.read_bytes()[:4096])
    assert verify_shards([str(shard)], "size") == [(str(shard), f"4096 bytes, the manifest says "
                                                                f"{m4['shards'][0]['bytes']}")]


@pytest.mark.parametrize("next_run", ["x4 again", "default prefix"])
def test_an_old_style_manifest_of_another_prefix_becomes_its_own(tmp_path, next_run):
    """A folder made before prefixes had their own manifests: manifest.json lists x4 shards. The
    next run into the folder makes it x4.manifest.json: an x4 re-run with the same inputs does
    nothing, and a default-prefix run no longer deletes the x4 set's only manifest (the set would
    be unlisted: unverified, and preflight blind to its scale)."""
    from spsr_hpc.data.shards import verify_shards

    a, out = _photos(tmp_path / "a", 2, 64, 0), tmp_path / "out"
    m = write_shards(a, out, scale=4, prefix="x4", workers=0, progress=False)
    (out / "x4.manifest.json").rename(out / "manifest.json")  # the old layout
    assert read_manifest(out)["shards"] == m["shards"]
    shard = out / "x4-000000.tar"
    before = shard.stat().st_mtime_ns
    if next_run == "x4 again":
        write_shards(a, out, scale=4, prefix="x4", workers=0, progress=False)
        assert shard.stat().st_mtime_ns == before  # found its manifest: nothing rewritten
        assert sorted(p.name for p in out.glob("*.json")) == ["x4.manifest.json"]
    else:
        write_shards(_photos(tmp_path / "b", 2, 32, 1), out, scale=2, workers=0, progress=False)
        assert sorted(p.name for p in out.glob("*.json")) == ["manifest.json", "x4.manifest.json"]
        assert read_manifest(out, "x4")["shards"] == m["shards"]
    shard.write_bytes(shard.read_bytes()[:4096])
    assert [s for s, _ in verify_shards([str(shard)], "size")] == [str(shard)]  # still verified


def test_preflight_names_each_shard_set_once(tmp_path):
    """Two sets of several shards in one folder, both at the wrong scale: one problem per set.
    Before: one per shard (sets were told apart by the id of a manifest read again per shard)."""
    from spsr_hpc.data import DataConfig
    from spsr_hpc.preflight import data_problems

    a, b, out = _photos(tmp_path / "a", 3, 64, 0), _photos(tmp_path / "b", 3, 64, 1), tmp_path / "out"
    for prefix, photos in (("p", a), ("q", b)):
        m = write_shards(photos, out, scale=4, prefix=prefix, shard_size_mb=1e-3, workers=0, progress=False)
        assert m["num_shards"] == 3
    problems = data_problems(DataConfig(shards=str(out / "*.tar"), scale=2, patch_size=8))
    assert len(problems) == 2, problems
    assert "(p-*.tar) was made at scale 4" in problems[0] and "(q-*.tar) was made at scale 4" in problems[1]
