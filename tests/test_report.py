"""Run-folder figures (launch/report.py): labelled columns, loss/validation curves, comparisons."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from spsr_hpc.evaluate import BICUBIC, evaluate
from spsr_hpc.metrics import LPIPSMetric
from spsr_hpc.report import HEADER_PX, label_columns, main, report_figures, tile_row


def test_label_columns_draws_each_label_in_its_column():
    img = np.full((20, 90, 3), 128, np.uint8)
    out = label_columns(img, ["a", "", "ccc"], widths=[30, 30, 30])
    assert out.shape == (20 + HEADER_PX, 90, 3)
    np.testing.assert_array_equal(out[HEADER_PX:], img)
    head = out[:HEADER_PX].min(axis=2)
    ink = [bool((head[:, i * 30 : (i + 1) * 30] < 128).any()) for i in range(3)]
    assert ink == [True, False, True]  # text where there is a label, white where there is none
    with pytest.raises(ValueError, match="2 labels for columns of widths"):
        label_columns(img, ["a", "b"], widths=[60, 60])
    with pytest.raises(ValueError, match="uint8"):
        label_columns(img.astype(np.float32), ["a"])
    row, widths = tile_row([np.zeros((8, 8, 3), np.uint8), np.zeros((6, 10, 3), np.uint8)], pad=2)
    assert row.shape == (12, 26, 3) and widths == [12, 14]


@pytest.fixture
def run_and_eval(tmp_path):
    run = tmp_path / "runs" / "spsr_g"
    run.mkdir(parents=True)
    rows = [{"step": s, "loss/g_total": 1.0 / s, "loss/d_real": -0.3} for s in range(1, 31)]
    rows += [
        {"step": 10, "val/psnr": 25.0, "val/lpips": 0.3},
        {"step": 30, "val/psnr": 25.5, "val/lpips": 0.25},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    hr = tmp_path / "HR"
    hr.mkdir()
    Image.fromarray(skdata.chelsea()[:96, :136]).save(hr / "chelsea.png")
    evaluate(
        {},
        {"tiny": (str(hr), None)},
        4,
        tmp_path / "runs" / "eval",
        save_images=True,
        progress=False,
        lpips_metric=LPIPSMetric(random_backbone=True),
    )
    return tmp_path / "runs", hr


def test_report_figures_for_a_folder_of_runs(run_and_eval, tmp_path):
    root, hr = run_and_eval
    paths = report_figures([root], tmp_path / "figs", hr_dirs={"tiny": hr})
    assert [p.name for p in paths] == ["loss_curves.png", "comparison.png"]
    curves = Image.open(paths[0])
    assert curves.height > curves.width / 2  # a second row of panels for the validation curves
    comp = np.asarray(Image.open(paths[1]).convert("RGB"))
    # one row: the bicubic SR crop and HR (96×128 crops, 2-px borders) under a header strip
    assert comp.shape == (HEADER_PX + 96 + 4, 2 * (128 + 4), 3)
    sr = np.asarray(Image.open(root / "eval" / "images" / "tiny" / BICUBIC / "chelsea.png").convert("RGB"))
    np.testing.assert_array_equal(comp[HEADER_PX + 2 : HEADER_PX + 98, 2:130], sr[:96, 4:132])
    np.testing.assert_array_equal(comp[HEADER_PX + 2 : HEADER_PX + 98, 134:262], skdata.chelsea()[:96, 4:132])


def test_report_cli(run_and_eval, tmp_path, capsys):
    root, _ = run_and_eval
    assert main([str(root / "spsr_g"), "--out", str(tmp_path / "one")]) == 0
    assert (tmp_path / "one" / "loss_curves.png").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert "no run found" in capsys.readouterr().err
