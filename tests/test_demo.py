"""The README's main job, end to end at toy length (the full demo takes minutes; this is the plumbing).

Runs spsr_hpc.demo.run_demo with a handful of steps in one plain-python process per stage and
checks what a user opens afterwards: the report with its four methods and the LPIPS verdict, the
exported generators (loadable by load_pretrained), the labelled comparison image and the curves.
"""

import json

import pytest

pytestmark = [pytest.mark.slow]


def test_demo_end_to_end_at_toy_length(tmp_path):
    from PIL import Image

    from spsr_hpc.demo import TRUNK, resolve_precision, run_demo
    from spsr_hpc.labels import header_height
    from spsr_hpc.models import GeneratorConfig, build_generator, load_pretrained
    from spsr_hpc.train.logging import read_jsonl
    from spsr_hpc.weights import converted_path

    report = run_demo(tmp_path / "demo", nproc=1, psnr_steps=4, gan_steps=2, batch_size=2, val_points=2)
    text = report.read_text()
    assert "| Bicubic | PSNR stage | ESRGAN | SPSR-G |" in text
    assert "PSNR stage beats bicubic in PSNR" in text
    # the default, --precision auto: bf16 where this machine runs it natively (this CPU: yes), else fp32
    precision, note = resolve_precision("auto")
    flag = "true" if precision == "bf16" else "false"
    assert f"- Precision: {note}; training (train.bf16={flag}) and evaluation ran in {precision}" in text
    assert "Time per phase (s): photos" in text

    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert 20.0 < summary["bicubic_psnr"] < 40.0
    assert isinstance(summary["psnr_stage_psnr"], float)
    assert summary["psnr_stage_beats_bicubic"] == (summary["psnr_stage_psnr"] > summary["bicubic_psnr"])
    assert summary["precision"] == precision and summary["precision_requested"] == "auto"
    assert set(summary["stages"]) == {"psnr", "esrgan", "spsr_g"}
    # every stage drew a validation curve of val_points points, the last at its final step
    for stage, steps in (("psnr", 4), ("esrgan", 2), ("spsr_g", 2)):
        rows = read_jsonl(tmp_path / "demo" / stage / "metrics.jsonl")
        val_steps = [r["step"] for r in rows if "val/psnr" in r]
        assert val_steps == [steps // 2, steps], stage
        assert (tmp_path / "demo" / f"{stage}.log").stat().st_size > 0
    lp = {m: v["lpips"] for m, v in summary["methods"].items()}
    if converted_path("alexnet") is not None:  # after `python -m spsr_hpc.weights fetch`
        assert all(isinstance(v, float) and 0 < v < 1 for v in lp.values()), lp
        assert summary["lpips_order_held"] == (lp["SPSR-G"] < lp["PSNR stage"] < lp["Bicubic"])
        assert ("ordering (LPIPS: SPSR-G < PSNR stage < bicubic) **held**" in text) == summary[
            "lpips_order_held"
        ]
        assert summary["perceptual_backbone"] in ("vgg19", "vgg16")
        assert "VGG16, a substitute" in text or summary["perceptual_backbone"] == "vgg19"

    g = build_generator(GeneratorConfig(name="spsr", scale=4, taps=list(range(TRUNK["nb"])), **TRUNK))
    rep = load_pretrained(g, tmp_path / "demo" / "spsr_g" / "generator.safetensors")
    assert rep.matched == rep.total

    crops = Image.open(tmp_path / "demo" / "comparison.png")
    # One labelled row per held-out photo: five 128-px tiles (4 methods + HR) under a header of
    # three lines (method, LPIPS, PSNR).
    assert crops.width == 5 * 132 and crops.height == 2 * (132 + header_height(3))
    assert (tmp_path / "demo" / "loss_curves.png").stat().st_size > 0
