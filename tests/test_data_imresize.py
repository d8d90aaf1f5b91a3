"""MATLAB-compatible imresize: kernel facts, hand-derived values, a second implementation, PIL."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from spsr_hpc.data import imresize, modcrop, to_uint8
from spsr_hpc.data.imresize import cubic, output_size, weight_matrix

SCALES = [1 / 4, 1 / 3, 1 / 2, 0.7, 2, 3, 4]


def keys_cubic(x: float) -> float:
    """The a = -0.5 cubic written out from its textbook definition (scalar)."""
    a, ax = -0.5, abs(x)
    if ax <= 1:
        return (a + 2) * ax**3 - (a + 3) * ax**2 + 1
    if ax < 2:
        return a * ax**3 - 5 * a * ax**2 + 8 * a * ax - 4 * a
    return 0.0


def matlab_resize_1d(x: np.ndarray, scale: float) -> np.ndarray:
    """A direct, loop-based transcription of MATLAB's imresize contributions() along axis 0,
    with the image explicitly padded by np.pad(mode="symmetric") (an independent boundary rule)."""
    n = x.shape[0]
    out_n = math.ceil(n * scale)
    aa = scale < 1
    width = 4 / scale if aa else 4
    pad = int(width) + 4
    xp = np.pad(x, [(pad, pad)] + [(0, 0)] * (x.ndim - 1), mode="symmetric")
    out = np.zeros((out_n, *x.shape[1:]))
    for i in range(1, out_n + 1):
        u = i / scale + 0.5 * (1 - 1 / scale)
        left = math.floor(u - width / 2)
        taps = [left + t for t in range(math.ceil(width) + 2)]
        w = np.array([scale * keys_cubic(scale * (u - j)) if aa else keys_cubic(u - j) for j in taps])
        w /= w.sum()
        for wj, j in zip(w, taps):
            out[i - 1] += wj * xp[j - 1 + pad]
    return out


def test_cubic_matches_textbook_kernel():
    xs = np.linspace(-2.5, 2.5, 101)
    np.testing.assert_allclose(cubic(xs), [keys_cubic(v) for v in xs], atol=1e-15)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("n", [1, 2, 5, 13, 32])
def test_weights_rows_sum_to_one(n, scale):
    w = weight_matrix(n, scale)
    assert w.shape == (math.ceil(n * scale - 1e-9), n)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)


@pytest.mark.parametrize("scale", SCALES)
def test_matches_loop_reference_with_symmetric_padding(scale):
    rng = np.random.default_rng(0)
    x = rng.random((23, 9, 3))
    ref = matlab_resize_1d(x, scale)  # rows
    ref = matlab_resize_1d(ref.transpose(1, 0, 2), scale).transpose(1, 0, 2)  # then columns
    np.testing.assert_allclose(imresize(x, scale), ref, atol=1e-12)


def test_hand_derived_weights():
    # x2 upscaling, first output pixel: input coordinate 0.75 (1-based); taps at distances
    # 1.75, 0.75 (mirrored onto pixel 1 together with 0.25) ... k(0.75)+k(0.25) = 0.2265625+0.8671875.
    w = weight_matrix(8, 2)
    np.testing.assert_allclose(w[0, :2], [1.09375, -0.09375], atol=1e-15)
    np.testing.assert_allclose(w[2, :3], [0.203125, 0.8671875, -0.0703125], atol=1e-15)
    # x1/2 with antialiasing: kernel 0.5 * k(x / 2), 8 taps at distances ±0.5, ±1.5, ±2.5, ±3.5.
    interior = 0.5 * np.array([-0.0234375, -0.0703125, 0.2265625, 0.8671875])
    interior = np.concatenate([interior, interior[::-1]])
    w = weight_matrix(16, 0.5)
    np.testing.assert_allclose(w[3, 3:11], interior, atol=1e-15)
    assert np.all(w[3, :3] == 0) and np.all(w[3, 11:] == 0)
    # First output pixel of x1/2: taps -3..4 (0-based), -1,-2,-3 fold onto 0,1,2.
    np.testing.assert_allclose(
        w[0, :5], [0.546875, 0.3984375, 0.1015625, -0.03515625, -0.01171875], atol=1e-15
    )
    # The same numbers through the public function on a 1-D signal.
    x = np.arange(16, dtype=np.float64) ** 2
    y = imresize(x[:, None], 0.5)[:, 0]
    assert y[0] == pytest.approx(float(w[0] @ x), abs=1e-12)
    assert y[0] == pytest.approx(0.3984375 + 4 * 0.1015625 - 9 * 0.03515625 - 16 * 0.01171875, abs=1e-12)


@pytest.mark.parametrize("scale", SCALES)
def test_constant_stays_constant(scale):
    x = np.full((11, 14, 3), 0.37)
    y = imresize(x, scale)
    assert y.shape == (output_size(11, scale), output_size(14, scale), 3)
    np.testing.assert_allclose(y, 0.37, atol=1e-12)


def test_shrink_ramp_samples_at_centres():
    # Away from the borders, a linear ramp shrunk by 4 is the ramp sampled at (i + 0.5) * 4 - 0.5.
    x = np.arange(64, dtype=np.float64)[:, None] * np.ones((1, 64))
    y = imresize(x, 1 / 4)
    expect = (np.arange(16) + 0.5) * 4 - 0.5
    np.testing.assert_allclose(y[2:-2, 0], expect[2:-2], atol=1e-10)
    assert abs(y[0, 0] - expect[0]) > 0.05  # the border differs (symmetric padding), as in MATLAB


def test_upscale_reproduces_quadratics_and_hits_samples():
    # Keys' cubic (a = -0.5) reproduces polynomials up to degree 2 exactly.
    n = 20
    q = (np.arange(n, dtype=np.float64) - 3.3) ** 2
    y = imresize(q[:, None], 2)[:, 0]
    pos = (np.arange(2 * n) + 0.5) / 2 - 0.5
    np.testing.assert_allclose(y[4:-4], ((pos - 3.3) ** 2)[4:-4], atol=1e-10)
    # x3: output 3k+1 sits exactly on input k, where an interpolating kernel returns the sample.
    y3 = imresize(q[:, None], 3)[:, 0]
    np.testing.assert_allclose(y3[1::3], q, atol=1e-12)


@pytest.mark.parametrize("scale", [1 / 4, 1 / 2, 2])
def test_flip_symmetry(scale):
    rng = np.random.default_rng(1)
    x = rng.random((16, 24, 3))
    np.testing.assert_allclose(imresize(x[::-1, ::-1], scale), imresize(x, scale)[::-1, ::-1], atol=1e-12)


@pytest.mark.parametrize(
    ("shape", "scale", "out"),
    [
        ((13, 17), 1 / 4, (4, 5)),
        ((10, 7), 1 / 3, (4, 3)),
        ((300, 9), 1 / 3, (100, 3)),
        ((5, 3), 2, (10, 6)),
        ((13, 17), 0.5, (7, 9)),
    ],
)
def test_output_shapes(shape, scale, out):
    assert imresize(np.zeros(shape), scale).shape == out
    assert imresize(torch.zeros(2, 3, *shape), scale).shape == (2, 3, *out)


def test_interior_matches_pil_float_bicubic():
    # PIL's BICUBIC is the same a = -0.5 kernel, widened when reducing; it only differs at the
    # borders (PIL renormalises instead of mirroring). An independent implementation.
    rng = np.random.default_rng(2)
    x = rng.random((64, 48)).astype(np.float32)
    for scale in (1 / 4, 1 / 2, 2):
        ours = imresize(x.astype(np.float64), scale)
        h, w = ours.shape
        pil = np.asarray(Image.fromarray(x, mode="F").resize((w, h), Image.BICUBIC))
        m = 4 if scale < 1 else 6
        np.testing.assert_allclose(ours[m:-m, m:-m], pil[m:-m, m:-m], atol=2e-5)


def test_torch_matches_numpy_and_keeps_dtype_device():
    rng = np.random.default_rng(3)
    x = rng.random((2, 3, 20, 28))
    t64 = imresize(torch.from_numpy(x), 1 / 4)
    n = np.stack([imresize(x[b].transpose(1, 2, 0), 1 / 4).transpose(2, 0, 1) for b in range(2)])
    np.testing.assert_allclose(t64.numpy(), n, atol=1e-12)
    t32 = imresize(torch.from_numpy(x).float()[0], 1 / 4)
    assert t32.dtype == torch.float32 and t32.shape == (3, 5, 7)
    np.testing.assert_allclose(t32.numpy(), n[0], atol=1e-5)
    assert imresize(x[0, 0].astype(np.float32), 0.5).dtype == np.float32


def test_no_clipping():
    x = np.zeros((16, 16))
    x[:, 8:] = 1.0
    y = imresize(x, 2)
    assert y.min() < -0.01 and y.max() > 1.01  # cubic overshoot survives


def test_to_uint8_rounds_half_up_and_clips():
    x = np.array([-0.2, 0.0, 0.5 / 255, 1.49 / 255, 1.0, 1.3, 127.5 / 255])
    np.testing.assert_array_equal(to_uint8(x), [0, 0, 1, 1, 255, 255, 128])
    np.testing.assert_array_equal(to_uint8(torch.from_numpy(x)).numpy(), to_uint8(x))
    with pytest.raises(TypeError, match="float"):
        to_uint8(np.zeros(3, dtype=np.uint8))


def test_modcrop():
    assert modcrop(np.zeros((13, 18, 3)), 4).shape == (12, 16, 3)
    assert modcrop(np.zeros((13, 18)), 3).shape == (12, 18)
    assert modcrop(torch.zeros(2, 3, 13, 18), 4).shape == (2, 3, 12, 16)
    with pytest.raises(ValueError, match="scale"):
        modcrop(np.zeros((4, 4)), 0)


def test_bad_inputs():
    with pytest.raises(TypeError, match="float"):
        imresize(np.zeros((4, 4), dtype=np.uint8), 0.5)
    with pytest.raises(TypeError, match="float"):
        imresize(torch.zeros(1, 4, 4, dtype=torch.uint8), 0.5)
    with pytest.raises(ValueError, match="scale"):
        imresize(np.zeros((4, 4)), 0)
    with pytest.raises(ValueError, match="shape"):
        imresize(torch.zeros(4, 4), 0.5)
    with pytest.raises(TypeError):
        imresize([[0.0]], 0.5)
