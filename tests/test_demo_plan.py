"""The demo's plan without training: validation schedule, precision choice and its wiring into every
stage (train.bf16) and the report, stage timing from metrics.jsonl, and the CLI's early errors."""

from __future__ import annotations

import json

import pytest

from spsr_hpc import demo
from spsr_hpc.config import load_config
from spsr_hpc.demo import REPO_ROOT, resolve_precision, stage_plan, stage_timing, val_every


@pytest.mark.parametrize("steps", [1, 5, 9, 10, 60, 97, 120, 300, 301, 1200, 1500, 4000])
@pytest.mark.parametrize("points", [1, 6, 8, 10])
def test_val_every_gives_at_least_the_points_asked(steps, points):
    every = val_every(steps, points)
    assert every >= 1
    validations = [s for s in range(1, steps + 1) if s % every == 0]  # the trainer's rule
    assert len(validations) >= min(points, steps)
    if any(steps % n == 0 for n in range(points, 2 * points + 1)) or steps <= points:
        assert validations[-1] == steps  # the last point is the stage's final weights
        assert len(validations) <= max(2 * points, steps if steps <= points else 0)


def test_val_every_of_the_default_schedule():
    # the defaults (1,200 PSNR steps, 300 GAN steps): 10 points each, the last at the final step
    assert val_every(1200) == 120 and val_every(300) == 30


def _plan(tmp_path, precision, **kw):
    (tmp_path / "val").mkdir(exist_ok=True)
    args = dict(nproc=2, psnr_steps=1200, gan_steps=300, batch_size=8, esrgan=True, precision=precision)
    args.update(kw)
    return stage_plan(tmp_path / "out", tmp_path / "shards", tmp_path / "val", **args)


@pytest.mark.parametrize("precision,flag", [("fp32", "false"), ("bf16", "true")])
def test_every_stage_gets_the_precision(tmp_path, precision, flag):
    plan = _plan(tmp_path, precision)
    assert [st["name"] for st in plan] == ["psnr", "esrgan", "spsr_g"]
    for st in plan:
        assert f"train.bf16={flag}" in st["overrides"]
        assert sum(o.startswith("train.bf16=") for o in st["overrides"]) == 1
    # the overrides are what launch/train.py takes: the config loader reads train.bf16 from them
    try:
        cfg = load_config(REPO_ROOT / "configs" / plan[0]["config"], plan[0]["overrides"])
    except ValueError as e:
        # with bf16 training merged, a machine without native bf16 refuses it at config time
        # (the demo itself never asks for it there: resolve_precision picks fp32 or stops first)
        if precision == "bf16" and not demo.bf16_native()[0] and "bf16" in str(e):
            return
        raise
    assert cfg.train.bf16 is (precision == "bf16")
    assert cfg.val.every == 120 and cfg.val.use_ema is False and cfg.val.max_size is None
    gan = load_config(REPO_ROOT / "configs" / plan[2]["config"], plan[2]["overrides"])
    assert gan.train.bf16 is (precision == "bf16") and gan.val.every == 30


def test_stage_plan_refuses_an_unresolved_precision(tmp_path):
    with pytest.raises(ValueError, match="resolved 'bf16' or 'fp32', got 'auto'"):
        _plan(tmp_path, "auto")
    assert [st["name"] for st in _plan(tmp_path, "fp32", esrgan=False)] == ["psnr", "spsr_g"]


def test_resolve_precision(monkeypatch):
    assert resolve_precision("fp32")[0] == "fp32"
    monkeypatch.setattr(demo, "bf16_native", lambda: (True, "a bf16 CPU"))
    assert resolve_precision("auto") == ("bf16", "bf16 autocast (--precision auto, on a bf16 CPU)")
    assert resolve_precision("bf16")[0] == "bf16"
    monkeypatch.setattr(demo, "bf16_native", lambda: (False, "an old CPU"))
    assert resolve_precision("auto") == ("fp32", "fp32 (--precision auto, on an old CPU)")
    with pytest.raises(ValueError, match="--precision bf16: an old CPU does not run bf16 natively"):
        resolve_precision("bf16")
    with pytest.raises(ValueError, match="expected one of auto, bf16, fp32"):
        resolve_precision("fp16")


def test_bf16_native_matches_torch():
    import torch

    native, where = demo.bf16_native()
    if not torch.cuda.is_available():
        assert native == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and "CPU" in where


def test_default_precision_is_auto():
    """bf16 where the hardware runs it natively (the main job measured 1.8x, LPIPS within 0.01 of
    fp32), fp32 elsewhere: never a precision the machine would emulate."""
    assert demo.DEFAULT_PRECISION == "auto"
    assert demo.DEFAULT_PRECISION in demo.PRECISION_CHOICES


def test_cli_refuses_bf16_without_native_support_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "bf16_native", lambda: (False, "this CPU (no native bf16)"))
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --precision bf16: this CPU") and err.count("\n") == 1
    assert not out.exists()
    with pytest.raises(SystemExit):
        demo.main(["--out", str(out), "--gan-steps", "0"])
    assert "--gan-steps 0: must be at least 1" in capsys.readouterr().err


def test_run_demo_passes_the_resolved_precision_to_training_and_evaluation(tmp_path, monkeypatch):
    """run_demo's wiring with training and evaluation stubbed: what each would be given for bf16."""
    monkeypatch.setattr(demo, "bf16_native", lambda: (True, "a bf16 CPU"))
    monkeypatch.setattr(demo, "export_bundled_photos", lambda d: (d / "train", d / "val"))
    monkeypatch.setattr(demo, "write_shards", lambda *a, **k: None)
    seen: dict = {}

    class Stop(Exception):
        pass

    def fake_train(plan, nproc, out):
        seen["plan"] = plan
        return {st["name"]: {"t_start": 0.0, "t_end": 1.0} for st in plan}, lambda: None

    def fake_evaluate(models, datasets, scale, out_dir, **kw):
        seen["evaluate"] = kw
        raise Stop

    import spsr_hpc.evaluate

    monkeypatch.setattr(demo, "_train_stages", fake_train)
    monkeypatch.setattr(demo, "stage_timing", lambda *a: {"wall_s": 1.0, "val_s": 0.0, "val_points": 0})
    monkeypatch.setattr(spsr_hpc.evaluate, "evaluate", fake_evaluate)
    with pytest.raises(Stop):
        demo.run_demo(tmp_path / "o", psnr_steps=20, gan_steps=10, precision="auto")
    assert all("train.bf16=true" in st["overrides"] for st in seen["plan"])
    assert seen["evaluate"]["precision"] == "bf16"


def test_stage_timing_splits_validation_from_training(tmp_path):
    rows = [{"step": 10, "time": 110.0, "loss/g_total": 1.0},
            {"step": 20, "time": 120.0, "loss/g_total": 1.0},
            {"step": 20, "time": 123.0, "val/psnr": 20.0},
            {"step": 30, "time": 133.0, "loss/g_total": 1.0},
            {"step": 30, "time": 136.0, "val/psnr": 21.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = stage_timing(tmp_path, t_start=95.0, t_end=140.0)
    # 1 s/step (20 steps in 23 s less the 3 s validation at step 20); step 1 began at t=100
    assert t == {"wall_s": 45.0, "start_up_s": 5.0, "train_s": 30.0, "val_s": 6.0, "val_points": 2,
                 "s_per_step": 1.0, "wrap_up_s": 4.0}


def test_stage_timing_start_up_with_faster_first_steps(tmp_path):
    """SPSR-G's fusion-only warm-up steps run faster than the later ones: the start-up is
    estimated from the first logging window's rate, not the stage's average (which put the step-1
    start before the stage's own start: a negative start-up in the 2026-12-07 report)."""
    rows = [{"step": 10, "time": 105.0, "loss/g_total": 1.0},   # steps 1-20 at 0.5 s, from t=100
            {"step": 20, "time": 110.0, "loss/g_total": 1.0},
            {"step": 30, "time": 120.0, "loss/g_total": 1.0},   # then 1 s/step
            {"step": 40, "time": 130.0, "loss/g_total": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = stage_timing(tmp_path, t_start=99.0, t_end=131.0)
    assert t["start_up_s"] == 1.0 and t["train_s"] == 30.0 and t["wrap_up_s"] == 1.0
    assert t["s_per_step"] == pytest.approx(25.0 / 30.0, abs=1e-3)  # the logged span's average
    assert t["start_up_s"] + t["train_s"] + t["val_s"] + t["wrap_up_s"] == t["wall_s"]


def test_train_stages_returns_at_the_last_summary_and_finish_reports_the_exit(tmp_path, monkeypatch, capsys):
    """The launch's output plumbing with a stand-in for the ranks: each stage's lines go to its own
    log, the summaries are parsed, control comes back before the processes exit (they wait on a
    FIFO here), and finish() raises on a failed exit with the log's tail."""
    import os
    import sys

    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    script = (
        "import json, sys\n"
        "print('launcher banner [INFO] x')\n"
        "for name in ('a', 'b'):\n"
        "    print('[demo-stage] ' + name)\n"
        "    print('[demo] training ' + name)\n"
        "    rec = {'stage': name, 't_start': 1.0, 't_end': 2.0}\n"
        "    print('[demo-summary] ' + json.dumps(rec), flush=True)\n"
        f"open({str(fifo)!r}).read()\n"
        "print('teardown line')\n"
        "sys.exit(3)\n"
    )
    monkeypatch.setattr(demo, "_launcher_cmd", lambda nproc: [sys.executable, "-c", script])
    plan = [{"name": "a"}, {"name": "b"}]
    summaries, finish = demo._train_stages(plan, 1, tmp_path)  # returns while the child waits
    assert summaries == {n: {"stage": n, "t_start": 1.0, "t_end": 2.0} for n in ("a", "b")}
    shown = capsys.readouterr().out
    lines = shown.splitlines()
    assert "[demo] training a" in lines and "launcher banner [INFO] x" not in lines
    assert not any(ln.startswith("[demo-summary]") for ln in lines)
    with open(fifo, "w"):
        pass  # let the child exit
    with pytest.raises(demo.DemoLaunchError, match="training failed \\(exit 3\\)") as info:
        finish()
    assert info.value.rc == 3 and "teardown line" in info.value.tail and not info.value.shown
    assert (tmp_path / "a.log").read_text().startswith("[demo] training a\n[demo-summary]")
    assert "launcher banner" in (tmp_path / "launch.log").read_text()
    assert "teardown line" in (tmp_path / "b.log").read_text()
    assert json.loads((tmp_path / "stages.json").read_text()) == plan


def _no_data(monkeypatch):
    """run_demo's steps before the launch, without the work: no photos exported, no shards."""
    monkeypatch.setattr(demo, "export_bundled_photos", lambda out: (out / "train", out / "val"))
    monkeypatch.setattr(demo, "write_shards", lambda *a, **k: None)


@pytest.mark.parametrize("rc", [4, 1])
def test_a_failed_stage_ends_the_demo_with_one_error_line(rc, tmp_path, monkeypatch, capsys):
    """Before: a Python traceback of a RuntimeError that repeated the stage's last 40 lines (already
    shown live), exit status 1 whatever the stage's own status."""
    import sys

    _no_data(monkeypatch)
    script = ("import sys\nprint('[demo-stage] psnr')\nprint('[demo] training psnr')\n"
              "print('error: could not write runs/x/metrics.jsonl: ENOSPC', flush=True)\n"
              f"sys.exit({rc})\n")
    monkeypatch.setattr(demo, "_launcher_cmd", lambda nproc: [sys.executable, "-c", script])
    assert demo.main(["--out", str(tmp_path / "out"), "--nproc", "1", "--precision", "fp32"]) == rc
    out, err = capsys.readouterr()
    assert "error: could not write runs/x/metrics.jsonl" in out  # the stage's own line, shown live
    assert err.count("error:") == 1 and "Traceback" not in err, err
    assert f"exit status {rc}" in err and str(tmp_path / "out" / "psnr.log") in err, err


def test_a_full_disk_outside_the_launch_ends_the_demo_with_one_error_line(tmp_path, monkeypatch, capsys):
    """A write of the demo's own (here the shards) on a full disk. Before: a traceback."""
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "shards" / "s.tar"))

    _no_data(monkeypatch)
    monkeypatch.setattr(demo, "write_shards", full)
    assert demo.main(["--out", str(tmp_path / "out"), "--nproc", "1", "--precision", "fp32"]) == 4
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    assert "[Errno 28] No space left on device (ENOSPC)" in err and "Free space there" in err, err


@pytest.mark.parametrize("inside", [True, False])
def test_a_permission_error_is_about_out_only_when_it_is_under_out(inside, tmp_path, monkeypatch, capsys):
    """EACCES on a file under --out is the demo's own write (one line, exit 4); elsewhere (e.g. an
    unreadable weights file) it is not about --out and keeps its traceback."""
    import errno

    out = tmp_path / "out"
    where = out / "shards" / "s.tar" if inside else tmp_path / "weights" / "vgg.pth"

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(where))

    _no_data(monkeypatch)
    monkeypatch.setattr(demo, "write_shards", denied)
    if inside:
        assert demo.main(["--out", str(out), "--nproc", "1", "--precision", "fp32"]) == 4
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "Make the folder writable" in err, err
    else:
        with pytest.raises(PermissionError):
            demo.main(["--out", str(out), "--nproc", "1", "--precision", "fp32"])


def test_no_deepspeed_launcher_is_one_error_line(tmp_path, monkeypatch, capsys):
    """Before: a FileNotFoundError traceback (its message already named the fix)."""
    _no_data(monkeypatch)
    monkeypatch.setattr(demo.shutil, "which", lambda name: None)
    monkeypatch.setattr(demo.sys, "executable", str(tmp_path / "bin" / "python"))  # no deepspeed beside it
    assert demo.main(["--out", str(tmp_path / "out"), "--nproc", "2", "--precision", "fp32"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "`deepspeed` launcher is not on PATH" in err, err


def test_rank0_validation_borrows_the_cores_of_the_waiting_local_ranks(monkeypatch):
    import os

    import torch

    from spsr_hpc.train.trainer import _borrow_local_cores

    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        torch.set_num_threads(1)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert _borrow_local_cores(torch.device("cpu")) == 1
        assert torch.get_num_threads() == min(2, cores)
        torch.set_num_threads(1)
        assert _borrow_local_cores(torch.device("cuda", 0)) == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        monkeypatch.setenv("LOCAL_SIZE", "4")  # the deepspeed launcher's name for it
        _borrow_local_cores(torch.device("cpu"))
        assert torch.get_num_threads() == min(4, cores)
        monkeypatch.delenv("LOCAL_SIZE")
        torch.set_num_threads(1)
        _borrow_local_cores(torch.device("cpu"))  # one rank on the node: nothing to borrow
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
