"""NSE configs: one strategy per NSE, the epoch length, the seeded random NSE of SPSR-R."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spsr_hpc.config import ConfigError, load_config
from spsr_hpc.models import NSEConfig, build_nse
from spsr_hpc.nse.config import NSEPretrainConfig, resolve_epoch_length, training_images

REPO = Path(__file__).resolve().parents[1]


def _load(name: str, overrides=()) -> NSEPretrainConfig:
    return load_config(REPO / "configs" / name, list(overrides), schema=NSEPretrainConfig)


def test_one_strategy_per_nse_config():
    assert NSEPretrainConfig().objective.strategies == ["h"]
    runs = set()
    for name, want in [("nse_contrastive.yaml", ["h"]), ("nse_contrastive_v.yaml", ["v"]),
                       ("nse_contrastive_c.yaml", ["c"]), ("nse_contrastive_hvc.yaml", ["h", "v", "c"])]:
        cfg = _load(name)
        assert cfg.objective.strategies == want
        assert (cfg.optim.lr, cfg.optim.lr_step_epochs, cfg.optim.lr_gamma, cfg.data.batch_size) == (
            1e-3, 20, 0.2, 48)
        assert cfg.data.samples_per_epoch is None and cfg.data.batches_per_epoch is None
        runs.add(cfg.logging.run_dir)
    assert len(runs) == 4  # each NSE has its own run folder and export


@pytest.fixture(scope="module")
def cropped_shards(tmp_path_factory, bundled_shards):
    """The bundled training photos cut into 128 crops (step 128): more samples than images."""
    from spsr_hpc.data import write_shards

    train_dir = bundled_shards.parent / "photos" / "train" / "HR"
    out = tmp_path_factory.mktemp("cropped") / "shards"
    manifest = write_shards(train_dir, out, scale=4, crop_size=128, step=128, shard_size_mb=1.0, workers=0,
                            progress=False)
    assert manifest["num_samples"] > manifest["num_files"] and manifest["num_shards"] > 1
    return out, manifest


def test_epoch_defaults_to_the_number_of_training_images(cropped_shards):
    shards, manifest = cropped_shards
    images = manifest["num_files"] - manifest["skipped_count"]
    assert training_images(str(shards))[0] == images
    cfg, note = resolve_epoch_length(_load("tiny_nse_contrastive.yaml", [f"data.shards={shards}",
                                                                          "data.batches_per_epoch=null"]))
    assert cfg.data.samples_per_epoch == images and str(images) in note and "training images" in note
    # The loader then makes ceil(images / (batch × world)) batches per epoch.
    from spsr_hpc.data.loader import epoch_batches

    assert epoch_batches(cfg.data, manifest["num_samples"], 2) == -(-images // (cfg.data.batch_size * 2))
    # Explicit values win; a subset of the shards has no known image count.
    cfg2, note2 = resolve_epoch_length(_load("tiny_nse_contrastive.yaml", [
        f"data.shards={shards}", "data.batches_per_epoch=null", "data.samples_per_epoch=1000"]))
    assert cfg2.data.samples_per_epoch == 1000 and "1000" in note2
    one = sorted(str(p) for p in shards.glob("*.tar"))[:1]
    assert training_images(one) is None
    assert training_images(sorted(str(p) for p in shards.glob("*.tar")))[0] == images
    with pytest.raises(ConfigError, match=r"data\.samples_per_epoch"):
        resolve_epoch_length(_load("tiny_nse_contrastive.yaml", [f"data.shards={one}",
                                                                  "data.batches_per_epoch=null"]))


def test_random_init_nse_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(7)
    before = torch.get_rng_state()
    a = build_nse(NSEConfig(width=16, random_init=True, random_seed=3))
    assert torch.equal(torch.get_rng_state(), before)
    b = build_nse(NSEConfig(width=16, random_init=True, random_seed=3))
    c = build_nse(NSEConfig(width=16, random_init=True, random_seed=4))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert any(not torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values()))
    # The same draw as building the NSE right after seeding the global RNG (the documented init).
    torch.manual_seed(3)
    ref = build_nse(NSEConfig(width=16))
    for va, vr in zip(a.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(va, vr)
    with pytest.raises(ValueError, match="exclude each other"):
        NSEConfig(random_init=True, pretrained="x.safetensors")
    with pytest.raises(ConfigError, match=r"nse\.random_init"):
        _load("nse_contrastive.yaml", ["nse.random_init=true"])


_SPSR_R_SCRIPT = """
import sys, torch, yaml
from spsr_hpc.config import load_config
from spsr_hpc.models import NSEConfig, build_nse
from spsr_hpc.train.trainer import Trainer
from spsr_hpc.train.engines import destroy_distributed
run_dir = sys.argv[1]
cfg = load_config("configs/tiny_spsr_r.yaml", [
    f"logging.run_dir={run_dir}", "train.max_steps=1", "logging.progress_bar=false",
    "logging.tensorboard=false", "logging.image_every=0", "checkpoint.every=0", "train.ema_decay=null",
    "model.generator.nb=1", "model.generator.taps=[0]", "model.nse.random_seed=5"])
g = torch.Generator().manual_seed(0)
hr = torch.rand(4, 3, 64, 64, generator=g)
batches = [{"lr": torch.nn.functional.avg_pool2d(hr, 4), "hr": hr}]
t = Trainer(cfg, loader=batches)
nse = t.objective.nse
assert not nse.training and not any(p.requires_grad for p in nse.parameters())
before = {k: v.clone() for k, v in nse.state_dict().items()}
ref = build_nse(NSEConfig(width=32, random_init=True, random_seed=5)).state_dict()
assert all(torch.equal(before[k], ref[k]) for k in ref), "not the seeded random NSE"
summary = t.fit(); t.close()
assert all(torch.equal(v, before[k]) for k, v in t.objective.nse.state_dict().items()), "NSE moved"
saved = yaml.safe_load(open(f"{run_dir}/config.yaml"))["model"]["nse"]
assert (saved["random_init"], saved["random_seed"], saved["pretrained"]) == (True, 5, None), saved
assert "loss/g/structure_pixel" in summary["last_metrics"], summary
destroy_distributed()
print("SPSR-R OK")
"""


@pytest.mark.slow
def test_spsr_r_trains_with_the_seeded_frozen_random_nse(tmp_path):
    out = subprocess.run([sys.executable, "-c", _SPSR_R_SCRIPT, str(tmp_path / "run")], capture_output=True,
                         text=True, timeout=600, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and "SPSR-R OK" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
