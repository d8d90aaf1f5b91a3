"""Precision policy (spsr_hpc/precision.py, docs/training.md "Precision"): where bf16 is refused,
the frozen-weight cast, the loss boundary, and bf16 inference / evaluation from the CLIs on CPU."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from spsr_hpc import precision
from spsr_hpc.config import ConfigError, load_config
from spsr_hpc.models import GeneratorConfig, build_generator

REPO = Path(__file__).resolve().parents[1]
NATIVE = precision.cpu_bf16_native()
TINY = GeneratorConfig(name="spsr", nf=8, nb=2, gc=4, taps=[0, 1])
TINY_ARGS = ["--arch", "spsr", "--nf", "8", "--nb", "2", "--gc", "4", "--taps", "0", "1"]


@pytest.fixture(scope="module", autouse=True)
def _process_group():
    """The trainers of this module share one single-process group, closed at the end."""
    yield
    from spsr_hpc.train.engines import destroy_distributed

    destroy_distributed()


@pytest.fixture
def no_native_bf16(monkeypatch):
    """A CPU without avx512_bf16/AMX (and no CUDA device)."""
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_bf16_unsupported_names_the_reason(no_native_bf16):
    assert "no native bf16" in precision.bf16_unsupported("cpu")
    assert "no native bf16" in precision.bf16_unsupported("auto")
    assert precision.bf16_unsupported("cuda") is None  # a login node: the run checks again
    with pytest.raises(ValueError, match=r"^train\.bf16=true: this CPU has no native bf16.*bf16=false"):
        precision.check_bf16("cpu")


@pytest.mark.skipif(not NATIVE, reason="this CPU has no native bf16")
def test_bf16_supported_here():
    assert precision.bf16_unsupported("cpu") is None


@pytest.mark.parametrize("config", ["tiny_spsr_g.yaml", "spsr_g.yaml", "tiny_spsr_r.yaml"])
def test_train_config_refuses_bf16_without_native_support(no_native_bf16, config):
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs" / config, ["train.bf16=true", "train.device=cpu"])
    assert info.value.key == "train.bf16" and "no native bf16" in str(info.value)
    load_config(REPO / "configs" / config, ["train.bf16=false", "train.device=cpu"])


def test_val_precision_checked_at_config_time(no_native_bf16):
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs/tiny_spsr_g.yaml", ["val.precision=bf16", "train.device=cpu"])
    assert info.value.key == "val.precision" and "no native bf16" in str(info.value)
    with pytest.raises(ConfigError, match=r"val\.precision.*'fp16'"):
        load_config(REPO / "configs/tiny_spsr_g.yaml", ["val.precision=fp16"])
    for ok in ("auto", "fp32"):
        load_config(REPO / "configs/tiny_spsr_g.yaml", [f"val.precision={ok}", "train.device=cpu"])


@pytest.mark.skipif(not NATIVE, reason="this CPU has no native bf16")
@pytest.mark.parametrize(("overrides", "want"), [
    (["train.bf16=true"], "bf16"),  # auto: the training's precision
    (["train.bf16=true", "val.precision=fp32"], "fp32"),
    (["val.precision=bf16"], "bf16"),
    ([], "fp32"),
])
def test_validation_runs_in_its_precision(tmp_path, overrides, want):
    """Trainer.validate's PSNR/SSIM equal an independent computation: the fp32 copy of G on the
    held-out images under torch.autocast(bfloat16) or none, as val.precision resolves; and the
    two precisions give different SR images, so the check can tell them apart."""
    from spsr_hpc.data import FolderDataset, to_uint8
    from spsr_hpc.metrics import psnr, ssim
    from spsr_hpc.train.trainer import Trainer

    sys.path.insert(0, str(REPO / "tests"))
    from test_train import write_val_images

    val_dir = write_val_images(tmp_path / "val")
    cfg = load_config(REPO / "configs/tiny_psnr.yaml", [
        f"logging.run_dir={tmp_path / 'run'}", "logging.progress_bar=false", "logging.tensorboard=false",
        "checkpoint.resume=none", "train.device=cpu", f"val.dir={val_dir}", "val.lpips=false",
        "val.use_ema=false", "model.generator.init_scale=1.0", *overrides,
    ])
    trainer = Trainer(cfg, loader=[])
    try:
        assert trainer.val_precision == want
        got = trainer.validate()
        model = trainer._inference_model(False)
        srs = {}
        for prec in ("fp32", "bf16"):
            ps, ss, srs[prec] = [], [], []
            for item in (FolderDataset(val_dir, scale=4)[i] for i in range(2)):
                ctx = torch.autocast("cpu", torch.bfloat16) if prec == "bf16" else torch.no_grad()
                with ctx, torch.no_grad():
                    sr = model(item["lr"][None]).sr[0].float().clamp(0, 1)
                sr_u8 = to_uint8(sr.permute(1, 2, 0).numpy())
                srs[prec].append(sr_u8)
                ps.append(psnr(sr_u8, item["hr"], 4))
                ss.append(ssim(sr_u8, item["hr"], 4))
            if prec == want:
                assert got["val/psnr"] == pytest.approx(float(np.mean(ps)), abs=1e-9)
                assert got["val/ssim"] == pytest.approx(float(np.mean(ss)), abs=1e-9)
        assert any((a != b).any() for a, b in zip(srs["fp32"], srs["bf16"]))
    finally:
        trainer.close()


def test_nse_config_refuses_bf16_without_native_support(no_native_bf16):
    from spsr_hpc.nse.config import NSEPretrainConfig

    with pytest.raises(ConfigError, match=r"train\.bf16.*no native bf16"):
        load_config(REPO / "configs/tiny_nse_contrastive.yaml", ["train.bf16=true"], schema=NSEPretrainConfig)


def test_train_cli_prints_one_error_line_before_any_model(no_native_bf16, capsys, monkeypatch):
    from spsr_hpc.train import trainer

    monkeypatch.setattr(trainer, "run", lambda *a, **k: pytest.fail("a model was built"))
    rc = trainer.main(["--config", str(REPO / "configs/tiny_spsr_g.yaml"), "train.bf16=true"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc != 0 and len(err) == 1 and err[0].startswith("error:") and "train.bf16" in err[0], err


def test_deepspeed_template_with_low_precision_engine_is_refused_at_config_time(tmp_path):
    tpl = tmp_path / "ds.json"
    tpl.write_text('{"zero_optimization": {"stage": 0}, "bf16": {"enabled": true}}')
    with pytest.raises(ConfigError, match=r"deepspeed\.json.*bf16\.enabled=true.*train\.bf16=true"):
        load_config(REPO / "configs/tiny_spsr_g.yaml", [f"deepspeed.json={tpl}"])


def test_cast_frozen_weights_gives_autocast_numbers():
    """Rounding a frozen network's conv/linear weights once equals autocast rounding them per call
    (reference: the untouched fp32 network under torch.autocast); BatchNorm stays fp32."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 6 * 6, 4)).eval().requires_grad_(False)
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    x = torch.rand(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = net(x)
    cast = precision.cast_frozen_weights_(copy.deepcopy(net))
    assert cast[0].weight.dtype == torch.bfloat16 and cast[4].weight.dtype == torch.bfloat16
    assert cast[1].weight.dtype == torch.float32 and cast[1].running_var.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cast(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="trainable"):
        precision.cast_frozen_weights_(nn.Linear(2, 2))


@pytest.mark.skipif(not NATIVE, reason="this CPU has no native bf16")
def test_losses_stay_fp32_under_autocast():
    """Every loss reads .float() inputs: under autocast with bf16 operands its value is the fp32
    loss of the (rounded) operands, and its gradient reaches the bf16 operand in fp32 maths."""
    from spsr_hpc.losses.gan import ragan_d_loss, ragan_g_loss
    from spsr_hpc.losses.pixel import pixel_loss
    from spsr_hpc.losses.structure import structure_distance

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 1, generator=g), torch.randn(4, 1, generator=g)
    a16, b16 = a.bfloat16(), b.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = [ragan_d_loss(a16, b16), ragan_g_loss(a16, b16), pixel_loss(a16, b16),
               pixel_loss(a16, b16, "l2"),
               structure_distance(a16[:, :, None, None], b16[:, :, None, None], "cosine")]
    ref = [ragan_d_loss(a16.float(), b16.float()), ragan_g_loss(a16.float(), b16.float()),
           pixel_loss(a16.float(), b16.float()), pixel_loss(a16.float(), b16.float(), "l2"),
           structure_distance(a16.float()[:, :, None, None], b16.float()[:, :, None, None], "cosine")]
    for x, y in zip(got, ref):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.skipif(not NATIVE, reason="this CPU has no native bf16")
def test_info_nce_objective_bf16_keeps_an_fp32_loss():
    """The contrastive objective under autocast: bf16 keys and predictions go to the fused InfoNCE
    (its bf16 path), the loss comes back fp32 and is close to the fp32 objective's."""
    from spsr_hpc.nse import contrastive
    from spsr_hpc.nse.config import NSEPretrainConfig
    from spsr_hpc.nse.pretrain import build_objective

    torch.manual_seed(0)
    cfg = load_config(REPO / "configs/tiny_nse_contrastive.yaml", ["nse.width=8", "nse.out_dim=8"],
                      schema=NSEPretrainConfig)
    obj = build_objective(cfg)
    seen = []
    real = contrastive.info_nce

    def spy(pred, keys, *a, **k):
        seen.append((pred.dtype, keys.dtype))
        return real(pred, keys, *a, **k)

    hr = torch.rand(2, 3, 96, 96)
    loss32, _, _ = obj(hr, generator=torch.Generator().manual_seed(3))
    contrastive.info_nce = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss16, _, _ = obj(hr, generator=torch.Generator().manual_seed(3))
    finally:
        contrastive.info_nce = real
    assert seen and all(d == (torch.bfloat16, torch.bfloat16) for d in seen), seen
    assert loss16.dtype == torch.float32
    loss16.backward()
    assert all(p.grad.dtype == torch.float32 for p in obj.parameters() if p.grad is not None)
    # scale 64 x cos: bf16 rounds each cosine by ~2^-8, so logits move by ~64 * 2^-8 = 0.25 at
    # worst; the mean over anchors of the LSE difference stays well inside that.
    assert abs(float(loss16.detach()) - float(loss32.detach())) < 64 * 2**-8


@pytest.mark.skipif(not NATIVE, reason="this CPU has no native bf16")
def test_infer_and_evaluate_cli_bf16_on_cpu(tmp_path, capsys):
    from spsr_hpc.evaluate import main as evaluate_main
    from spsr_hpc.inference import export_generator
    from spsr_hpc.inference import main as infer_main

    torch.manual_seed(3)
    ckpt = export_generator(build_generator(TINY).eval(), tmp_path / "tiny.safetensors")
    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "in" / "a.png")
    outs = {}
    for prec in ("fp32", "bf16"):
        written = infer_main(["--input", str(tmp_path / "in"), "--checkpoint", str(ckpt), *TINY_ARGS,
                              "--out", str(tmp_path / prec), "--precision", prec, "--device", "cpu",
                              "--no-progress"])
        outs[prec] = np.asarray(Image.open(written[0])).astype(int)
    assert outs["bf16"].shape == (48, 48, 3)
    assert np.abs(outs["bf16"] - outs["fp32"]).max() <= 8  # 8 bits of mantissa: a few levels of 255
    hr = tmp_path / "hr"
    hr.mkdir()
    Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(hr / "b.png")
    report = evaluate_main(["--model", f"tiny={ckpt}", *TINY_ARGS, "--dataset", f"mine={hr}", "--out",
                            str(tmp_path / "ev"), "--no-lpips",
                            "--precision", "bf16", "--device", "cpu", "--no-progress"])
    assert any(r["method"] == "tiny" for r in report.summary)


def test_infer_and_evaluate_refuse_bf16_before_the_model(no_native_bf16, tmp_path, capsys, monkeypatch):
    from spsr_hpc import evaluate, inference

    monkeypatch.setattr(inference, "build_and_load", lambda *a, **k: pytest.fail("model built"))
    monkeypatch.setattr(evaluate, "build_and_load", lambda *a, **k: pytest.fail("model built"))
    with pytest.raises(SystemExit) as e:
        inference.main(["--input", str(tmp_path), "--checkpoint", str(tmp_path / "x.safetensors"),
                        *TINY_ARGS, "--precision", "bf16", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: --precision bf16: this CPU has no native bf16" in err
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", f"x={tmp_path / 'x.safetensors'}", *TINY_ARGS, "--dataset", f"m={tmp_path}",
                       "--precision", "bf16", "--device", "cpu", "--out", str(tmp_path / "o"),
                       "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: --precision bf16: this CPU has no native bf16" in err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
