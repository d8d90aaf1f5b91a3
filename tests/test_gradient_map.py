"""spsr_kernels.gradient_map against the conv2d reference of the public SPSR code (docs/method.md §1).

On machines without CUDA the Triton path runs in the interpreter (conftest sets
TRITON_INTERPRET=1); both backends are checked against the same reference, output and input
gradient.
"""

from __future__ import annotations

import importlib
import re
from collections import Counter

import pytest
import torch

from spsr_kernels import GradientMap, gradient_map, gradient_map_ref
from spsr_kernels.gradient_map import gradient_map_bwd, gradient_map_fwd

# The module (the package re-exports the function under the submodule's name).
gm = importlib.import_module("spsr_kernels.gradient_map")

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
    with pytest.raises(ValueError, match=r"padding=2\.0 is not supported"):
        GradientMap(2.0)  # as gradient_map refuses it
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
    for bad in (0, 3, True, 2.0, "2"):  # 2.0: accepted by `in (1, 2)`, then refused inside F.pad
        with pytest.raises(ValueError, match=re.escape(f"padding={bad!r} is not supported")):
            fn(x, bad)
    with pytest.raises(ValueError, match="backend='cuda'"):
        fn(x, backend="cuda")
    import numpy as np

    torch.testing.assert_close(fn(x, np.int64(2)), fn(x, 2))  # an integer type is an integer


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("shape", [(2, 3, 0, 4), (2, 3, 4, 0), (1, 1, 0, 0)])
def test_empty_image_in_every_implementation(shape, padding, device):
    """An image with no rows or columns: the map is the padding's alone (v = h = 0, so sqrt(EPS)),
    from a loop over the definition. Before: gradient_map_ref (conv2d) raised."""
    h, w = shape[2] + 2 * (padding - 1), shape[3] + 2 * (padding - 1)
    want = torch.full((*shape[:2], h, w), gm.EPS, dtype=torch.float64).sqrt()
    for fn in (gradient_map_ref, lambda t, p: gradient_map(t, p, backend="torch"),
               lambda t, p: gradient_map(t.to(device), p, backend="triton").cpu()):
        x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
        y = fn(x, padding)
        torch.testing.assert_close(y, want, atol=0, rtol=0)
        (dx,) = torch.autograd.grad(y.sum(), x)
        assert dx.shape == x.shape


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


# --- Layouts, alignment classes and tile bodies (docs/kernels_gradient_map.md, "Compiled code") ---
#
# The interpreter's own tiles (`_block_sizes`) cover these images in one tile, always an edge tile;
# `small_tiles` forces 4 x 16 tiles as on a GPU, so larger images also have interior tiles, which
# take the unmasked tile body. `tile_bodies` counts the bodies the programs ran.


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(gm, "_block_sizes", lambda rows, cols, backward, vec: (4, 16, 1))


@pytest.fixture
def tile_bodies(monkeypatch, device):
    """{"fwd": Counter(masked=..., unmasked=...), "bwd": ...}: a spy on the interpreted tile helpers."""
    if device.type == "cuda":
        pytest.skip("counts the interpreted tile bodies")
    counts = {"fwd": Counter(), "bwd": Counter()}
    for name, helper in (("fwd", gm._fwd_tile), ("bwd", gm._bwd_tile)):

        def spy(*args, _name=name, _helper=helper, **kwargs):
            counts[_name]["masked" if kwargs["MASKED"] else "unmasked"] += 1
            return _helper(*args, **kwargs)

        monkeypatch.setattr(gm, f"_{name}_tile", spy)
    return counts


def _offset_view(shape: tuple[int, ...], channels_last: bool, device, dtype=torch.float32) -> torch.Tensor:
    """A dense view of `shape` whose data starts one element past an aligned allocation."""
    b, c, h, w = shape
    flat = torch.randn(b * c * h * w + 1, device=device, dtype=dtype)[1:]
    if channels_last:
        return flat.view(b, h, w, c).permute(0, 3, 1, 2)
    return flat.view(shape)


def _check_against_reference(x: torch.Tensor, padding: int, plan: str) -> None:
    """Triton forward and input gradient vs the conv2d reference's (float64 autograd); both
    kernels take the layout `plan`."""
    b, c, h, w = x.shape
    ho, wo = h + 2 * (padding - 1), w + 2 * (padding - 1)
    grad = torch.randn(b, c, ho, wo, device=x.device, dtype=x.dtype)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        grad = grad.to(memory_format=torch.channels_last)  # dL/dM in M's layout, as autograd gives
    assert gm._plan(x) == gm._plan(x, grad) == plan
    y, dx = _fwd_bwd(gradient_map, x, grad, padding, backend="triton")
    y_ref, dx_ref = _fwd_bwd(gradient_map_ref, x.double(), grad.double(), padding)
    if x.dtype == torch.bfloat16:  # fp32 arithmetic on bf16 values, rounded once to bf16
        tol = {"atol": 1e-4, "rtol": 2**-7}
    else:
        tol = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(dx.double(), dx_ref, **tol)


@pytest.mark.parametrize(
    "dtype, w, layout, expected",
    [
        (torch.float32, 128, "contiguous", ("planar", 4)),
        (torch.float32, 100, "contiguous", ("planar", 4)),  # 400-byte rows: 16-byte aligned
        (torch.float32, 130, "contiguous", ("planar", 2)),  # 520-byte rows: 8-byte aligned
        (torch.float32, 77, "contiguous", ("planar", 1)),
        (torch.bfloat16, 128, "contiguous", ("planar", 8)),
        (torch.bfloat16, 100, "contiguous", ("planar", 4)),  # 200-byte rows: 8-byte aligned
        (torch.bfloat16, 77, "contiguous", ("planar", 1)),
        (torch.float64, 77, "contiguous", ("planar", 1)),
        (torch.float64, 100, "contiguous", ("planar", 2)),
        (torch.float32, 100, "channels_last", ("channels_last", 4)),  # rows of 300 fp32
        (torch.bfloat16, 100, "channels_last", ("channels_last", 4)),  # 600-byte rows
        (torch.bfloat16, 128, "channels_last", ("channels_last", 8)),
        (torch.float32, 77, "channels_last", ("channels_last", 1)),
        (torch.float32, 64, "offset", ("planar", 1)),
        (torch.float32, 64, "sliced", ("planar", 1)),
        (torch.float32, 64, "every_other_column", ("strided", 1)),
    ],
    ids=str,
)
def test_layout_and_alignment_class(dtype, w, layout, expected):
    """The launcher's choice of layout and vector width (host-side; no kernel runs)."""
    if layout == "offset":
        x = _offset_view((2, 3, 8, w), False, "cpu", dtype)
    elif layout == "sliced":
        x = torch.zeros(2, 3, 8, w + 5, dtype=dtype)[..., 1 : w + 1]  # rows of 69: unaligned
    elif layout == "every_other_column":
        x = torch.zeros(2, 3, 8, 2 * w, dtype=dtype)[..., ::2]
    else:
        x = torch.zeros(2, 3, 8, w, dtype=dtype)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
    plan = gm._plan(x)
    _, _, cols, _ = gm._geometry(x, plan)
    assert (plan, gm._vec(x, plan, cols)) == expected


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "dtype, w, vec",
    # 48: a multiple of 16; 44: not, rows still 16-byte aligned in fp32; 37: unaligned rows.
    [(torch.float32, 48, 4), (torch.float32, 44, 4), (torch.float32, 37, 1), (torch.bfloat16, 48, 8)],
    ids=str,
)
def test_interior_and_edge_tiles(dtype, w, vec, layout, padding, device, small_tiles, tile_bodies):
    x = torch.randn(1, 3, 12, w, device=device).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    plan = "planar" if layout == "contiguous" else "channels_last"
    assert gm._vec(x, plan, gm._geometry(x, plan)[2]) == vec
    _check_against_reference(x, padding, plan)
    for name in ("fwd", "bwd"):
        assert tile_bodies[name]["unmasked"] > 0 and tile_bodies[name]["masked"] > 0, tile_bodies


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_small_image_only_edge_tiles(layout, padding, device, small_tiles, tile_bodies):
    x = torch.randn(1, 2, 5, 9, device=device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    _check_against_reference(x, padding, "planar" if layout == "contiguous" else "channels_last")
    assert tile_bodies["fwd"]["unmasked"] == tile_bodies["bwd"]["unmasked"] == 0, tile_bodies
    assert tile_bodies["fwd"]["masked"] > 0 and tile_bodies["bwd"]["masked"] > 0


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("layout", ["offset", "offset_channels_last", "every_other_column"])
def test_unaligned_and_strided_views(layout, padding, device, small_tiles, tile_bodies):
    """A view one element past an aligned allocation takes the unaligned class (VEC 1) of its
    layout; a view with a column stride the strided layout; both with interior tiles."""
    if layout == "every_other_column":
        x = torch.randn(1, 3, 12, 80, device=device)[..., ::2]
        plan = "strided"
    else:
        x = _offset_view((1, 3, 12, 40), layout == "offset_channels_last", device)
        plan = "planar" if layout == "offset" else "channels_last"
        assert gm._vec(x, plan, gm._geometry(x, plan)[2]) == 1
    _check_against_reference(x, padding, plan)
    assert tile_bodies["fwd"]["unmasked"] > 0 and tile_bodies["bwd"]["unmasked"] > 0, tile_bodies


@pytest.mark.parametrize("padding", PADDINGS)
def test_unaligned_incoming_gradient(padding, device, small_tiles):
    """x aligned (VEC 4), dL/dM one element off (its VEC 1): each tensor's loads get its own class."""
    x = torch.randn(1, 3, 12, 48, device=device, requires_grad=True)
    ho, wo = 12 + 2 * (padding - 1), 48 + 2 * (padding - 1)
    grad = _offset_view((1, 3, ho, wo), False, device)
    assert gm._vec(grad, "planar", None) == 1 and gm._vec(x, "planar", 48) == 4
    dx = gradient_map_bwd(x.detach(), grad, padding)
    (dx_ref,) = torch.autograd.grad(gradient_map_ref(x.double(), padding), x, grad.double())
    torch.testing.assert_close(dx.double(), dx_ref.double(), atol=1e-5, rtol=1e-5)


class _GradInLayoutOfOutput(torch.autograd.Function):
    """Identity whose backward hands on dL/dy in y's memory format (gradcheck's is contiguous)."""

    @staticmethod
    def forward(ctx, y):
        ctx.channels_last = y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous(memory_format=torch.channels_last) if ctx.channels_last else g


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_fp64_small_tiles(layout, padding, device, small_tiles, tile_bodies):
    """fp64 (VEC 2 when 16-byte aligned) through interior and edge tiles of both layouts."""
    x = torch.randn(1, 2, 10, 40 if layout == "contiguous" else 20, device=device, dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    plan = gm._plan(x)
    assert gm._vec(x, plan, gm._geometry(x, plan)[2]) == 2
    x.requires_grad_(True)

    def fn(t):
        return _GradInLayoutOfOutput.apply(gradient_map(t, padding, backend="triton"))

    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
    assert tile_bodies["fwd"]["unmasked"] > 0 and tile_bodies["bwd"]["unmasked"] > 0, tile_bodies


# --- CUDA only: the compiled kernels, not the interpreter ----------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
# W = 515: unaligned rows; W = 256: 16-byte-aligned rows (vector loads, interior tiles), and the
# same shape one element off (the unaligned class).
@pytest.mark.parametrize(
    "shape, layout",
    [((4, 3, 257, 515), layout) for layout in ("contiguous", "channels_last", "sliced")]
    + [((2, 3, 130, 256), layout) for layout in ("contiguous", "channels_last", "sliced", "offset")],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v,
)
def test_cuda_native_large(shape, layout, dtype, padding):
    if layout == "offset":
        x = _offset_view(shape, False, "cuda", dtype)
    else:
        x = _layout(shape, layout, "cuda", dtype)
    b, c, h, w = shape
    grad = torch.randn(b, c, h + 2 * (padding - 1), w + 2 * (padding - 1), device="cuda", dtype=dtype)
    if layout == "channels_last":
        grad = grad.to(memory_format=torch.channels_last)  # both kernels in the channels_last layout
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_matches_the_reference(backend, device):
    """A gradient penalty through the map (R1-style), against the reference's in float64. Before:
    the Triton path's second backward failed naming an internal op ("no autograd formula was
    registered" for spsr_kernels::gradient_map_bwd), while the torch path worked."""
    dev = device if backend == "triton" else torch.device("cpu")
    x0 = torch.rand(1, 2, 6, 7, dtype=torch.float64)

    def penalty_grad(fn, x):
        x = x.detach().requires_grad_()
        y = fn(x, 2)
        (g,) = torch.autograd.grad((y * y.detach()).sum(), x, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), x)[0]

    want = penalty_grad(gradient_map_ref, x0)
    got = penalty_grad(lambda x, p: gradient_map(x, p, backend=backend), x0.to(dev))
    torch.testing.assert_close(got.cpu(), want, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("when", ["set after the import", "2 (off for triton)"])
def test_interpreter_decision_follows_how_the_kernels_were_built(when):
    """TRITON_INTERPRET is read by @triton.jit once, when spsr_kernels is imported. Before: a
    value set after the import, or one triton reads as off ("2"), made backend="auto" send CPU
    tensors to the compiled kernels: "RuntimeError: 0 active drivers ([])"."""
    import os
    import subprocess
    import sys

    script = (
        "import os, torch\n"
        "from spsr_kernels import gradient_map, gradient_map_ref, info_nce, info_nce_ref\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "x = torch.rand(1, 2, 5, 6)\n"
        "torch.testing.assert_close(gradient_map(x, 2), gradient_map_ref(x.double(), 2).float())\n"
        "p, k = torch.randn(1, 3, 8), torch.randn(1, 5, 8)\n"
        "pos = torch.tensor([[0, 1, 2]])\n"
        "torch.testing.assert_close(info_nce(p, k, pos), info_nce_ref(p.double(), k.double(), pos).float())\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if when.startswith("2"):
        env["TRITON_INTERPRET"] = "2"
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
