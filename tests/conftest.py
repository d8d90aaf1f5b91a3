"""Test harness: Triton interpreter on machines without CUDA, seeding, markers.

TRITON_INTERPRET is read when a kernel is *decorated* (i.e. when spsr_kernels is imported),
so it must be set here, before any test module imports the kernels.
"""

import os

# With more runnable threads than cores (2 cores here, xdist workers, gloo ranks), OpenMP's
# default spin-waiting burns the CPU that the other threads need: one training-step test took
# 38 s with spinning and 2 s without. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import gc  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Tests run on 2 cores; more intra-op threads only add contention with the other workers.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # The marker, not item.keywords: keywords hold the names of the folders above the test too,
        # so every test of a checkout in a folder named "gpu" would be skipped.
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def small_tmpfs(tmp_path):
    """Factory ``make(size) -> folder``: a tmpfs of that size mounted in tmp_path (a real full
    disk), unmounted after the test. Skips where mounting is not permitted (not root, a container
    without CAP_SYS_ADMIN); the injected-ENOSPC tests cover the same paths everywhere."""
    import subprocess

    mounted = []

    def make(size: str):
        mnt = tmp_path / f"tmpfs{len(mounted)}"
        mnt.mkdir()
        try:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                               capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("no `mount` command here; the injected-ENOSPC tests run everywhere")
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); the "
                        "injected-ENOSPC tests run everywhere")
        mounted.append(mnt)
        return mnt

    yield make
    for mnt in mounted:
        # Lazy: a process of the test still holding a file there (a pool worker on its way out)
        # would make a plain umount fail and leave the mount behind for pytest's clean-up.
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def device():
    """The device kernel tests run on: CUDA when present, else CPU through the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="session")
def bundled_shards(tmp_path_factory):
    """Shards (×4, full images) of scikit-image's bundled training photos, made once per session."""
    from spsr_hpc.data import export_bundled_photos, write_shards

    root = tmp_path_factory.getbasetemp() / "bundled"
    out = root / "shards"
    if not (out / "manifest.json").is_file():
        train_dir, _ = export_bundled_photos(root / "photos")
        write_shards(train_dir, out, scale=4, workers=0, progress=False)
    return out


@pytest.fixture(scope="session")
def noise_shards(tmp_path_factory):
    """Shards of eight 48x48 random-noise HR images (x4), several small tar files, made once per
    session: for the multi-process training tests, which only read them."""
    from PIL import Image

    from spsr_hpc.data import write_shards

    root = tmp_path_factory.mktemp("noise_shards")
    rng = np.random.default_rng(0)
    (root / "hr").mkdir()
    for i in range(8):
        Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)).save(root / "hr" / f"{i}.png")
    write_shards(root / "hr", root / "shards", scale=4, workers=0, progress=False, shard_size_mb=0.01)
    return root / "shards"


@pytest.fixture
def release_dali_pipelines():
    """Collect garbage after a test that may build DALI pipelines, so that their ``__del__`` runs
    in this process, where DALI's threads live: collected inside a later fork (a DataLoader
    worker, any multiprocessing fork), it waits forever for threads the fork does not have."""
    yield
    if "nvidia.dali" in sys.modules:
        gc.collect()
