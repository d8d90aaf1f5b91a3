"""Helpers of the tests that train the paper's rows in tiny CPU versions.

tests/test_paper_rows.py (Tables VI and VII, exports) and tests/test_paper_ablations.py (Tables I,
III, V and the SPSR-G / SPSR-P ablations) both train many configs. Each test file doubles as its
own worker script: :func:`run_worker` runs it once in a subprocess that trains every config of the
file and writes ``results.json``, so torch/DeepSpeed imports are paid once and no process group
leaks into the pytest process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# What every tiny run overrides: sizes (HR 64 patches, 2 per batch), quiet logging that records
# every step, no validation, and a random-weight perceptual VGG19 (no ImageNet file needed).
TINY = [
    "data.patch_size=16",  # HR 64
    "data.batch_size=2",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "logging.image_every=0",
    "logging.log_every=1",
    "val.dir=null",
    "perceptual.random_weights=true",
]

# docs/method.md §4 (Table VII's GAN row: ESRGAN's recipe, §11): the generator terms of each method,
# written out here independently of the objective's code, and the discriminator each GAN term needs.
PSNR_TERMS = {"pixel"}
ESRGAN_TERMS = {"pixel", "perceptual", "image_gan"}
SPSR_G_TERMS = {"pixel", "perceptual", "image_gan", "gradient_pixel", "gradient_gan", "branch_pixel"}
SPSR_P_TERMS = {"pixel", "perceptual", "branch_pixel", "structure_pixel", "structure_gan"}  # Eq. 17; -J alike
GAN_D = {"image_gan": "image", "gradient_gan": "gradient", "structure_gan": "structure"}


def discriminators_of(terms: set[str]) -> list[str]:
    """The discriminators a run with these generator terms trains, sorted."""
    return sorted(GAN_D[t] for t in terms if t in GAN_D)


class Batches:
    """Deterministic (lr, hr) batches with a position, so that a resume continues the stream."""

    def __init__(self, n: int = 4) -> None:
        g = torch.Generator().manual_seed(7)
        hr = torch.rand(n, 2, 3, 64, 64, generator=g)
        self.batches = [{"hr": h, "lr": torch.nn.functional.avg_pool2d(h, 4)} for h in hr]
        self.i = 0

    def __iter__(self):
        while True:
            batch = self.batches[self.i % len(self.batches)]
            self.i += 1
            yield batch

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = int(state["i"])


def run_worker(script: str | Path, out: Path, *args: str, interpret: bool = True,
               timeout: float = 900) -> dict:
    """Run ``python script out *args`` (one process, one thread, no launcher environment) and
    return the ``out/results.json`` it writes; a failing worker fails the test with its output.

    interpret: run the Triton kernels in Triton's interpreter (TRITON_INTERPRET=1), as the rest of
    the suite does on CPU; False leaves the variable unset, so on CPU spsr_kernels takes its PyTorch
    path (the interpreted gradient map was half of a tiny SPSR-G step; the kernels have their own
    tests)."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "TRITON_INTERPRET")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, str(script), str(out), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"worker failed (rc {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return json.loads((out / "results.json").read_text())
