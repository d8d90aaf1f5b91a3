"""spsr_kernels.gradient_map against the conv2d reference of the public SPSR code (docs/method.md §1).

On machines without CUDA the Triton path runs in the interpreter (conftest sets
TRITON_INTERPRET=1); both backends are checked against the same reference, output and input
gradient.
"""

from __future__ import annotations

import pytest
import torch

from spsr_kernels import GradientMap, gradient_map, gradient_map_ref
from spsr_kernels.gradient_map import gradient_map_bwd, gradient_map_fwd

BACKENDS = ["triton", "torch"]
PADDINGS = [1, 2]
SHAPES = [(1, 1, 1, 1), (1, 1, 2, 3), (2, 3, 17, 37), (4, 3, 130, 130), (1, 3, 64, 1)]


def _fwd_bwd(
    fn, x: torch.Tensor, grad: torch.Tensor, padding: int, **kw
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    y = fn(x, padding, **kw)
    (dx,) = torch.autograd.grad(y, x, grad)
    return y.detach(), dx


def _exact(x: torch.Tensor, grad: torch.Tensor, padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference output and input gradient in float64, cast to float32.

    float64 because cuDNN may run an fp32 conv2d in TF32 (10-bit mantissa) on CUDA.
    """
    y, dx = _fwd_bwd(gradient_map_ref, x.double(), grad.double(), padding)
    return y.float(), dx.float()


def _layout(shape: tuple[int, ...], layout: str, device, dtype=torch.float32) -> torch.Tensor:
    if layout == "contiguous":
        return torch.randn(shape, device=device, dtype=dtype)
    if layout == "channels_last":
        return torch.randn(shape, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    if layout == "sliced":
        b, c, h, w = shape
        base = torch.randn(b + 1, c + 2, 2 * h + 3, w + 9, device=device, dtype=dtype)
        x = base[1:, 1 : c + 1, 3 : 3 + 2 * h : 2, 4 : 4 + w]
        assert x.shape == shape and not x.is_contiguous()
        return x
    raise AssertionError(layout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_fp32(shape, padding, backend, device):
    x = torch.randn(shape, device=device)
    ho, wo = shape[2] + 2 * (padding - 1), shape[3] + 2 * (padding - 1)
    grad = torch.randn(shape[0], shape[1], ho, wo, device=device)
    y, dx = _fwd_bwd(gradient_map, x, grad, padding, backend=backend)
    y_ref, dx_ref = _exact(x, grad, padding)
    assert y.shape == (shape[0], shape[1], ho, wo) and y.dtype == x.dtype
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_strided_inputs(layout, padding, backend, device):
    x = _layout((2, 3, 17, 37), layout, device)
    ho, wo = 17 + 2 * (padding - 1), 37 + 2 * (padding - 1)
    # A channels_last incoming gradient too, and a stride-0 one (what y.sum().backward() sends).
    grads = [torch.randn(2, 3, ho, wo, device=device).to(memory_format=torch.channels_last),
             torch.ones(1, 1, 1, 1, device=device).expand(2, 3, ho, wo)]  # fmt: skip
    for grad in grads:
        y, dx = _fwd_bwd(gradient_map, x, grad, padding, backend=backend)
        y_ref, dx_ref = _exact(x.contiguous(), grad.contiguous(), padding)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5)
    if layout == "channels_last" and backend == "triton":
        # The kernel keeps the caller's memory format instead of copying to contiguous.
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert dx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 17, 37), (1, 2, 64, 40)], ids=lambda s: "x".join(map(str, s)))
def test_low_precision_within_pytorch_error(shape, dtype, padding, backend, device):
    """Kernel's distance to the fp32 reference ≤ 2× PyTorch's own distance in that dtype + atol."""
    x = torch.rand(shape, device=device).to(dtype)  # image-like values in [0, 1]
    ho, wo = shape[2] + 2 * (padding - 1), shape[3] + 2 * (padding - 1)
    grad = torch.randn(shape[0], shape[1], ho, wo, device=device).to(dtype)
    y32, dx32 = _exact(x, grad, padding)
    y_lp, dx_lp = _fwd_bwd(gradient_map_ref, x, grad, padding)
    y, dx = _fwd_bwd(gradient_map, x, grad, padding, backend=backend)
    assert y.dtype == dtype and dx.dtype == dtype
    atol = 1e-3 if dtype == torch.float16 else 8e-3
    for name, ours, theirs, exact in (("M", y, y_lp, y32), ("dL/dx", dx, dx_lp, dx32)):
        err = (ours.float() - exact).abs().max().item()
        err_torch = (theirs.float() - exact).abs().max().item()
        assert err <= 2 * err_torch + atol, f"{name}: error {err:.3g}, PyTorch {dtype}: {err_torch:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", PADDINGS)
def test_gradcheck_fp64(padding, backend, device):
    x = torch.randn(1, 2, 3, 4, device=device, dtype=torch.float64, requires_grad=True)
    # Fast mode (random projections of the Jacobian) keeps interpreted launches to a handful.
    assert torch.autograd.gradcheck(lambda t: gradient_map(t, padding, backend=backend), (x,), fast_mode=True)


def test_empty_batch(device):
    x = torch.randn(0, 3, 4, 5, device=device, requires_grad=True)
    for backend in BACKENDS:
        y = gradient_map(x, 2, backend=backend)
        assert y.shape == (0, 3, 6, 7)
        y.sum().backward()
        assert x.grad.shape == x.shape


def test_triton_path_saves_only_x(device):
    x = torch.randn(1, 2, 8, 8, device=device, requires_grad=True)
    y = gradient_map(x, 2, backend="triton")
    assert y.grad_fn.name() == "GradientMapFunctionBackward"
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].data_ptr() == x.data_ptr()


def test_auto_dispatch(monkeypatch, device):
    x = torch.randn(1, 1, 5, 5, device=device, requires_grad=True)
    if device.type == "cuda":
        assert gradient_map(x).grad_fn.name() == "GradientMapFunctionBackward"
        assert gradient_map(x.cpu()).grad_fn.name() != "GradientMapFunctionBackward"
        return
    # The kernels were decorated under the interpreter (conftest), so flipping the variable now
    # only changes the dispatch decision, which reads it per call.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert gradient_map(x).grad_fn.name() == "GradientMapFunctionBackward"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert gradient_map(x).grad_fn.name() != "GradientMapFunctionBackward"
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        gradient_map(x, backend="triton")


def test_module(device):
    x = torch.randn(2, 3, 9, 11, device=device)
    mod = GradientMap(2)
    assert "padding=2" in repr(mod)
    torch.testing.assert_close(mod(x), gradient_map_ref(x.double(), 2).float(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="padding=3"):
        GradientMap(3)
    with pytest.raises(ValueError, match="backend='gpu'"):
        GradientMap(1, backend="gpu")


@pytest.mark.parametrize("fn", [gradient_map, gradient_map_ref], ids=lambda f: f.__name__)
def test_bad_input(fn, device):
    x = torch.randn(1, 3, 8, 8, device=device)
    with pytest.raises(ValueError, match=r"4-D .* shape \(3, 8, 8\)"):
        fn(x[0])
    with pytest.raises(TypeError, match=r"torch\.int64"):
        fn(torch.ones(1, 3, 8, 8, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match="list"):
        fn([[1.0]])
    for bad in (0, 3, True):
        with pytest.raises(ValueError, match=f"padding={bad}"):
            fn(x, bad)
    with pytest.raises(ValueError, match="backend='cuda'"):
        fn(x, backend="cuda")


def test_bad_input_launchers(device):
    x = torch.randn(1, 3, 8, 8, device=device)
    with pytest.raises(ValueError, match=r"grad_m has shape \(1, 3, 8, 8\), expected \(1, 3, 10, 10\)"):
        gradient_map_bwd(x, torch.randn(1, 3, 8, 8, device=device), 2)
    with pytest.raises(ValueError, match="one device"):
        gradient_map_bwd(x, torch.randn(1, 3, 8, 8, device="meta"), 1)


@pytest.mark.parametrize("padding", PADDINGS)
def test_registered_ops_opcheck(padding, device):
    """Schema, fake (meta) implementation and dispatch of the custom ops, as torch.compile needs them."""
    x = torch.randn(1, 2, 6, 7, device=device)
    g = torch.randn(1, 2, 6 + 2 * (padding - 1), 7 + 2 * (padding - 1), device=device)
    torch.library.opcheck(gradient_map_fwd, (x, padding))
    torch.library.opcheck(gradient_map_bwd, (x, g, padding))


def _tiny_model(backend: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), GradientMap(2, backend=backend))


def _compiled_matches_eager(model: torch.nn.Module, compile_backend: str, device) -> None:
    x = torch.randn(2, 3, 16, 16, device=device, requires_grad=True)
    compiled = torch.compile(model, backend=compile_backend, fullgraph=True)
    y_c = compiled(x)
    (dx_c,) = torch.autograd.grad(y_c.square().sum(), x)
    y_e = model(x)
    (dx_e,) = torch.autograd.grad(y_e.square().sum(), x)
    torch.testing.assert_close(y_c, y_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx_c, dx_e, atol=1e-4, rtol=1e-5)


def test_compile_triton_op_fullgraph(device):
    """The Triton path traces into one graph (custom op + fake impl + autograd.Function)."""
    torch._dynamo.reset()
    _compiled_matches_eager(_tiny_model("triton"), "aot_eager", device)


@pytest.mark.slow
def test_compile_torch_path_inductor(device):
    """Inductor fuses the slice formulation; same result as eager."""
    torch._dynamo.reset()
    _compiled_matches_eager(_tiny_model("torch"), "inductor", device)


# --- CUDA only: the compiled kernels, not the interpreter ----------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_cuda_native_large(layout, dtype, padding):
    x = _layout((4, 3, 257, 515), layout, "cuda", dtype)
    grad = torch.randn(4, 3, 257 + 2 * (padding - 1), 515 + 2 * (padding - 1), device="cuda", dtype=dtype)
    y, dx = _fwd_bwd(gradient_map, x, grad, padding)
    y32, dx32 = _exact(x, grad, padding)
    if dtype == torch.float32:
        torch.testing.assert_close(y, y32, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dx, dx32, atol=1e-5, rtol=1e-5)
        return
    y_lp, dx_lp = _fwd_bwd(gradient_map_ref, x, grad, padding)
    atol = 1e-3 if dtype == torch.float16 else 8e-3
    for ours, theirs, exact in ((y, y_lp, y32), (dx, dx_lp, dx32)):
        assert (ours.float() - exact).abs().max() <= 2 * (theirs.float() - exact).abs().max() + atol


@pytest.mark.gpu
def test_cuda_mixed_devices():
    x = torch.randn(1, 3, 8, 8, device="cuda")
    with pytest.raises(ValueError, match="one device"):
        gradient_map_bwd(x, torch.randn(1, 3, 8, 8), 1)


@pytest.mark.gpu
def test_cuda_gradcheck_fp64():
    x = torch.randn(2, 2, 9, 70, device="cuda", dtype=torch.float64, requires_grad=True)
    for padding in PADDINGS:
        assert torch.autograd.gradcheck(lambda t, p=padding: gradient_map(t, p), (x,), fast_mode=True)
