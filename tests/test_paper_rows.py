"""The paper's last rows train, and every export infers and evaluates from its metadata alone.

One subprocess (this file doubles as its worker script) trains a tiny CPU version of each new
config (Table VI: spsr_vgg, spsr_resnet with random-weight extractors; Table VII: edsr/srresnet
_psnr, then _gan, _g and _p of both backbones started from those PSNR exports) for two steps,
checkpoints, resumes for a third step and exports; plus the generator families every other
config trains (rrdbnet, spsr fresh, spsr from fusion_init=passthrough). The tests then run launch/infer.py and
launch/evaluate.py (their main functions with argv, and once the script itself) on each export
with no architecture flag.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from paper_runs import CONFIGS, REPO, SPSR_G_TERMS, SPSR_P_TERMS, TINY, Batches, discriminators_of, run_worker
from PIL import Image

COMMON = [*TINY, "checkpoint.every=1", "train.ema_decay=0.9"]
SPSR = ["model.generator.nf=8", "model.generator.nb=2", "model.generator.gc=4", "model.generator.taps=[0,1]",
        "model.generator.pretrained=null", "train.fusion_warmup_steps=1"]
BACKBONE = ["model.generator.nf=8", "model.generator.nb=1"]
IMAGE_D = ["model.discriminators.image.nf=4", "model.discriminators.image.input_size=64"]
GRADIENT_D = ["model.discriminators.gradient.nf=4", "model.discriminators.gradient.input_size=66"]
STRUCT_D = ["model.discriminators.structure.nf=4"]

# name -> (config file, overrides, export the run starts from: a name in this dict or None)
RUNS: dict[str, tuple[str, list[str], str | None]] = {
    "spsr_vgg": ("spsr_vgg.yaml", [*SPSR, *STRUCT_D, "model.structure_random_weights=true"], None),
    "spsr_resnet": ("spsr_resnet.yaml", [*SPSR, *STRUCT_D, "model.structure_random_weights=true"], None),
    "edsr_psnr": ("edsr_psnr.yaml", BACKBONE, None),
    "srresnet_psnr": ("srresnet_psnr.yaml", BACKBONE, None),
    "edsr_gan": ("edsr_gan.yaml", [*BACKBONE, *IMAGE_D], "edsr_psnr"),
    "srresnet_gan": ("srresnet_gan.yaml", [*BACKBONE, *IMAGE_D], "srresnet_psnr"),
    "edsr_g": ("edsr_g.yaml", [*BACKBONE, *IMAGE_D, *GRADIENT_D], "edsr_psnr"),
    "srresnet_g": ("srresnet_g.yaml", [*BACKBONE, *IMAGE_D, *GRADIENT_D], "srresnet_psnr"),
    "edsr_p": ("edsr_p.yaml", [*BACKBONE, *STRUCT_D, "model.discriminators.structure.input_size=null",
                               "model.nse.random_init=true", "model.nse.pretrained=null"], "edsr_psnr"),
    "srresnet_p": ("srresnet_p.yaml", [*BACKBONE, *STRUCT_D, "model.discriminators.structure.input_size=null",
                                       "model.nse.random_init=true", "model.nse.pretrained=null"],
                   "srresnet_psnr"),
    # The other generator families: rrdbnet, spsr fresh, spsr from a passthrough start.
    "rrdbnet": ("tiny_psnr.yaml", ["model.generator.nf=8", "model.generator.nb=2", "model.generator.gc=4"],
                None),
    "spsr_fresh": ("tiny_spsr_g.yaml", [*SPSR, *IMAGE_D, *GRADIENT_D], None),
    "spsr_passthrough": ("tiny_spsr_g.yaml", [*SPSR, *IMAGE_D, *GRADIENT_D,
                                              "model.generator.fusion_init=passthrough"], "rrdbnet"),
}
NEW_CONFIGS = ("spsr_vgg", "spsr_resnet", "edsr_psnr", "srresnet_psnr", "edsr_gan", "srresnet_gan")


def worker(out: Path) -> None:
    from spsr_hpc.config import load_config
    from spsr_hpc.train.engines import destroy_distributed
    from spsr_hpc.train.trainer import Trainer

    results = {}
    for name, (config, overrides, start) in RUNS.items():
        run_dir = out / name
        ovs = [*COMMON, *overrides, f"logging.run_dir={run_dir}"]
        if start is not None:
            ovs.append(f"model.generator.pretrained={results[start]['export']}")
        steps = []
        for max_steps in (2, 3):  # train and checkpoint, then resume from step 2 for a third step
            cfg = load_config(CONFIGS / config, [*ovs, f"train.max_steps={max_steps}"])
            t = Trainer(cfg, loader=Batches())
            steps.append(t.step)
            summary = t.fit()
            t.close()
        results[name] = {
            "start_steps": steps,
            "step": summary["step"],
            "terms": sorted(k for k in summary["last_metrics"] if k.startswith("loss/g/")),
            "d": sorted(t.d_engines),
            "d_input": {n: [int(getattr(e.module, "in_ch", 0)), int(getattr(e.module, "input_size", 0))]
                        for n, e in t.d_engines.items()},
            "finite": all(np.isfinite(v) for k, v in summary["last_metrics"].items()
                          if k.startswith("loss/")),
            "export": summary["exports"][-1],  # generator_ema.safetensors
            "exports": summary["exports"],
        }
    destroy_distributed()
    (out / "results.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    return run_worker(__file__, tmp_path_factory.mktemp("rows"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (root / "lr").mkdir()
    (root / "hr").mkdir()
    Image.fromarray(rng.integers(0, 256, (10, 13, 3), dtype=np.uint8)).save(root / "lr" / "a.png")
    Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(root / "hr" / "b.png")
    return root


pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", NEW_CONFIGS)
def test_new_config_trains_saves_resumes_and_exports(runs, name):
    r = runs[name]
    assert r["start_steps"] == [0, 2] and r["step"] == 3 and r["finite"]
    assert [Path(p).name for p in r["exports"]] == ["generator.safetensors", "generator_ema.safetensors"]
    expected = {
        "spsr_vgg": (["branch_pixel", "perceptual", "pixel", "structure_gan", "structure_pixel"],
                     ["structure"]),
        "edsr_psnr": (["pixel"], []),
        "edsr_gan": (["image_gan", "perceptual", "pixel"], ["image"]),
    }
    family = name.replace("resnet", "vgg") if name.startswith("spsr") else name.replace("srresnet", "edsr")
    terms, ds = expected[family]
    assert [t.split("/")[-1] for t in r["terms"]] == terms and r["d"] == ds


@pytest.mark.parametrize("name", ["edsr_g", "srresnet_g", "edsr_p", "srresnet_p"])
def test_backbone_g_and_p_train_spsr_losses_without_the_branch_term(runs, name):
    """Table VII (docs/method.md §11): -G / -P train SPSR-G's / SPSR-P's terms (§4) but the branch one."""
    terms = (SPSR_G_TERMS if name.endswith("_g") else SPSR_P_TERMS) - {"branch_pixel"}
    r = runs[name]
    assert {t.split("/")[-1] for t in r["terms"]} == terms and r["finite"]
    assert r["d"] == discriminators_of(terms)


def test_structure_d_sized_from_each_extractor(runs):
    """HR 64 patches: VGG19 conv5_4 -> 512×4×4, ResNet18 layer3[1] -> 256×4×4, the NSE 32×16×16."""
    assert runs["spsr_vgg"]["d_input"]["structure"] == [512, 4]
    assert runs["spsr_resnet"]["d_input"]["structure"] == [256, 4]
    assert runs["srresnet_p"]["d_input"]["structure"] == [32, 16]


def test_psnr_exports_start_the_gan_g_p_runs(runs):
    from spsr_hpc.models import GeneratorConfig, build_generator, load_pretrained

    for name in ("edsr_gan", "edsr_g", "edsr_p", "srresnet_gan", "srresnet_g", "srresnet_p"):
        assert runs[name]["start_steps"] == [0, 2]
    fam = {"edsr_psnr": "edsr", "srresnet_psnr": "srresnet"}
    for psnr, arch in fam.items():
        fresh = build_generator(GeneratorConfig(name=arch, nf=8, nb=1))
        report = load_pretrained(fresh, runs[psnr]["export"])
        assert report.matched == report.total


@pytest.mark.parametrize("name", list(RUNS))
def test_every_export_infers_and_evaluates_without_architecture_flags(runs, name, images, tmp_path):
    from spsr_hpc.evaluate import main as evaluate_main
    from spsr_hpc.inference import build_and_load, generator_config_from_metadata
    from spsr_hpc.inference import main as infer_main

    ckpt = runs[name]["export"]
    written = infer_main(["--input", str(images / "lr" / "a.png"), "--checkpoint", ckpt,
                          "--out", str(tmp_path / "sr"), "--tile", "0", "--no-progress"])
    sr = np.asarray(Image.open(written[0]))
    model = build_and_load(ckpt, generator_config_from_metadata(ckpt))
    src = np.asarray(Image.open(images / "lr" / "a.png"))
    with torch.no_grad():
        ref = model(torch.from_numpy(src.copy()).permute(2, 0, 1)[None].float() / 255).sr.clamp(0, 1)
    np.testing.assert_array_equal(sr, np.floor(ref[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
    report = evaluate_main(["--model", f"{name}={ckpt}", "--dataset", f"set={images / 'hr'}",
                            "--out", str(tmp_path / "eval"), "--no-progress", "--no-bicubic"])
    assert name in report.markdown


def test_the_issue_command_on_a_passthrough_spsr_export(runs, images, tmp_path):
    """`python launch/infer.py --input X --checkpoint .../generator_ema.safetensors`, as the issue ran it."""
    out = subprocess.run([sys.executable, "launch/infer.py", "--input", str(images / "lr" / "a.png"),
                          "--checkpoint", runs["spsr_passthrough"]["export"], "--out", str(tmp_path),
                          "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "a_SR.png").is_file()


if __name__ == "__main__":
    torch.set_num_threads(1)
    worker(Path(sys.argv[1]))
