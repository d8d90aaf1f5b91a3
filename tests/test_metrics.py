"""PSNR/SSIM/LPIPS against independent references (scikit-image, scipy, the published formulas,
a direct lpips call) on bundled photos with synthetic degradations."""

from __future__ import annotations

import math

import lpips
import numpy as np
import pytest
import torch
import torchvision
from scipy import ndimage
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from spsr_hpc.metrics import LPIPSMetric, psnr, psnr_ssim, rgb_to_y, ssim, ssim_downsample_factor
from spsr_hpc.weights import MissingWeightsError


def _y_reference(img: np.ndarray) -> np.ndarray:
    """The published formula in floating point: Y = 16 + 65.481 R + 128.553 G + 24.966 B with
    R, G, B in [0, 1], rounded half away from zero. True values are multiples of 1/255000, so
    rounding to 6 decimals first removes float noise without moving any value across .5."""
    x = img.astype(np.float64) / 255.0
    y = 16.0 + 65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]
    return np.floor(np.round(y, 6) + 0.5).astype(np.int64)


def _degrade(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    x = img.astype(np.float64)
    if kind == "noise":
        x = x + rng.normal(0, 8.0, x.shape)
    elif kind == "blur":
        x = ndimage.gaussian_filter(x, sigma=(1.2, 1.2, 0))
    elif kind == "shift":
        x = np.roll(x, shift=(1, -1), axis=(0, 1)) * 0.97 + 3
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )


# --- Y conversion -----------------------------------------------------------------------------


def test_rgb_to_y_known_values():
    colours = np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)
    # white, black, and the three primaries: 16 + 65.481, 16 + 128.553, 16 + 24.966, rounded.
    np.testing.assert_array_equal(rgb_to_y(colours)[0], [235, 16, 81, 145, 41])
    assert rgb_to_y(colours).dtype == np.uint8


def test_rgb_to_y_matches_matlab_formula():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(512, 512, 3), dtype=np.uint8)
    np.testing.assert_array_equal(rgb_to_y(img), _y_reference(img))
    # Every colour that sits exactly on a .5 tie (65481 R + 128553 G + 24966 B ≡ 127500 mod
    # 255000) rounds up, as "half away from zero" says.
    r, g, b = np.meshgrid(np.arange(256), np.arange(256), np.arange(256), indexing="ij", sparse=True)
    ties = (65481 * r + 128553 * g + 24966 * b) % 255000 == 127500
    tie_rgb = np.stack(np.nonzero(ties), axis=-1).astype(np.uint8)[None]
    assert tie_rgb.shape[1] == 194
    x = tie_rgb.astype(np.float64) / 255.0
    y = 16.0 + 65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]
    np.testing.assert_allclose(y - np.floor(y + 0.25), 0.5, atol=1e-9)  # really ties
    np.testing.assert_array_equal(rgb_to_y(tie_rgb), np.floor(y + 0.25) + 1)


# --- PSNR / SSIM against scikit-image (f = 1) ------------------------------------------------


@pytest.mark.parametrize("kind", ["noise", "blur", "shift"])
@pytest.mark.parametrize("crop_border", [0, 4])
def test_psnr_ssim_y_match_skimage(kind, crop_border):
    rng = np.random.default_rng(1)
    # coffee is 400×600; a 300×360 crop has min side < 384, so ssim.m does not down-sample.
    hr = skdata.coffee()[50:350, 100:460]
    sr = _degrade(hr, kind, rng)
    assert ssim_downsample_factor(hr.shape[0] - 2 * crop_border, hr.shape[1] - 2 * crop_border) == 1
    ya, yb = _y_reference(sr).astype(np.uint8), _y_reference(hr).astype(np.uint8)
    if crop_border:
        ya = ya[crop_border:-crop_border, crop_border:-crop_border]
        yb = yb[crop_border:-crop_border, crop_border:-crop_border]
    ref_psnr = peak_signal_noise_ratio(yb, ya, data_range=255)
    ref_ssim = _skimage_ssim(ya.astype(np.float64), yb.astype(np.float64))
    assert psnr(sr, hr, crop_border) == pytest.approx(ref_psnr, abs=1e-9)
    assert ssim(sr, hr, crop_border) == pytest.approx(ref_ssim, abs=1e-9)
    assert psnr_ssim(sr, hr, crop_border) == (psnr(sr, hr, crop_border), ssim(sr, hr, crop_border))


def test_rgb_variants_match_skimage():
    rng = np.random.default_rng(2)
    hr = skdata.chelsea()[:256, :300]
    sr = _degrade(hr, "noise", rng)
    c = 3
    a, b = sr[c:-c, c:-c].astype(np.float64), hr[c:-c, c:-c].astype(np.float64)
    # RGB PSNR: one MSE over all three channels; RGB SSIM: the mean of the per-channel values.
    assert psnr(sr, hr, c, y_channel=False) == pytest.approx(peak_signal_noise_ratio(b, a, data_range=255))
    ref = np.mean([_skimage_ssim(a[..., i], b[..., i]) for i in range(3)])
    assert ssim(sr, hr, c, y_channel=False) == pytest.approx(ref, abs=1e-9)
    # The Y protocol differs from RGB: a user mixing them up gets a different number.
    assert abs(psnr(sr, hr, c) - psnr(sr, hr, c, y_channel=False)) > 0.1


# --- SSIM down-sampling path (f > 1) against a direct implementation of ssim.m's steps -------


def _ssim_m_direct(a_y: np.ndarray, b_y: np.ndarray) -> float:
    """ssim.m: f = max(1, round(min(M, N)/256)); imfilter(img, ones(f)/f^2, 'symmetric', 'same');
    img(1:f:end, 1:f:end); then the Gaussian SSIM. MATLAB's 'symmetric' is scipy's 'reflect';
    MATLAB centres an f-tap filter at floor((f+1)/2) (1-based), scipy at f//2 + origin (0-based)."""
    f = max(1, math.floor(min(a_y.shape) / 256 + 0.5))
    origin = ((f + 1) // 2 - 1) - f // 2
    out = []
    for img in (a_y, b_y):
        img = img.astype(np.float64)
        if f > 1:
            img = ndimage.uniform_filter(img, size=f, mode="reflect", origin=origin)[::f, ::f]
        out.append(img)
    return _skimage_ssim(out[0], out[1]), f


@pytest.mark.parametrize(
    ("name", "expected_f"), [("astronaut", 2), ("hubble_deep_field", 3)]
)
def test_ssim_downsampling_matches_ssim_m_steps(name, expected_f):
    rng = np.random.default_rng(3)
    hr = getattr(skdata, name)()
    sr = _degrade(hr, "blur", rng)
    crop = 4
    ya = rgb_to_y(sr)[crop:-crop, crop:-crop]
    yb = rgb_to_y(hr)[crop:-crop, crop:-crop]
    ref, f = _ssim_m_direct(ya, yb)
    assert f == expected_f == ssim_downsample_factor(*ya.shape)
    assert ssim(sr, hr, crop) == pytest.approx(ref, abs=1e-9)
    # Without the down-sampling the value would differ: the path is really taken.
    assert abs(_skimage_ssim(ya.astype(np.float64), yb.astype(np.float64)) - ref) > 1e-3


def test_downsample_factor_uses_matlab_rounding():
    # round(1.5) is 2 in MATLAB (half away from zero) but 2 in Python only by luck of banker's
    # rounding; round(2.5) is 3 in MATLAB and 2 in Python.
    assert ssim_downsample_factor(384, 1000) == 2
    assert ssim_downsample_factor(640, 700) == 3
    assert ssim_downsample_factor(383, 383) == 1
    assert ssim_downsample_factor(50, 50) == 1


def test_identical_images():
    img = skdata.astronaut()[:200, :220]
    assert psnr(img, img, 4) == math.inf
    assert ssim(img, img, 4) == pytest.approx(1.0, abs=1e-12)


def test_input_validation():
    img = skdata.astronaut()[:64, :64]
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(img, img[:60], 4)
    with pytest.raises(TypeError, match="uint8"):
        ssim(img.astype(np.float32), img, 4)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        psnr(img[..., 0], img[..., 0], 4)
    with pytest.raises(ValueError, match="crop_border"):
        psnr(img, img, 40)
    with pytest.raises(ValueError, match="crop_border"):
        psnr(img, img, -1)
    with pytest.raises(ValueError, match="too small for SSIM"):
        ssim(img[:20, :20], img[:20, :20], 5)


# --- LPIPS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_lpips():
    torch.manual_seed(0)
    return LPIPSMetric(random_backbone=True)


def test_lpips_identical_is_zero(random_lpips):
    x = torch.rand(2, 3, 48, 40)
    np.testing.assert_allclose(random_lpips(x, x).numpy(), 0.0, atol=1e-7)


@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")
def test_lpips_equals_direct_lpips_call(random_lpips):
    direct = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    direct.net.load_state_dict(random_lpips.net.net.state_dict())
    a, b = torch.rand(3, 3, 64, 56), torch.rand(3, 3, 64, 56)
    ours = random_lpips(a, b)
    with torch.no_grad():
        ref = direct(a * 2 - 1, b * 2 - 1).flatten()
    assert ours.shape == (3,)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    # The uint8 helper scales to [0, 1] then [-1, 1].
    ua = (a[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    ub = (b[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    ta = torch.from_numpy(ua).permute(2, 0, 1)[None].float() / 255
    tb = torch.from_numpy(ub).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        ref_u = direct(ta * 2 - 1, tb * 2 - 1).item()
    assert random_lpips.from_uint8(ua, ub) == pytest.approx(ref_u, rel=1e-5, abs=1e-6)


def test_lpips_loads_torchvision_alexnet_file(tmp_path):
    """A torchvision AlexNet checkpoint lands in lpips' sliced trunk: each slice's output equals
    torchvision's features up to that layer."""
    torch.manual_seed(1)
    tv = torchvision.models.alexnet(weights=None).eval()
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(tv.state_dict(), path)
    metric = LPIPSMetric(weights_path=path)
    assert metric.backbone_file == str(path)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        outs = metric.net.net(x)
        for out, end in zip(outs, (2, 5, 8, 10, 12)):
            torch.testing.assert_close(out, tv.features[:end](x))


def test_lpips_missing_weights_names_the_file(tmp_path):
    missing = tmp_path / "nowhere" / "alexnet-owt-7be5be79.pth"
    with pytest.raises(MissingWeightsError, match=r"alexnet-owt-7be5be79\.pth"):
        LPIPSMetric(weights_path=missing)


def test_lpips_rejects_bad_input(random_lpips):
    with pytest.raises(ValueError, match="equal shape"):
        random_lpips(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    with pytest.raises(TypeError, match="uint8"):
        random_lpips.from_uint8(np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 3), np.uint8))
