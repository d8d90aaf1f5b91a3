"""The evaluation job on two bundled photos with a tiny checkpoint: the Table-I report, the
bicubic row against an independent computation, LR folders, LPIPS fallback, dataset errors."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from spsr_hpc.data import imresize, modcrop, read_rgb, to_uint8
from spsr_hpc.evaluate import (
    BICUBIC,
    DatasetNotFoundError,
    _parse_model,
    evaluate,
    find_datasets,
    main,
)
from spsr_hpc.inference import export_generator
from spsr_hpc.metrics import LPIPSMetric, psnr, ssim
from spsr_hpc.models import GeneratorConfig, build_generator
from spsr_hpc.weights import MissingWeightsError

SCALE = 4
TINY = GeneratorConfig(name="spsr", nf=8, nb=2, gc=4, taps=[0, 1])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two bundled photos (scikit-image's chelsea and coffee, the demo's validation pair), cropped
    to keep the test fast: HR 98×113 and 85×102, not multiples of 4, so the mod-crop matters."""
    hr_dir = tmp_path_factory.mktemp("bundled") / "HR"
    hr_dir.mkdir()
    for name, (h, w) in [("chelsea", (98, 113)), ("coffee", (85, 102))]:
        Image.fromarray(getattr(skdata, name)()[:h, :w]).save(hr_dir / f"{name}.png")
    return hr_dir


@pytest.fixture(scope="module")
def random_lpips():
    return LPIPSMetric(random_backbone=True)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    return export_generator(build_generator(TINY), path)


def _bicubic_reference(hr_path):
    """Independent of the evaluator: GT mod-crop, LR = imresize(GT, 1/4) in uint8, bicubic
    back up, uint8."""
    hr, _ = read_rgb(hr_path)
    hr = modcrop(hr, SCALE)
    lr = to_uint8(imresize(hr.astype(np.float64) / 255, 1 / SCALE))
    up = to_uint8(imresize(lr.astype(np.float64) / 255, SCALE))
    return hr, lr, up


def test_report_with_bicubic_row(photos, tiny_ckpt, tmp_path):
    # random_lpips_backbone=True: the evaluator builds its own (seeded) random LPIPS.
    report = evaluate({"tiny": (TINY, tiny_ckpt)}, {"bundled": (photos, None)}, SCALE, tmp_path / "out",
                      random_lpips_backbone=True, save_images=True, progress=False)
    # The bicubic row against psnr()/ssim() of an independent imresize down/up.
    names = sorted(p.stem for p in photos.iterdir())
    ref_psnr, ref_ssim = [], []
    for name in names:
        hr, _, up = _bicubic_reference(photos / f"{name}.png")
        ref_psnr.append(psnr(up, hr, SCALE))
        ref_ssim.append(ssim(up, hr, SCALE))
        row = next(r for r in report.per_image if r["method"] == BICUBIC and r["image"] == name)
        assert row["psnr"] == pytest.approx(ref_psnr[-1], abs=1e-9)
        saved = np.asarray(Image.open(tmp_path / "out" / "images" / "bundled" / BICUBIC / f"{name}.png"))
        np.testing.assert_array_equal(saved, up)
    assert report.value("bundled", BICUBIC, "psnr") == pytest.approx(np.mean(ref_psnr), abs=1e-9)
    assert report.value("bundled", BICUBIC, "ssim") == pytest.approx(np.mean(ref_ssim), abs=1e-9)
    assert 20 < report.value("bundled", BICUBIC, "psnr") < 40

    # The tiny model's row: scores of its own SR images, written next to the report.
    for name in names:
        sr = np.asarray(Image.open(tmp_path / "out" / "images" / "bundled" / "tiny" / f"{name}.png"))
        hr, _, _ = _bicubic_reference(photos / f"{name}.png")
        row = next(r for r in report.per_image if r["method"] == "tiny" and r["image"] == name)
        assert row["psnr"] == pytest.approx(psnr(sr, hr, SCALE))
        assert isinstance(row["lpips"], float) and row["lpips"] > 0

    md = (tmp_path / "out" / "report.md").read_text()
    assert "| set | metric | Bicubic | tiny |" in md
    assert f"{report.value('bundled', BICUBIC, 'psnr'):.3f}" in md
    assert "RANDOM AlexNet" in md
    with open(tmp_path / "out" / "report.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["dataset"], r["method"], r["images"]) for r in rows] == [
        ("bundled", BICUBIC, "2"), ("bundled", "tiny", "2")]
    with open(tmp_path / "out" / "per_image.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4


def test_lr_folder_and_module_input_and_batching(photos, random_lpips, tmp_path):
    """Given LR files (DIV2K-style names) the evaluator uses them; an nn.Module works as a method;
    batching of equal-size images gives the same numbers."""
    lr_dir = tmp_path / "LR"
    lr_dir.mkdir()
    for p in photos.iterdir():
        _, lr, _ = _bicubic_reference(p)
        Image.fromarray(lr).save(lr_dir / f"{p.stem}x{SCALE}.png")
    torch.manual_seed(0)
    model = build_generator(TINY).train()
    gen = evaluate({"m": model}, {"s": (photos, None)}, SCALE, tmp_path / "a", lpips_metric=random_lpips,
                   progress=False)
    given = evaluate({"m": model}, {"s": (photos, lr_dir)}, SCALE, tmp_path / "b", lpips_metric=random_lpips,
                     batch_size=2, progress=False)
    assert "RANDOM AlexNet" in gen.markdown
    assert model.training  # the caller's mode is restored (the demo evaluates mid-training)
    for metric in ("psnr", "ssim", "lpips"):
        for method in (BICUBIC, "m"):
            assert given.value("s", method, metric) == pytest.approx(gen.value("s", method, metric), rel=1e-6)


def test_lpips_missing_weights(photos, tmp_path):
    missing = tmp_path / "alexnet-owt-7be5be79.pth"
    report = evaluate({}, {"s": (photos, None)}, SCALE, tmp_path / "out", lpips_weights=missing,
                      progress=False)
    assert report.value("s", BICUBIC, "lpips") is None
    assert all(r["lpips"] is None for r in report.per_image)
    assert f"AlexNet weights missing ({missing})" in report.markdown and "n/a /" in report.markdown
    # The CSVs keep the column numeric: an empty cell, and the reason in the note column.
    with open(report.files["csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(r["lpips"] == "" and "weights missing" in r["note"] for r in rows)
    assert all(float(r["psnr"]) > 0 for r in rows)
    with pytest.raises(MissingWeightsError, match="alexnet"):
        evaluate({}, {"s": (photos, None)}, SCALE, tmp_path / "out", lpips_weights=missing,
                 require_lpips=True, progress=False)


def test_dataset_errors(photos, tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        find_datasets(tmp_path / "datasets", None, SCALE)
    msg = str(err.value)
    assert str(tmp_path / "datasets" / "Set5" / "HR" / "baby.png") in msg and "LR_bicubic/X4" in msg
    assert "Urban100" in msg
    (tmp_path / "datasets" / "Set14" / "HR").mkdir(parents=True)
    (tmp_path / "datasets" / "Set14" / "LR_bicubic" / "X4").mkdir(parents=True)
    found = find_datasets(tmp_path / "datasets", None, SCALE)
    assert found == {"Set14": (tmp_path / "datasets" / "Set14" / "HR",
                               tmp_path / "datasets" / "Set14" / "LR_bicubic" / "X4")}
    with pytest.raises(DatasetNotFoundError, match="Set5"):
        find_datasets(tmp_path / "datasets", ["Set5", "Set14"], SCALE)
    # An LR folder that lacks an image's LR, and an LR of the wrong size.
    lr_dir = tmp_path / "LR"
    lr_dir.mkdir()
    with pytest.raises(ValueError, match="no LR image for"):
        evaluate({}, {"s": (photos, lr_dir)}, SCALE, tmp_path / "o", progress=False)
    for p in photos.iterdir():
        Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(lr_dir / p.name)
    with pytest.raises(ValueError, match="mod-cropped"):
        evaluate({}, {"s": (photos, lr_dir)}, SCALE, tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="reserved"):
        evaluate({BICUBIC: build_generator(TINY)}, {"s": (photos, None)}, SCALE, tmp_path / "o",
                 progress=False)
    with pytest.raises(ValueError, match="scale"):
        x2 = build_generator(GeneratorConfig(name="spsr", nf=8, nb=2, gc=4, taps=[0, 1], scale=2))
        evaluate({"x2": x2}, {"s": (photos, None)}, SCALE, tmp_path / "o", progress=False)


def test_cli(photos, tiny_ckpt, tmp_path, capsys):
    report = main(["--model", f"tiny={tiny_ckpt}", "--arch", "spsr", "--nf", "8", "--nb", "2", "--gc", "4",
                   "--taps", "0", "1", "--dataset", f"mine={photos}", "--out", str(tmp_path / "out"),
                   "--no-lpips", "--tile", "16", "--overlap", "8",
                   "--no-progress"])
    out = capsys.readouterr().out
    assert "| mine | LPIPS / PSNR / SSIM |" in out and "report.md" in out
    assert {r["method"] for r in report.summary} == {BICUBIC, "tiny"}
    with pytest.raises(SystemExit) as exit_info:
        main(["--data-root", str(tmp_path / "nothing"), "--out", str(tmp_path / "o2"), "--no-progress"])
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_match_one(photos, tmp_path):
    """torchrun with 2 gloo ranks shards the images and gathers the same report as one process."""
    args = ["launch/evaluate.py", "--dataset", f"mine={photos}", "--no-lpips", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    with socket.socket() as sock:  # a free port, so parallel test runs do not collide
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    port, *args, "--out", str(tmp_path / "two")], check=True, env=env, timeout=300,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True)
    one = evaluate({}, {"mine": (photos, None)}, SCALE, tmp_path / "one", lpips_weights=tmp_path / "none.pth",
                   progress=False)
    with open(tmp_path / "two" / "per_image.csv") as fh:
        two_rows = list(csv.DictReader(fh))
    assert [r["image"] for r in two_rows] == [r["image"] for r in one.per_image]
    for r2, r1 in zip(two_rows, one.per_image):
        assert float(r2["psnr"]) == pytest.approx(r1["psnr"], abs=1e-5)
        assert float(r2["ssim"]) == pytest.approx(r1["ssim"], abs=1e-5)


def test_mixed_architectures_and_model_specs(photos, random_lpips, tmp_path):
    """An RRDB (ESRGAN-style) checkpoint evaluates next to SPSR with its own architecture, and is
    refused when given to the SPSR architecture (it would leave the branch random)."""
    rrdb_cfg = GeneratorConfig(name="rrdbnet", nf=8, nb=2, gc=4)  # same trunk as TINY
    torch.manual_seed(0)
    path = export_generator(build_generator(rrdb_cfg), tmp_path / "rrdb.safetensors")
    report = evaluate({"RRDB": (rrdb_cfg, path)}, {"s": (photos, None)}, SCALE, tmp_path / "o",
                      lpips_metric=random_lpips, bicubic=False, progress=False)
    assert [r["method"] for r in report.summary] == ["RRDB"]
    with pytest.raises(ValueError, match="rrdbnet"):
        evaluate({"RRDB": path}, {"s": (photos, None)}, SCALE, tmp_path / "o", arch=TINY, progress=False)
    assert _parse_model("ESRGAN:rrdbnet=a/b=c.pth") == ("ESRGAN", "rrdbnet", "a/b=c.pth")
    assert _parse_model("SPSR=x.pth") == ("SPSR", None, "x.pth")
    with pytest.raises(ValueError, match="NAME=PATH"):
        _parse_model("x.pth")


def test_cli_out_file_device_and_tiling_are_one_error_line(photos, tiny_ckpt, tmp_path, capsys):
    """--out naming a file failed with FileExistsError after every model had run; --device gpu and
    --tile 8 --overlap 16 were tracebacks. Now each is one error line, status 2, before any work."""
    base = ["--model", f"tiny={tiny_ckpt}", "--arch", "spsr", "--nf", "8", "--nb", "2", "--gc", "4",
            "--taps", "0", "1", "--dataset", f"mine={photos}", "--no-lpips",
            "--no-progress"]  # fmt: skip
    (tmp_path / "afile").write_text("x")
    for flags, named in ((["--out", str(tmp_path / "afile")], "is a file"),
                         (["--out", str(tmp_path / "o"), "--device", "gpu"], "is not a device"),
                         (["--out", str(tmp_path / "o"), "--tile", "8", "--overlap", "16"], "overlap")):
        with pytest.raises(SystemExit) as exit_info:
            main([*base, *flags])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert exit_info.value.code == 2 and len(err) == 1 and named in err[0], (flags, err)
    assert not (tmp_path / "o").exists()
