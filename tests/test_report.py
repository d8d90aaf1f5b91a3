"""Run-folder figures (launch/report.py): labelled columns, loss/validation curves, comparisons."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from spsr_hpc.evaluate import BICUBIC, evaluate
from spsr_hpc.labels import LINE_PX, MARGIN_PX, header_height, label_font, label_layout, wrap_label
from spsr_hpc.metrics import LPIPSMetric
from spsr_hpc.report import HEADER_PX, label_columns, main, report_figures, tile_row, validation_panel


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
    # one row: the bicubic SR crop and HR (96×128 crops, 2-px borders) under a header strip of
    # three lines (method, LPIPS, PSNR)
    head = header_height(3)
    assert comp.shape == (head + 96 + 4, 2 * (128 + 4), 3)
    sr = np.asarray(Image.open(root / "eval" / "images" / "tiny" / BICUBIC / "chelsea.png").convert("RGB"))
    np.testing.assert_array_equal(comp[head + 2 : head + 98, 2:130], sr[:96, 4:132])
    np.testing.assert_array_equal(comp[head + 2 : head + 98, 134:262], skdata.chelsea()[:96, 4:132])
    # every line of ink in the header lies inside its column (none runs into the next one)
    ink = comp[:head].min(axis=2) < 128
    assert ink[:, :132].any() and ink[:, 132:].any()
    for edge in (0, 132, 264):
        assert not ink[:, max(0, edge - MARGIN_PX) : edge + MARGIN_PX].any()
    # the third line (PSNR) has ink: the label was not cut to one line
    assert ink[2 + 2 * LINE_PX : head, :132].any()


def test_report_cli(run_and_eval, tmp_path, capsys):
    root, _ = run_and_eval
    assert main([str(root / "spsr_g"), "--out", str(tmp_path / "one")]) == 0
    assert (tmp_path / "one" / "loss_curves.png").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert "no run found" in capsys.readouterr().err


# The labels the demo's comparison draws in its 132-px columns (128-px crops, 2-px borders), and
# the one that was cut before ("PSNR stage 0.323/31....").
LABELS = ["PSNR stage\nLPIPS 0.3234\nPSNR 31.20 dB", "PSNR stage 0.323/31.20",
          "SPSR-G\nLPIPS n/a\nPSNR 9.99 dB", "HR\nbaboon_with_a_very_long_file_name", ""]


@pytest.mark.parametrize("width", [132, 64, 40])
def test_labels_are_drawn_in_full_within_their_column(width):
    font = label_font()
    layout = label_layout(LABELS, [width] * len(LABELS))
    for text, lines in zip(LABELS, layout):
        for line in lines:
            assert font.getlength(line) <= width - 2 * MARGIN_PX, (line, width)
        # nothing cut: the lines hold every character of the label, in order
        assert "".join(lines).replace(" ", "") == text.replace("\n", "").replace(" ", "")
        assert "…" not in "".join(lines)
    if width == 132:  # the demo's columns: each of the three parts on its own line, unbroken
        assert layout[0] == ["PSNR stage", "LPIPS 0.3234", "PSNR 31.20 dB"]
        assert layout[1] == ["PSNR stage 0.323/", "31.20"]  # greedy: as much as fits per line
    img = np.full((10, width * len(LABELS), 3), 200, np.uint8)
    out = label_columns(img, LABELS, [width] * len(LABELS))
    assert out.shape[0] == 10 + header_height(max(len(ls) for ls in layout))
    ink = out[: out.shape[0] - 10].min(axis=2) < 128
    for i in range(len(LABELS)):  # no ink in the margins between columns
        assert not ink[:, i * width : i * width + MARGIN_PX].any()
        assert not ink[:, (i + 1) * width - MARGIN_PX : (i + 1) * width].any()
    assert not ink[:, 4 * width :].any()  # the empty label stays white


def test_wrap_label_breaks_at_spaces_then_slashes_then_characters():
    font = label_font()
    assert wrap_label("a b", 1000, font) == ["a b"]
    assert wrap_label("a\nb", 1000, font) == ["a", "b"]
    w = font.getlength("0.323/")
    assert wrap_label("0.323/31.20", w, font) == ["0.323/", "31.20"]
    assert wrap_label("abcdef", font.getlength("abc"), font) == ["abc", "def"]


def test_validation_panel_draws_each_metric_in_its_own_colour_with_a_legend_entry():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spsr_hpc.demo import val_every

    steps, points = 300, 10
    every = val_every(steps, points)
    rows = [{"step": s, "loss/g_total": 1.0} for s in range(10, steps + 1, 10)]
    # LPIPS and PSNR that move in lockstep: on twin axes with shared limits their lines would coincide
    rows += [{"step": s, "val/lpips": 0.5 - s / 1000, "val/psnr": 25 + s / 100}
             for s in range(every, steps + 1, every)]
    fig, ax = plt.subplots()
    lines = validation_panel(ax, rows, "stage: validation")
    assert [len(ln.get_xdata()) for ln in lines] == [points, points]  # the schedule's points, drawn
    colours = [matplotlib.colors.to_hex(ln.get_color()) for ln in lines]
    assert colours[0] != colours[1]
    assert lines[0].get_marker() != lines[1].get_marker()
    assert lines[0].get_linestyle() != lines[1].get_linestyle()
    legend = next(a.get_legend() for a in fig.axes if a.get_legend() is not None)
    labels = [t.get_text() for t in legend.get_texts()]
    assert len(labels) == 2 and labels[0].startswith("LPIPS") and labels[1].startswith("PSNR")
    assert [matplotlib.colors.to_hex(h.get_color()) for h in legend.legend_handles] == colours
    twin = [a for a in fig.axes if a is not ax]
    assert len(twin) == 1 and lines[1].axes is twin[0] and lines[0].axes is ax
    assert matplotlib.colors.to_hex(ax.yaxis.label.get_color()) == colours[0]
    assert matplotlib.colors.to_hex(twin[0].yaxis.label.get_color()) == colours[1]
    plt.close(fig)
    # PSNR alone (no LPIPS weights): on the main axis, no empty twin
    fig, ax = plt.subplots()
    only = validation_panel(ax, [{"step": 1, "val/psnr": 20.0}, {"step": 2, "val/psnr": 21.0}], "t")
    assert len(only) == 1 and only[0].axes is ax and len(fig.axes) == 1
    plt.close(fig)
