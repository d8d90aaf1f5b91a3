"""The README's main job, end to end at toy length (the full demo is ~7 min; this is the plumbing).

Runs spsr_hpc.demo.run_demo with a handful of steps in one plain-python process per stage and
checks what a user opens afterwards: the report with its three methods, the exported generators
(loadable by load_pretrained), the comparison image and the loss curves.
"""

import json

import pytest

pytestmark = [pytest.mark.slow]


def test_demo_end_to_end_at_toy_length(tmp_path):
    from PIL import Image

    from spsr_hpc.demo import TRUNK, run_demo
    from spsr_hpc.models import GeneratorConfig, build_generator, load_pretrained

    report = run_demo(tmp_path / "demo", nproc=1, psnr_steps=4, gan_steps=2, batch_size=2)
    text = report.read_text()
    assert "| Bicubic | PSNR stage | SPSR-G |" in text
    assert "PSNR stage beats bicubic on the held-out photos" in text

    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert 20.0 < summary["bicubic_psnr"] < 40.0
    assert isinstance(summary["psnr_stage_psnr"], float)
    assert summary["psnr_stage_beats_bicubic"] == (summary["psnr_stage_psnr"] > summary["bicubic_psnr"])

    g = build_generator(GeneratorConfig(name="spsr", scale=4, taps=list(range(TRUNK["nb"])), **TRUNK))
    rep = load_pretrained(g, tmp_path / "demo" / "spsr_g" / "generator.safetensors")
    assert rep.matched == rep.total

    crops = Image.open(tmp_path / "demo" / "comparison.png")
    assert crops.width > crops.height  # one row per held-out photo, four tiles per row
    assert (tmp_path / "demo" / "loss_curves.png").stat().st_size > 0
