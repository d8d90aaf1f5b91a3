"""Tiled inference (equal to untiled when the receptive field fits the margin), the inference job,
exports, and clear errors for bad inputs."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from spsr_hpc.data import BadImageError
from spsr_hpc.inference import (
    autocast,
    build_and_load,
    cli_device,
    export_generator,
    export_onnx,
    infer,
    main,
    sr_images,
    sr_tiled,
)
from spsr_hpc.models import GeneratorConfig, SROutput, build_generator, load_pretrained

TINY = GeneratorConfig(name="spsr", nf=8, nb=2, gc=4, taps=[0, 1])
TINY_ARGS = ["--arch", "spsr", "--nf", "8", "--nb", "2", "--gc", "4", "--taps", "0", "1"]


class TinySR(nn.Module):
    """conv3×3 → conv3×3 (LR) → nearest ×s → conv3×3 (HR): receptive-field radius 3 LR pixels
    (2 from the LR convs, 1 HR pixel that can reach one LR pixel further)."""

    def __init__(self, scale: int = 4, with_grad: bool = True) -> None:
        super().__init__()
        self.scale, self.with_grad = scale, with_grad
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> SROutput:
        f = torch.relu(self.c2(torch.relu(self.c1(x))))
        f = F.interpolate(f, scale_factor=self.scale, mode="nearest")
        sr = self.c3(f)
        if not self.with_grad:
            return SROutput(sr)
        return SROutput(sr=sr, grad_sr=sr.abs(), grad_lr=x * 2 - 1)


class PointwiseSR(nn.Module):
    """Each output pixel depends on one input pixel only: any tiling must reproduce it exactly,
    which checks that the blend weights cover every pixel and are normalised."""

    def __init__(self, scale: int = 2) -> None:
        super().__init__()
        self.scale, self.mix = scale, nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.mix(x), scale_factor=self.scale, mode="nearest")


@pytest.mark.parametrize(
    ("tile", "overlap", "margin"),
    [(16, 8, 3), (12, 8, 4), (20, 12, None), (24, 14, 5), (64, 8, None)],
)
def test_tiled_equals_untiled_when_receptive_field_fits(tile, overlap, margin):
    torch.manual_seed(0)
    model = TinySR().eval()
    lr = torch.rand(2, 3, 29, 41)
    with torch.no_grad():
        ref = model(lr)
    out = sr_tiled(model, lr, tile, overlap, margin=margin, tile_batch=8)
    assert isinstance(out, SROutput)
    for got, want in zip(out, ref):
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_tiled_differs_when_margin_too_small():
    """The equality above is not vacuous: with a margin below the receptive field it breaks."""
    model = TinySR().eval()
    lr = torch.rand(1, 3, 37, 53)
    with torch.no_grad():
        ref = model(lr).sr
    out = sr_tiled(model, lr, 16, 8, margin=0).sr
    assert (out - ref).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("tile", "overlap", "margin"), [(7, 4, 0), (7, 4, 2), (9, 6, 1), (5, 0, 0), (10, 9, 4)]
)
def test_blend_weights_cover_and_normalise(tile, overlap, margin):
    torch.manual_seed(1)
    model = PointwiseSR().eval()
    lr = torch.rand(1, 3, 23, 31)
    with torch.no_grad():
        ref = model(lr)
    out = sr_tiled(model, lr, tile, overlap, margin=margin, tile_batch=4)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_none_fields_and_single_tile_spsr():
    torch.manual_seed(2)
    out = sr_tiled(TinySR(with_grad=False).eval(), torch.rand(1, 3, 20, 20), 8, 4)
    assert out.grad_sr is None and out.grad_lr is None and out.sr.shape == (1, 3, 80, 80)
    model = build_generator(TINY).eval()
    lr = torch.rand(1, 3, 12, 10)
    with torch.no_grad():
        ref = model(lr)
    got = sr_tiled(model, lr, tile=16, overlap=4)  # one tile: exactly the untiled forward
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)


def test_tiling_input_errors():
    model = TinySR().eval()
    lr = torch.rand(1, 3, 10, 10)
    with pytest.raises(ValueError, match="overlap must be in"):
        sr_tiled(model, lr, 8, 8)
    with pytest.raises(ValueError, match="margin must be"):
        sr_tiled(model, lr, 8, 4, margin=3)
    with pytest.raises(ValueError, match="tile must be"):
        sr_tiled(model, lr, 0, 0)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        sr_tiled(model, lr[0], 8, 4)
    with pytest.raises(ValueError, match="not an integer up-scaling"):
        sr_tiled(lambda x: x[..., :-1, :-1], lr, 8, 4)
    with pytest.raises(TypeError, match="tensor or a tuple"):
        sr_tiled(lambda x: {"sr": x}, lr, 8, 4)
    with pytest.raises(ValueError, match="fp16"):
        autocast(torch.device("cpu"), "fp16")
    with pytest.raises(ValueError, match="precision"):
        autocast(torch.device("cpu"), "fp8")


# --- the job and exports ---------------------------------------------------------------------


@pytest.fixture
def tiny_checkpoint(tmp_path):
    torch.manual_seed(3)
    model = build_generator(TINY).eval()
    path = export_generator(model, tmp_path / "tiny.safetensors", metadata={"arch": "spsr"})
    return model, path


def test_export_generator_roundtrip(tiny_checkpoint):
    model, path = tiny_checkpoint
    fresh = build_generator(TINY)
    report = load_pretrained(fresh, path)
    assert report.matched == report.total and not report.fresh
    for (k, a), (k2, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    loaded = build_and_load(path, TINY)
    lr = torch.rand(1, 3, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(loaded(lr).sr, model(lr).sr)


def test_build_and_load_errors(tmp_path, tiny_checkpoint):
    model, _ = tiny_checkpoint
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        build_and_load(tmp_path / "nope.pth", TINY)
    # A trunk-only (ESRGAN-style) file initialises only part of SPSR: unusable for inference.
    trunk = {k: v for k, v in model.state_dict().items() if k.startswith("model.")}
    torch.save(trunk, tmp_path / "trunk.pth")
    with pytest.raises(ValueError, match="rrdbnet"):
        build_and_load(tmp_path / "trunk.pth", TINY)


def _write_lr_images(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def test_infer_folder_matches_direct_forward(tmp_path, tiny_checkpoint):
    model, _ = tiny_checkpoint
    _write_lr_images(tmp_path / "in", [(14, 18), (10, 9)])
    written = infer(tmp_path / "in", model, tmp_path / "out", tile=64, save_grad=True, progress=False)
    assert [p.name for p in written] == ["img0_SR.png", "img1_SR.png"]
    src = np.asarray(Image.open(tmp_path / "in" / "img0.png"))
    sr = np.asarray(Image.open(written[0]))
    assert sr.shape == (56, 72, 3) and sr.dtype == np.uint8
    with torch.no_grad():
        ref = model(torch.from_numpy(src.copy()).permute(2, 0, 1)[None].float() / 255).sr.clamp(0, 1)
    ref_u8 = np.floor(ref[0].permute(1, 2, 0).double().numpy() * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(sr, ref_u8)
    assert np.asarray(Image.open(tmp_path / "out" / "img0_grad.png")).shape == (56, 72, 3)


def test_infer_bad_inputs(tmp_path, tiny_checkpoint):
    model, _ = tiny_checkpoint
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        infer(tmp_path / "missing_dir", model, tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        infer(tmp_path / "empty", model, tmp_path / "out", progress=False)
    _write_lr_images(tmp_path / "mixed", [(8, 8)])
    (tmp_path / "mixed" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(BadImageError, match=r"broken\.png"):
        infer(tmp_path / "mixed", model, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # nothing written before the bad file was found
    with pytest.raises(ValueError, match="no gradient branch"):
        infer(tmp_path / "mixed" / "img0.png", TinySR(with_grad=False), tmp_path / "out2", save_grad=True,
              progress=False)


def test_infer_cli(tmp_path, tiny_checkpoint):
    _, ckpt = tiny_checkpoint
    _write_lr_images(tmp_path / "in", [(12, 12)])
    written = main(["--input", str(tmp_path / "in" / "img0.png"), "--checkpoint", str(ckpt), *TINY_ARGS,
                    "--out", str(tmp_path / "out"), "--tile", "8", "--overlap", "4", "--no-progress",
                    "--export-safetensors", str(tmp_path / "copy.safetensors")])
    assert written == [tmp_path / "out" / "img0_SR.png"]
    assert np.asarray(Image.open(written[0])).shape == (48, 48, 3)
    assert load_pretrained(build_generator(TINY), tmp_path / "copy.safetensors").fresh == []


def test_infer_cli_refuses_inputs_that_would_overwrite_each_other(tmp_path, tiny_checkpoint, capsys):
    """a.png and a.jpg in one --input folder both became a_SR.png: one result silently replaced
    the other (exit 0). Now it is one error line before the model is built; --out naming a file too."""
    _, ckpt = tiny_checkpoint
    _write_lr_images(tmp_path / "in", [(12, 12)])
    Image.open(tmp_path / "in" / "img0.png").save(tmp_path / "in" / "img0.jpg")
    args = ["--checkpoint", str(ckpt), *TINY_ARGS, "--no-progress"]
    with pytest.raises(SystemExit) as e:
        main(["--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"), *args])
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "img0.jpg" in err[0] and "img0.png" in err[0] and "img0_SR.png" in err[0], err
    assert not (tmp_path / "out").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["--input", str(tmp_path / "in" / "img0.png"), "--out", str(tmp_path / "afile"), *args])
    assert e.value.code == 2 and "is a file" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "named"), [
    (["--device", "gpu"], "--device 'gpu' is not a device"),
    (["--tile", "8", "--overlap", "16"], "overlap must be in [0, tile)"),
    (["--tile", "-5"], "tile must be"),
])  # fmt: skip
def test_infer_cli_bad_device_or_tiling_is_one_error_line(tmp_path, tiny_checkpoint, capsys, flags, named):
    """Each was a traceback (exit status 1), the tiling ones after the model was built."""
    _, ckpt = tiny_checkpoint
    _write_lr_images(tmp_path / "in", [(12, 12)])
    with pytest.raises(SystemExit) as e:
        main(["--input", str(tmp_path / "in"), "--checkpoint", str(ckpt), *TINY_ARGS, "--no-progress",
              "--out", str(tmp_path / "out"), *flags])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert e.value.code == 2 and len(err) == 1 and named in err[0], err
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is visible"):
            cli_device("cuda")


def test_sr_images_bf16_cpu_close_to_fp32():
    torch.manual_seed(4)
    model = TinySR().eval()
    lr = torch.rand(1, 3, 16, 16)
    sr32, _ = sr_images(model, lr)
    sr16, grad = sr_images(model, lr, precision="bf16", tile=8, overlap=4)
    assert sr16.dtype == torch.float32 and grad is not None
    # bf16 keeps 8 mantissa bits: a few outputs move by a few 1e-2, the bulk by far less.
    assert (sr16 - sr32).abs().max() < 0.1
    assert (sr16 - sr32).abs().mean() < 5e-3


@pytest.mark.skipif(importlib.util.find_spec("onnx") is not None, reason="onnx is installed")
def test_onnx_export_without_onnx_says_what_to_install(tmp_path, tiny_checkpoint):
    model, _ = tiny_checkpoint
    with pytest.raises(ModuleNotFoundError, match="pip install onnx"):
        export_onnx(model, tmp_path / "g.onnx")


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="the onnx package is not installed")
def test_onnx_export_runs(tmp_path, tiny_checkpoint):
    model, _ = tiny_checkpoint
    path = export_onnx(model, tmp_path / "g.onnx", with_grad=True)
    assert path.is_file()
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed: exported but not executed")
    import onnxruntime

    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    lr = torch.rand(2, 3, 13, 17)
    sr, grad = sess.run(None, {"lr": lr.numpy()})
    with torch.no_grad():
        ref = model(lr)
    np.testing.assert_allclose(sr, ref.sr.numpy(), atol=1e-4)
    np.testing.assert_allclose(grad, ref.grad_sr.numpy(), atol=1e-4)


@pytest.mark.gpu
def test_tiled_bf16_cuda_close_to_fp32():
    torch.manual_seed(5)
    model = build_generator(TINY).cuda().eval()
    lr = torch.rand(2, 3, 40, 36, device="cuda")
    sr32, _ = sr_images(model, lr)
    sr16, _ = sr_images(model, lr, precision="bf16", tile=16, overlap=8)
    assert (sr16 - sr32).abs().max() < 5e-2


@pytest.mark.parametrize("arch_flags", [[], TINY_ARGS])
def test_export_with_training_time_metadata_infers_without_flags(tmp_path, arch_flags):
    """An export whose generator metadata records a passthrough start (fusion_init, pretrained, init_scale,
    strict_load: how training began) loads for inference and evaluation: those fields are ignored."""
    import json

    from spsr_hpc.config import to_dict
    from spsr_hpc.evaluate import main as evaluate_main

    torch.manual_seed(5)
    model = build_generator(TINY).eval()
    trained_as = dataclasses.replace(TINY, pretrained=str(tmp_path / "gone" / "rrdb.safetensors"),
                                     fusion_init="passthrough", init_scale=1.0, strict_load=False)
    meta = {"step": "2", "method": "spsr_g", "generator": json.dumps(to_dict(trained_as))}
    ckpt = export_generator(model, tmp_path / "generator_ema.safetensors", metadata=meta)
    _write_lr_images(tmp_path / "in", [(12, 10)])
    written = main(["--input", str(tmp_path / "in" / "img0.png"), "--checkpoint", str(ckpt), *arch_flags,
                    "--out", str(tmp_path / "out"), "--tile", "0", "--no-progress"])
    sr = np.asarray(Image.open(written[0]))
    src = np.asarray(Image.open(tmp_path / "in" / "img0.png"))
    with torch.no_grad():
        ref = model(torch.from_numpy(src.copy()).permute(2, 0, 1)[None].float() / 255).sr.clamp(0, 1)
    np.testing.assert_array_equal(sr, np.floor(ref[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
    hr = tmp_path / "hr"
    hr.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(hr / "a.png")
    report = evaluate_main(["--model", f"g={ckpt}", *arch_flags, "--dataset", f"set={hr}",
                            "--out", str(tmp_path / "eval"), "--no-progress", "--no-bicubic"])
    assert "g" in report.markdown
