"""Full disks and wrong paths in the command-line tools other than training (evaluate, infer,
make_shards, report, demo, the benchmarks).

A failed write (a real full tmpfs where mounting is allowed, an injected ENOSPC everywhere) is
one ``error:`` line naming the path, the OS reason, what is kept and the fix, exit status 4; no
``.tmp`` file is left and no complete earlier output is replaced by a partial one. A wrong path
or flag is one ``error:`` line with exit status 2, before any work.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from spsr_hpc import files
from spsr_hpc.data import BadImageError
from spsr_hpc.data.images import decode_rgb
from spsr_hpc.files import OutputWriteError, atomic_output, check_output_file, describe_write_error
from spsr_hpc.inference import export_generator
from spsr_hpc.inference import main as infer_main
from spsr_hpc.models import GeneratorConfig, build_generator

TINY = GeneratorConfig(name="spsr", nf=8, nb=2, gc=4, taps=[0, 1])
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
REPO = Path(__file__).resolve().parents[1]


def _errors(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if "error:" in ln]


def _tmp_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    meta = {"arch": "spsr", "generator": json.dumps({"name": "spsr", "nf": 8, "nb": 2, "gc": 4,
                                                     "taps": [0, 1], "scale": 4})}
    return export_generator(build_generator(TINY), tmp_path_factory.mktemp("ckpt") / "tiny.safetensors",
                            metadata=meta)


def _noise_images(folder: Path, n: int, side: int) -> list[Path]:
    """Random pixels: PNG cannot compress them, so file sizes are predictable (~3 bytes/pixel)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(folder / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def _fail_opening(monkeypatch, suffix: str, err: int) -> None:
    """spsr_hpc.files' open() of a file ending in ``suffix`` fails with ``err`` (a full disk, a quota)."""
    real_open = open

    def failing_open(path, *args, **kwargs):
        if str(path).endswith(suffix):
            raise OSError(err, os.strerror(err), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(files, "open", failing_open, raising=False)


# --- the shared writer --------------------------------------------------------------------------


def test_atomic_output_keeps_the_old_file_and_removes_the_tmp(tmp_path):
    dest = tmp_path / "out.txt"
    dest.write_text("old")
    with pytest.raises(OutputWriteError) as e, atomic_output(dest, "The rest is complete") as tmp:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    msg = str(e.value)
    assert str(dest) in msg and "[Errno 28] No space left on device (ENOSPC)" in msg, msg
    assert "The rest is complete" in msg and "Free space there" in msg, msg
    assert e.value.exit_code == 4
    assert dest.read_text() == "old" and not _tmp_files(tmp_path)
    # Not a write error: passes through unchanged, the .tmp still goes.
    with pytest.raises(KeyError), atomic_output(dest) as tmp:
        tmp.write_text("x")
        raise KeyError("k")
    assert dest.read_text() == "old" and not _tmp_files(tmp_path)
    with atomic_output(dest) as tmp:
        tmp.write_text("new")
    assert dest.read_text() == "new" and not _tmp_files(tmp_path)


def test_write_all_or_none_replaces_every_file_or_none(tmp_path, monkeypatch):
    """A report is never paired with another run's CSV: the second file's failure keeps all three
    old files (the first one's new content was complete, and is not used)."""
    paths = [tmp_path / n for n in ("a.csv", "b.csv", "report.md")]
    for p in paths:
        p.write_text(f"old {p.name}")
    _fail_opening(monkeypatch, "b.csv.tmp", errno.EDQUOT)
    with pytest.raises(OutputWriteError, match=r"b\.csv: \[Errno 122\] Disk quota exceeded \(EDQUOT\)"):
        files.write_all_or_none([(p, "new") for p in paths])
    assert [p.read_text() for p in paths] == [f"old {p.name}" for p in paths]
    assert not _tmp_files(tmp_path)
    monkeypatch.undo()
    files.write_all_or_none([(p, "new") for p in paths])
    assert [p.read_text() for p in paths] == ["new"] * 3


def test_describe_write_error_reads_the_writers_messages():
    """safetensors (Rust) and torch.save wrap the OS error in their own exception types."""
    rust = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    assert describe_write_error(rust) == "[Errno 28] No space left on device (ENOSPC)"
    assert files.is_write_error(rust)
    torch_zip = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert "not written in full" in describe_write_error(torch_zip) and files.is_write_error(torch_zip)
    assert not files.is_write_error(ValueError("a bad value"))
    reason = describe_write_error(OSError(errno.EACCES, os.strerror(errno.EACCES)))
    assert "Make the folder writable" in str(OutputWriteError("/x", reason))


def test_messages_name_the_real_file_and_a_fix_that_fits_the_reason():
    from spsr_hpc.train.faults import ExportWriteError, LogWriteError

    rofs = describe_write_error(OSError(errno.EROFS, os.strerror(errno.EROFS), "/data/a.png.tmp"))
    assert rofs == "[Errno 30] Read-only file system (EROFS)"  # not the .tmp the writer had open
    assert "Make the folder writable, or write to another folder" in str(OutputWriteError("/d/a.png", rofs))
    log_error = str(LogWriteError(f"m: {rofs}", 3, None))
    assert "Make the folder writable, or set logging.run_dir elsewhere" in log_error, log_error
    assert "Nothing was trained in this run" in log_error, log_error
    full = describe_write_error(ENOSPC)
    msg = str(ExportWriteError("generator export", OutputWriteError("/r/g.safetensors", full), "/ck/step_3"))
    assert "/r/g.safetensors: [Errno 28]" in msg and "Newest intact checkpoint: /ck/step_3" in msg, msg
    assert "Free space there (or raise the quota), then re-run" in msg, msg
    other = describe_write_error(OSError(errno.EEXIST, os.strerror(errno.EEXIST)))
    assert "Write to another folder, then re-run" in str(OutputWriteError("/x", other))


def test_check_output_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"--onnx .* is a folder: name a file, e.g. --onnx .*g\.onnx"):
        check_output_file(tmp_path, "--onnx", "g.onnx")
    with pytest.raises(ValueError, match="afile is a file, not a folder"):
        check_output_file(tmp_path / "afile" / "g.onnx", "--onnx", "g.onnx")
    check_output_file(tmp_path / "new" / "g.onnx", "--onnx", "g.onnx")  # created later: fine


# --- evaluate -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    hr = tmp_path_factory.mktemp("eval") / "HR"
    hr.mkdir()
    for name, (h, w) in [("chelsea", (64, 72)), ("coffee", (60, 68))]:
        Image.fromarray(getattr(skdata, name)()[:h, :w]).save(hr / f"{name}.png")
    return hr


def test_evaluate_report_write_failure_prints_the_report_and_keeps_the_old_one(
    photos, tiny_ckpt, tmp_path, monkeypatch, capsys
):
    """Before: report.md was written first, so ENOSPC on a CSV left a complete-looking report.md
    beside the previous run's CSVs, and the run ended in a traceback that lost the scores."""
    from spsr_hpc.evaluate import main

    out = tmp_path / "eval"
    args = ["--model", f"tiny={tiny_ckpt}", "--dataset", f"mine={photos}", "--out", str(out),
            "--no-lpips", "--no-progress"]
    main([*args, "--no-bicubic"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"report.md", "report.csv", "per_image.csv"}
    capsys.readouterr()
    _fail_opening(monkeypatch, "per_image.csv.tmp", errno.ENOSPC)
    with pytest.raises(SystemExit) as e:
        main(args)  # with the bicubic row this time: another report
    cap = capsys.readouterr()
    assert e.value.code == 4
    errors = _errors(cap.err)
    assert len(errors) == 1 and "per_image.csv" in errors[0] and "ENOSPC" in errors[0], cap.err
    assert "The report is printed above" in errors[0], errors[0]
    assert "| mine | LPIPS / PSNR / SSIM |" in cap.out and "| Bicubic | tiny |" in cap.out  # not lost
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing replaced, no .tmp


def test_evaluate_saved_image_on_a_full_disk(photos, tiny_ckpt, tmp_path, small_tmpfs, capsys):
    from spsr_hpc.evaluate import main

    # Two pages: bicubic's and the tiny model's chelsea SR (each < 4 KiB) fit, coffee's do not.
    mnt = small_tmpfs("8k")
    with pytest.raises(SystemExit) as e:
        main(["--model", f"tiny={tiny_ckpt}", "--dataset", f"mine={photos}", "--out", str(mnt),
              "--no-lpips", "--no-progress", "--save-images"])
    errors = _errors(capsys.readouterr().err)
    assert e.value.code == 4 and len(errors) == 1, errors
    assert "No space left on device (ENOSPC)" in errors[0] and "no report was written" in errors[0], errors
    assert not _tmp_files(mnt) and not (mnt / "report.md").exists()
    for png in mnt.rglob("*.png"):  # what is there is whole
        with Image.open(png) as im:
            im.load()


# --- infer --------------------------------------------------------------------------------------


def test_infer_on_a_full_disk_names_the_file_and_keeps_the_finished_images(tiny_ckpt, tmp_path,
                                                                           small_tmpfs, capsys):
    """Before: a traceback (OSError from Pillow) and a truncated img1_SR.png.tmp left behind."""
    _noise_images(tmp_path / "in", 3, 24)
    mnt = small_tmpfs("4k")  # one page: the first SR image (a random-weight model's, ~100 bytes) fits
    with pytest.raises(SystemExit) as e:
        infer_main(["--input", str(tmp_path / "in"), "--checkpoint", str(tiny_ckpt), "--out", str(mnt),
                    "--no-progress", "--tile", "0"])
    errors = _errors(capsys.readouterr().err)
    assert e.value.code == 4 and len(errors) == 1, errors
    assert "No space left on device (ENOSPC)" in errors[0], errors[0]
    done = sorted(p.name for p in mnt.glob("*_SR.png"))
    assert done and len(done) < 3, done
    assert f"{len(done)} of 3 SR images are complete in {mnt}" in errors[0], errors[0]
    assert f"img{len(done)}_SR.png" in errors[0] and not _tmp_files(mnt)
    for name in done:
        with Image.open(mnt / name) as im:
            assert im.size == (96, 96)


def test_infer_export_paths_are_checked_before_the_model_is_built(tiny_ckpt, tmp_path, capsys):
    """Before: --export-safetensors <a folder> was IsADirectoryError after loading the model,
    with a .tmp file left in that folder."""
    folder = tmp_path / "exports"
    folder.mkdir()
    for flag in ("--export-safetensors", "--onnx"):
        with pytest.raises(SystemExit) as e:
            infer_main(["--checkpoint", str(tiny_ckpt), flag, str(folder)])
        errors = _errors(capsys.readouterr().err)
        assert e.value.code == 2 and len(errors) == 1 and f"{flag} {folder} is a folder" in errors[0], errors
    assert not list(folder.iterdir())


def test_infer_save_grad_without_a_gradient_branch_writes_nothing(tmp_path, capsys):
    """Before: the error came after the first image's SR had been written."""
    ckpt = export_generator(build_generator(GeneratorConfig(name="rrdbnet", nf=8, nb=1, gc=4)),
                            tmp_path / "rrdb.safetensors")
    _noise_images(tmp_path / "in", 2, 8)
    with pytest.raises(SystemExit) as e:
        infer_main(["--input", str(tmp_path / "in"), "--checkpoint", str(ckpt), "--arch", "rrdbnet",
                    "--nf", "8", "--nb", "1", "--gc", "4", "--out", str(tmp_path / "out"), "--save-grad"])
    errors = _errors(capsys.readouterr().err)
    assert e.value.code == 2 and len(errors) == 1 and "no gradient branch" in errors[0], errors
    assert not (tmp_path / "out").exists()


def test_infer_checkpoint_folder_and_scale_are_named(tiny_ckpt, tmp_path, capsys):
    """Before: a training checkpoint folder was "does not exist", and a --scale 3 for an x4
    checkpoint got a hint that left --scale out (following it failed the same way)."""
    step = tmp_path / "run" / "checkpoints" / "step_0000010"
    step.mkdir(parents=True)
    (step / "meta.json").write_text("{}")
    _noise_images(tmp_path / "in", 1, 8)
    with pytest.raises(SystemExit) as e:
        infer_main(["--input", str(tmp_path / "in"), "--checkpoint", str(step)])
    errors = _errors(capsys.readouterr().err)
    assert e.value.code == 2 and "is a training checkpoint folder" in errors[0], errors
    assert "generator.safetensors" in errors[0], errors
    with pytest.raises(SystemExit) as e:
        infer_main(["--input", str(tmp_path / "in"), "--checkpoint", str(tiny_ckpt), "--scale", "3",
                    "--out", str(tmp_path / "out")])
    errors = _errors(capsys.readouterr().err)
    assert e.value.code == 2 and "imply spsr x4" in errors[0] and "--scale 4" in errors[0], errors


def test_undecodable_image_is_named_without_a_buffer_repr():
    with pytest.raises(BadImageError) as e:
        decode_rgb(b"GIF89a\x00garbage", "set/a.png")
    msg = str(e.value)
    assert msg.startswith("set/a.png: cannot decode image") and "BytesIO" not in msg, msg
    assert "first bytes b'GIF89a\\x00g'" in msg and "replace or remove the file" in msg, msg
    with pytest.raises(BadImageError, match=r"set/b\.png: cannot decode image: an empty file"):
        decode_rgb(b"", "set/b.png")


# --- make_shards --------------------------------------------------------------------------------


def _make_shards(*args: str) -> int:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "launch" / "make_shards.py"
    spec = importlib.util.spec_from_file_location("make_shards_cli", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(list(args))


def test_make_shards_on_a_full_disk(tmp_path, small_tmpfs, capsys):
    """Before: a traceback from tarfile; the unfinished shard's .tmp stayed."""
    _noise_images(tmp_path / "hr", 4, 64)  # ~12 KB per sample, one shard each
    mnt = small_tmpfs("32k")
    code = _make_shards("--hr", str(tmp_path / "hr"), "--out", str(mnt), "--shard-size-mb", "0.01",
                        "--workers", "0", "--no-progress")
    errors = _errors(capsys.readouterr().err)
    assert code == 4 and len(errors) == 1, errors
    assert "No space left on device (ENOSPC)" in errors[0] and "the run is unfinished" in errors[0], errors
    assert not _tmp_files(mnt) and not (mnt / "manifest.json").exists()


def test_make_shards_out_naming_a_file(tmp_path, capsys):
    _noise_images(tmp_path / "hr", 1, 16)
    (tmp_path / "afile").write_text("x")
    code = _make_shards("--hr", str(tmp_path / "hr"), "--out", str(tmp_path / "afile"), "--workers", "0",
                        "--no-progress")
    errors = _errors(capsys.readouterr().err)
    assert code == 2 and len(errors) == 1 and "--out" in errors[0] and "is a file" in errors[0], errors
    assert (tmp_path / "afile").read_text() == "x"


# --- report, demo, benchmarks -------------------------------------------------------------------


def _run_dir(root: Path, lines: list[str]) -> Path:
    run = root / "run"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(lines))
    return run


def test_report_reads_a_torn_last_line_and_names_a_damaged_one(tmp_path, capsys, caplog):
    """A run killed mid-write leaves a torn last line: the curves are drawn without it. Before,
    both cases were "Expecting ',' delimiter: line 1 column 12" without the file."""
    from spsr_hpc.report import main

    good = [json.dumps({"step": s, "loss/g_total": 1.0 / s}) + "\n" for s in range(1, 6)]
    run = _run_dir(tmp_path / "a", [*good, '{"step": 6, "loss/g'])
    assert main([str(run)]) == 0
    assert (run / "loss_curves.png").is_file() and not _tmp_files(run)
    assert "metrics.jsonl: left out its last line, cut short" in caplog.text
    run = _run_dir(tmp_path / "b", [good[0], '{"step": 2, "lo\n', *good[2:]])
    assert main([str(run)]) == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and f"{run / 'metrics.jsonl'} line 2 is not JSON" in errors[0], errors


def test_report_says_what_it_cannot_draw(tmp_path, capsys):
    """Before: an evaluation folder without images/ exited 0 having drawn nothing, and an --hr
    naming a missing folder (or an unknown dataset) was ignored."""
    from spsr_hpc.evaluate import evaluate
    from spsr_hpc.metrics import LPIPSMetric
    from spsr_hpc.report import main

    hr = tmp_path / "HR"
    hr.mkdir()
    Image.fromarray(skdata.chelsea()[:48, :48]).save(hr / "chelsea.png")
    metric = LPIPSMetric(random_backbone=True)
    evaluate({}, {"tiny": (str(hr), None)}, 4, tmp_path / "noimg", progress=False, lpips_metric=metric)
    assert main([str(tmp_path / "noimg")]) == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and "nothing to draw" in errors[0] and "--save-images" in errors[0], errors

    evaluate({}, {"tiny": (str(hr), None)}, 4, tmp_path / "ev", save_images=True, progress=False,
             lpips_metric=metric)
    for hr_arg, named in ((f"tiny={tmp_path / 'missing'}", "is not a folder"),
                          (f"Set5={hr}", "no evaluated dataset is called 'Set5'")):
        assert main([str(tmp_path / "ev"), "--hr", hr_arg]) == 2
        errors = _errors(capsys.readouterr().err)
        assert len(errors) == 1 and named in errors[0], errors
    (tmp_path / "afile").write_text("x")
    assert main([str(tmp_path / "ev"), "--out", str(tmp_path / "afile")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main([str(tmp_path / "ev"), "--hr", f"tiny={hr}"]) == 0
    assert (tmp_path / "ev" / "comparison.png").is_file()


def test_demo_out_naming_a_file(tmp_path, capsys):
    from spsr_hpc.demo import main

    (tmp_path / "afile").write_text("x")
    assert main(["--out", str(tmp_path / "afile"), "--precision", "fp32"]) == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and "--out" in errors[0] and "is a file" in errors[0], errors


@pytest.mark.parametrize(("module", "argv", "named"), [
    ("spsr_hpc.bench.train", ["--procs", "0"], "--procs: 0: must be at least 1"),
    ("spsr_hpc.bench.train", ["--config", "nope.yaml"], "--config nope.yaml: no such file"),
    ("spsr_hpc.bench.info_nce", ["--device", "gpu"], "'gpu' is not a device"),
    ("spsr_hpc.bench.loaders", ["--work-dir", __file__], "is a file, not a folder"),
    ("spsr_hpc.bench.loaders", ["--batch-size", "0"], "--batch-size 0: must be at least 1"),
])  # fmt: skip
def test_benchmark_arguments_are_one_error_line(module, argv, named, capsys):
    """Each was a traceback, some after minutes of set-up."""
    import importlib

    mod = importlib.import_module(module)
    entry = getattr(mod, "main", None)
    with pytest.raises(SystemExit) as e:
        mod.parse_args(argv) if module.endswith("info_nce") else entry(argv)
    errors = _errors(capsys.readouterr().err)
    assert e.value.code == 2 and len(errors) == 1 and named in errors[0], errors


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_benchmark_cuda_without_a_gpu(capsys):
    from spsr_hpc.bench.gradient_map import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--device", "cuda"])
    assert e.value.code == 2 and "no CUDA device is visible here; use cpu" in capsys.readouterr().err


# --- second audit: evaluate_nse, symlinks, repeated names, damaged weights, configs, scripts ------


@pytest.fixture
def nse_file(tmp_path):
    from spsr_hpc.models import NSEConfig, build_nse
    from spsr_hpc.nse.export import save_nse

    cfg = NSEConfig(width=16, out_dim=8)
    return save_nse(build_nse(cfg), cfg, tmp_path / "nse_run" / "nse.safetensors")


def test_evaluate_nse_refuses_bad_paths_devices_and_labels_before_any_work(nse_file, tmp_path, capsys):
    """Before: --out under a file was NotADirectoryError after the whole evaluation; --device cuda
    (no GPU) a RuntimeError; a damaged --nse a SafetensorError; --nse random-init=PATH replaced the
    trained NSE's row with the baseline's, exit 0."""
    from spsr_hpc.nse.evaluate import main

    _noise_images(tmp_path / "held", 1, 64)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "fake.safetensors").write_text("not a safetensors file")
    base = ["--train-shards", str(tmp_path / "no_shards"), "--heldout", str(tmp_path / "held"),
            "--patch", "32", "--num-negatives", "8"]
    cases = [
        (["--nse", str(nse_file), "--out", str(tmp_path / "afile" / "sub")], "afile is a file, not a folder"),
        (["--nse", str(nse_file), "--device", "cuda:0" if not torch.cuda.is_available() else "gpu"],
         "no CUDA device is visible" if not torch.cuda.is_available() else "is not a device"),
        (["--nse", str(tmp_path / "fake.safetensors")], "is not a readable safetensors file"),
        (["--nse", str(nse_file.parent)], "is a folder: pass its nse.safetensors"),
        (["--nse", f"random-init={nse_file}"], "the label 'random-init' is the random-init baseline's row"),
    ]  # fmt: skip
    for argv, named in cases:
        assert main([*argv, *base]) == 2, argv
        errors = _errors(capsys.readouterr().err)
        assert len(errors) == 1 and named in errors[0], (argv, errors)


def test_evaluate_nse_report_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """Before: report.json and report.md were overwritten and report.csv left empty on ENOSPC."""
    from spsr_hpc.nse import evaluate as nse_eval

    report = {"settings": {}, "nses": {}}
    monkeypatch.setattr(nse_eval, "format_markdown", lambda r: "| new |")
    monkeypatch.setattr(nse_eval, "format_csv", lambda r: "new\n")
    out = tmp_path / "o"
    out.mkdir()
    for name in ("report.json", "report.md", "report.csv"):
        (out / name).write_text("old")
    _fail_opening(monkeypatch, "report.csv.tmp", errno.ENOSPC)
    with pytest.raises(OutputWriteError, match=r"report\.csv: \[Errno 28\].*The report is printed above"):
        nse_eval.write_report(report, out)
    assert {p.name: p.read_text() for p in out.iterdir()} == dict.fromkeys(
        ("report.json", "report.md", "report.csv"), "old")


def test_a_broken_link_among_the_images_is_named_not_skipped(photos, tmp_path, capsys):
    """Before: list_images kept only p.is_file(), so a dangling link was left out and evaluate
    scored one image of two with exit 0."""
    from spsr_hpc.data.images import list_images
    from spsr_hpc.evaluate import main

    hr = tmp_path / "HR"
    hr.mkdir()
    (hr / "chelsea.png").write_bytes((photos / "chelsea.png").read_bytes())
    (hr / "coffee.png").symlink_to(tmp_path / "gone.png")
    assert [p.name for p in list_images(hr)] == ["chelsea.png", "coffee.png"]
    with pytest.raises(SystemExit) as e:
        main(["--dataset", f"t={hr}", "--out", str(tmp_path / "ev"), "--no-progress",
              "--no-lpips"])
    errors = _errors(capsys.readouterr().err)
    assert e.value.code == 2 and len(errors) == 1 and "coffee.png" in errors[0], errors


def test_evaluate_refuses_a_dataset_name_given_twice(photos, tmp_path, capsys):
    """Before: the second --dataset t=... silently replaced the first (exit 0)."""
    from spsr_hpc.evaluate import main

    with pytest.raises(SystemExit) as e:
        main(["--dataset", f"t={photos}", "--dataset", f"t={photos}", "--out", str(tmp_path / "ev")])
    errors = _errors(capsys.readouterr().err)
    assert e.value.code == 2 and len(errors) == 1 and "'t' given twice" in errors[0], errors


def test_evaluate_damaged_lpips_weights_are_one_error_line(photos, tmp_path, capsys):
    """Before: a SafetensorError traceback (a truncated file) or a ValueError from lpips (VGG16
    weights given as AlexNet's)."""
    from spsr_hpc.evaluate import main

    (tmp_path / "alexnet.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(SystemExit) as e:
        main(["--dataset", f"t={photos}", "--out", str(tmp_path / "ev"), "--no-progress",
              "--lpips-weights", str(tmp_path / "alexnet.safetensors")])
    errors = _errors(capsys.readouterr().err)
    assert e.value.code == 2 and len(errors) == 1, errors
    assert "alexnet.safetensors do not load as AlexNet" in errors[0] and "fetch --force" in errors[0], errors


@pytest.mark.parametrize(("extra", "named"), [
    (["--lpips-weights", "{tmp}/alexnet-typo.pth"], "alexnet-typo.pth: does not exist;"),
    (["--lpips-weights", "{tmp}"], ": is a folder, not a file;"),
    (["--no-lpips", "--require-lpips"], "--no-lpips and --require-lpips contradict each other"),
])  # fmt: skip
def test_evaluate_lpips_weights_the_user_named_must_exist(extra, named, photos, tmp_path, capsys):
    """Before: a --lpips-weights path that did not exist reported LPIPS as n/a with exit 0 (the
    fallback meant for the default lookup), so a typo silently cost the column."""
    from spsr_hpc.evaluate import main

    with pytest.raises(SystemExit) as e:
        main(["--dataset", f"t={photos}", "--out", str(tmp_path / "ev"), "--no-progress",
              *(a.format(tmp=tmp_path) for a in extra)])
    errors = _errors(capsys.readouterr().err)
    assert e.value.code == 2 and len(errors) == 1 and named in errors[0], errors
    assert not (tmp_path / "ev").exists()  # before any work


def test_evaluate_no_lpips_reports_why(photos, tmp_path, capsys):
    from spsr_hpc.evaluate import main

    report = main(["--dataset", f"t={photos}", "--out", str(tmp_path / "ev"), "--no-progress", "--no-lpips"])
    assert report.value("t", "Bicubic", "lpips") is None and report.value("t", "Bicubic", "psnr") > 20
    assert "LPIPS not measured (left out: --no-lpips)" in (tmp_path / "ev" / "report.md").read_text()


@pytest.mark.parametrize(("overrides", "named"), [
    (["optim.milestones=[150"], "'optim.milestones': value '[150' is not valid YAML"),
    (["x=!!python/object:os.system"], "is not valid YAML"),
    (["train.max_steps=2", "train.max_steps=3"], "'train.max_steps': given twice on the command line"),
    (["logging.run_dir="], "'logging.run_dir': is empty"),
])  # fmt: skip
def test_train_command_line_mistakes_are_one_error_line(overrides, named, tmp_path, capsys):
    """Before: YAML errors in an override were tracebacks, a repeated key kept the last value
    silently, and an empty run_dir wrote the run (and resumed ./checkpoints) in the current folder."""
    from spsr_hpc.train.trainer import main

    assert main(["--config", str(REPO / "configs" / "tiny_psnr.yaml"), *overrides, "--validate"]) == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and named in errors[0], errors


def test_config_file_with_a_repeated_key_or_a_folder(tmp_path):
    from spsr_hpc.config import ConfigError, load_config

    (tmp_path / "dup.yaml").write_text("train:\n  max_steps: 2\ntrain:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match="key 'train' appears twice in one mapping"):
        load_config(tmp_path / "dup.yaml")
    with pytest.raises(FileNotFoundError, match=r"is a folder: pass a \.yaml file"):
        load_config(tmp_path)
    # Lists composed in code keep "the last wins" (a base, then its changes).
    cfg = load_config(REPO / "configs" / "tiny_psnr.yaml", ["train.max_steps=2", "train.max_steps=3"])
    assert cfg.train.max_steps == 3


@pytest.mark.parametrize(("script", "args", "named"), [
    ("gpu_check.sh", ["--budget", "abc"], "--budget abc: seconds"),
    ("gpu_check.sh", ["--wheels"], "--wheels needs a value"),
    ("gpu_check.sh", ["--results", __file__], "is a file, not a folder"),
    ("gpu_check.sh", ["--python", "/nonexistent/python"], "no such interpreter"),
    ("gpu_wheels.sh", ["--help-me"], "unknown option --help-me"),
    ("gpu_wheels.sh", ["a", "b"], "one folder expected, got 2"),
])  # fmt: skip
def test_gpu_scripts_refuse_bad_arguments_before_any_work(script, args, named, tmp_path):
    """Before: --results <file> created /gpu_check_<time>/ at the root and went on; --budget abc
    failed after making the run folder; gpu_wheels.sh made a folder named --help and ran pip."""
    import subprocess

    r = subprocess.run(["bash", str(REPO / "scripts" / script), *args], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and named in r.stderr, r.stderr
    assert not list(tmp_path.iterdir())  # nothing made


def test_exif_orientation_is_applied(tmp_path):
    """A camera JPEG stored sideways (EXIF orientation 6: rotate 90 degrees clockwise to view) was
    super-resolved sideways, with no note."""
    from PIL import Image as PILImage

    from spsr_hpc.data import read_rgb

    stored = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    exif = PILImage.Exif()
    exif[0x0112] = 6
    PILImage.fromarray(stored).save(tmp_path / "cam.jpg", exif=exif, quality=95)
    PILImage.open(tmp_path / "cam.jpg").save(tmp_path / "plain.png")  # the decoded pixels, no tag
    img, note = read_rgb(tmp_path / "cam.jpg")
    raw, _ = read_rgb(tmp_path / "plain.png")
    np.testing.assert_array_equal(img, np.rot90(raw, k=-1))  # clockwise
    assert img.shape == (40, 32, 3) and note == "EXIF orientation 6 applied"


def test_pair_check_reads_sizes_as_the_images_are_read(tmp_path):
    """An HR JPEG stored 80x40 with EXIF orientation 6 is read as 40x80 (read_rgb turns it). Before:
    FolderDataset.check_pairs (evaluate runs it) compared the stored size, refusing the LR made from
    the image as shown (10x20) and passing one made from the stored pixels (20x10), which then failed
    when read."""
    from PIL import Image as PILImage

    from spsr_hpc.data import FolderDataset, read_rgb

    hr, lr_shown, lr_stored = (tmp_path / d for d in ("hr", "lr_shown", "lr_stored"))
    for d in (hr, lr_shown, lr_stored):
        d.mkdir()
    exif = PILImage.Exif()
    exif[0x0112] = 6
    stored = np.random.default_rng(0).integers(0, 256, (40, 80, 3), dtype=np.uint8)  # H 40, W 80
    PILImage.fromarray(stored).save(hr / "cam.jpg", exif=exif, quality=95)
    shown = read_rgb(hr / "cam.jpg")[0]
    assert shown.shape[:2] == (80, 40)
    PILImage.fromarray(shown[::4, ::4]).save(lr_shown / "cam.png")  # 10 wide, 20 high
    PILImage.fromarray(stored[::4, ::4]).save(lr_stored / "cam.png")  # 20 wide, 10 high
    good = FolderDataset(hr, lr_shown, scale=4)
    good.check_pairs()
    assert good[0]["hr"].shape[:2] == (80, 40)  # (H, W, 3)
    with pytest.raises(ValueError, match="do not match their HR"):
        FolderDataset(hr, lr_stored, scale=4).check_pairs()


def _png16(values: np.ndarray) -> bytes:
    """A 16-bit colour PNG written byte by byte (Pillow cannot write one): IHDR bit depth 16,
    colour type 2 (RGB) or 6 (RGBA), filter 0 on every row."""
    import struct
    import zlib

    h, w, c = values.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [3, 4])
def test_sixteen_bit_colour_png_is_reduced_with_a_note(channels, tmp_path):
    """Before: a 16-bit RGB(A) PNG came back as 8-bit with no note (16-bit grey had one)."""
    from spsr_hpc.data import read_rgb

    values = np.random.default_rng(0).integers(0, 65536, (5, 7, channels), dtype=np.uint16)
    values[0, 0, :3] = (65535, 255, 256)
    (tmp_path / "deep.png").write_bytes(_png16(values))
    img, note = read_rgb(tmp_path / "deep.png")
    np.testing.assert_array_equal(img, (values[..., :3] >> 8).astype(np.uint8))  # the high byte
    assert img[0, 0].tolist() == [255, 0, 1]
    mode = "RGB" if channels == 3 else "RGBA"
    assert note.startswith(f"16-bit {mode} -> 8-bit (the high byte of each value)"), note
    assert ("alpha dropped" in note) == (channels == 4)


def test_sixteen_bit_detection_reads_every_pillow_tile_form_and_not_565_bmps(tmp_path):
    """Pillow 10 keeps tiles as plain tuples (``.args`` is Pillow 11's NamedTuple: an
    AttributeError on every colour image there), and a 5-6-5 BMP's raw mode "BGR;16" is not 16
    bits per channel (it got the "high byte" note)."""
    from PIL import Image as PILImage

    from spsr_hpc.data.images import _sixteen_bit_colour

    (tmp_path / "deep.png").write_bytes(_png16(np.zeros((2, 3, 3), dtype=np.uint16)))
    with PILImage.open(tmp_path / "deep.png") as im:
        assert _sixteen_bit_colour(im) == "RGB"
        im.tile = [tuple(t) for t in im.tile]  # Pillow 10's form
        assert _sixteen_bit_colour(im) == "RGB"
        im.tile = [("raw", (0, 0, 3, 2), 0, ("BGR;16", 0, 1))]  # a 5-6-5 BMP's tile
        assert _sixteen_bit_colour(im) is None


def test_sixteen_bit_grey_alpha_png_gets_its_note(tmp_path):
    """Pillow opens a 16-bit grey+alpha PNG as RGBA (raw mode "LA;16B"): the high byte is kept,
    unlike 16-bit grey (rounded). Before: only "RGBA -> RGB (alpha dropped)" was noted."""
    import struct
    import zlib

    from spsr_hpc.data import read_rgb

    grey = np.array([[0x00FF, 0x7F80, 0xFF00, 0xFFFF]], dtype=np.uint16)
    pixels = np.stack([grey, np.full_like(grey, 0xFFFF)], axis=-1)  # grey, alpha

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(1))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 1, 16, 4, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    (tmp_path / "ga.png").write_bytes(png)
    img, note = read_rgb(tmp_path / "ga.png")
    assert img[0, :, 0].tolist() == (grey[0] >> 8).tolist() == [0, 127, 255, 255]  # the high byte
    assert note.startswith("16-bit LA -> 8-bit (the high byte of each value)") and "alpha dropped" in note


def _interrupt_when(cmd: list[str], ready, cwd: Path) -> tuple[int, str]:
    """Start ``cmd`` in its own process group, send SIGINT to the group (as a terminal's Ctrl-C
    does) once ``ready()`` is true, and return (exit status, stderr)."""
    import signal
    import subprocess
    import time

    p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ready():
            assert p.poll() is None, "finished before it could be interrupted"
            assert time.monotonic() < deadline, "never got ready"
            time.sleep(0.02)
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    return p.returncode, err


def test_ctrl_c_in_make_shards_is_one_line_and_leaves_no_tmp(tmp_path):
    """Before: ~80 lines of KeyboardInterrupt tracebacks, one from each pool worker."""
    import sys

    _noise_images(tmp_path / "hr", 40, 96)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "launch" / "make_shards.py"), "--hr", str(tmp_path / "hr"), "--out",
           str(out), "--shard-size-mb", "0.03", "--workers", "2", "--no-progress"]
    rc, err = _interrupt_when(cmd, lambda: any(out.glob("shard-*.tar")), tmp_path)
    assert rc == 130 and "Traceback" not in err, err[-3000:]
    assert len(_errors(err) + [ln for ln in err.splitlines() if "interrupted" in ln]) == 1, err[-3000:]
    assert not _tmp_files(out) and not (out / "manifest.json").exists()


def test_ctrl_c_in_infer_is_one_line(tiny_ckpt, tmp_path):
    import sys

    _noise_images(tmp_path / "in", 30, 24)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "launch" / "infer.py"), "--input", str(tmp_path / "in"), "--checkpoint",
           str(tiny_ckpt), "--out", str(out), "--no-progress", "--tile", "0"]
    rc, err = _interrupt_when(cmd, lambda: any(out.glob("*_SR.png")), tmp_path)
    assert rc == 130 and "Traceback" not in err, err[-3000:]
    assert "infer: interrupted" in err and not _tmp_files(out), err[-3000:]


@pytest.mark.parametrize(("flags", "named"), [
    (["--fit-steps", "0"], "--fit-steps 0: the heads must be fitted"),
    (["--fit-lr", "0"], "--fit-lr 0.0: must be > 0"),
    (["--max-patches-per-image", "-1"], "or 0 for every dense patch"),
])  # fmt: skip
def test_evaluate_nse_settings_that_would_score_untrained_heads(flags, named, capsys):
    """Before: --fit-steps 0 / --fit-lr 0 printed a table of chance-level, untrained heads with exit 0,
    and --max-patches-per-image -1 was refused with a message contradicting --help (0 = every patch)."""
    from spsr_hpc.nse.evaluate import main

    with pytest.raises(SystemExit) as e:
        main(["--train-shards", "x", "--heldout", "y", *flags])
    assert e.value.code == 2 and named in capsys.readouterr().err
