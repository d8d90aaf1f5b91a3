"""Fused gradient map (docs/method.md §1): M = sqrt(v² + h² + 1e-6) of per-channel central differences.

For x (B, C, H, W), per channel, zero padding outside the image:

    v[i, j] = x[i+1, j] - x[i-1, j]        h[i, j] = x[i, j+1] - x[i, j-1]
    M[i, j] = sqrt(v² + h² + 1e-6)

padding=1 gives the same-size map (B, C, H, W); padding=2 gives (B, C, H+2, W+2), whose output
(i, j) is centred on input (i-1, j-1) and whose outer ring sees the zero padding.

Layout (the same for every op): Triton kernels → launchers (registered ``torch.library.custom_op``s with
fake implementations, so ``torch.compile`` can trace models that use them) → ``GradientMapFunction``
→ ``gradient_map`` → ``GradientMap`` → ``gradient_map_ref`` (the conv2d formulation of the public SPSR code).

The forward kernel reads x once and writes M; the backward kernel recomputes v, h, M from x and
dL/dM, so the autograd graph saves nothing but x. Both tile (H, W) in 2-D per (batch, channel)
plane, handle the halo with masks (no padded copy) and take arbitrary strides, so channels_last
and sliced inputs are used in place.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ._triton import tl, triton  # stand-ins without triton: PyTorch paths only
from ._utils import BACKENDS, check_float, check_same_device, interpreter_active, resolve_backend

EPS = 1e-6
PADDINGS = (1, 2)


@triton.jit
def _gradient_map_fwd_kernel(
    x_ptr,
    m_ptr,
    C,
    H,
    W,
    HO,
    WO,
    sxb,
    sxc,
    sxh,
    sxw,
    smb,
    smc,
    smh,
    smw,
    tiles_w,
    tiles_per_plane,
    EPS_C: tl.constexpr,
    SHIFT: tl.constexpr,  # padding - 1: output (i, j) is centred on input (i - SHIFT, j - SHIFT)
    FP64: tl.constexpr,  # accumulate in float64 (gradcheck); every other dtype accumulates in fp32
    INT64_INDEX: tl.constexpr,  # in-plane offsets may pass 2**31 elements: 64-bit address math
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # One program = one (BLOCK_H, BLOCK_W) output tile of one (b, c) plane. A 1-D grid keeps the
    # tiles of a plane adjacent in launch order, so halo rows are re-read from L2, not HBM.
    pid = tl.program_id(0)
    plane = pid // tiles_per_plane
    tile = pid % tiles_per_plane
    b = plane // C
    c = plane % C
    x_base = x_ptr + b.to(tl.int64) * sxb + c.to(tl.int64) * sxc
    m_base = m_ptr + b.to(tl.int64) * smb + c.to(tl.int64) * smc

    row0 = (tile // tiles_w) * BLOCK_H
    col0 = (tile % tiles_w) * BLOCK_W
    if INT64_INDEX:
        row0 = row0.to(tl.int64)
        col0 = col0.to(tl.int64)
    oi = row0 + tl.arange(0, BLOCK_H)[:, None]
    oj = col0 + tl.arange(0, BLOCK_W)[None, :]
    ci = oi - SHIFT
    cj = oj - SHIFT

    # Zero padding: every out-of-image neighbour is a masked load with other=0.
    row_c = (ci >= 0) & (ci < H)
    col_c = (cj >= 0) & (cj < W)
    row_u = (ci >= 1) & (ci <= H)  # ci - 1 in [0, H)
    row_d = (ci >= -1) & (ci < H - 1)  # ci + 1 in [0, H)
    col_l = (cj >= 1) & (cj <= W)
    col_r = (cj >= -1) & (cj < W - 1)

    x_up = tl.load(x_base + (ci - 1) * sxh + cj * sxw, mask=row_u & col_c, other=0.0)
    x_dn = tl.load(x_base + (ci + 1) * sxh + cj * sxw, mask=row_d & col_c, other=0.0)
    x_lf = tl.load(x_base + ci * sxh + (cj - 1) * sxw, mask=row_c & col_l, other=0.0)
    x_rt = tl.load(x_base + ci * sxh + (cj + 1) * sxw, mask=row_c & col_r, other=0.0)

    acc_ty: tl.constexpr = tl.float64 if FP64 else tl.float32
    v = x_dn.to(acc_ty) - x_up.to(acc_ty)
    h = x_rt.to(acc_ty) - x_lf.to(acc_ty)
    m = tl.sqrt(v * v + h * h + EPS_C)

    out_mask = (oi < HO) & (oj < WO)
    tl.store(m_base + oi * smh + oj * smw, m.to(m_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _gradient_map_bwd_kernel(
    x_ptr,
    g_ptr,
    dx_ptr,
    C,
    H,
    W,
    HO,
    WO,
    sxb,
    sxc,
    sxh,
    sxw,
    sgb,
    sgc,
    sgh,
    sgw,
    sdb,
    sdc,
    sdh,
    sdw,
    tiles_w,
    tiles_per_plane,
    EPS_C: tl.constexpr,
    SHIFT: tl.constexpr,
    FP64: tl.constexpr,
    INT64_INDEX: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # dx[a, b] = gv[o-1, p] - gv[o+1, p] + gh[o, p-1] - gh[o, p+1] with (o, p) = (a, b) + SHIFT
    # the output position centred on input (a, b), gv = g·v/M, gh = g·h/M. The four output
    # neighbours are centred on inputs (a∓1, b) and (a, b∓1); their stencils touch 9 distinct
    # inputs: the centre, (a±2, b), (a, b±2) and the 4 diagonals. v, h, M are recomputed from
    # those, so the forward saves nothing but x.
    pid = tl.program_id(0)
    plane = pid // tiles_per_plane
    tile = pid % tiles_per_plane
    bb = plane // C
    c = plane % C
    x_base = x_ptr + bb.to(tl.int64) * sxb + c.to(tl.int64) * sxc
    g_base = g_ptr + bb.to(tl.int64) * sgb + c.to(tl.int64) * sgc
    dx_base = dx_ptr + bb.to(tl.int64) * sdb + c.to(tl.int64) * sdc

    row0 = (tile // tiles_w) * BLOCK_H
    col0 = (tile % tiles_w) * BLOCK_W
    if INT64_INDEX:
        row0 = row0.to(tl.int64)
        col0 = col0.to(tl.int64)
    a = row0 + tl.arange(0, BLOCK_H)[:, None]
    b = col0 + tl.arange(0, BLOCK_W)[None, :]

    r_m2 = (a >= 2) & (a < H + 2)
    r_m1 = (a >= 1) & (a < H + 1)
    r_0 = (a >= 0) & (a < H)
    r_p1 = (a >= -1) & (a < H - 1)
    r_p2 = (a >= -2) & (a < H - 2)
    c_m2 = (b >= 2) & (b < W + 2)
    c_m1 = (b >= 1) & (b < W + 1)
    c_0 = (b >= 0) & (b < W)
    c_p1 = (b >= -1) & (b < W - 1)
    c_p2 = (b >= -2) & (b < W - 2)

    acc_ty: tl.constexpr = tl.float64 if FP64 else tl.float32
    x_c = tl.load(x_base + a * sxh + b * sxw, mask=r_0 & c_0, other=0.0).to(acc_ty)
    x_n2 = tl.load(x_base + (a - 2) * sxh + b * sxw, mask=r_m2 & c_0, other=0.0).to(acc_ty)
    x_s2 = tl.load(x_base + (a + 2) * sxh + b * sxw, mask=r_p2 & c_0, other=0.0).to(acc_ty)
    x_w2 = tl.load(x_base + a * sxh + (b - 2) * sxw, mask=r_0 & c_m2, other=0.0).to(acc_ty)
    x_e2 = tl.load(x_base + a * sxh + (b + 2) * sxw, mask=r_0 & c_p2, other=0.0).to(acc_ty)
    x_nw = tl.load(x_base + (a - 1) * sxh + (b - 1) * sxw, mask=r_m1 & c_m1, other=0.0).to(acc_ty)
    x_ne = tl.load(x_base + (a - 1) * sxh + (b + 1) * sxw, mask=r_m1 & c_p1, other=0.0).to(acc_ty)
    x_sw = tl.load(x_base + (a + 1) * sxh + (b - 1) * sxw, mask=r_p1 & c_m1, other=0.0).to(acc_ty)
    x_se = tl.load(x_base + (a + 1) * sxh + (b + 1) * sxw, mask=r_p1 & c_p1, other=0.0).to(acc_ty)

    # Incoming gradient at the four neighbouring output positions; outside the output grid the
    # term does not exist, which a zero g expresses.
    o = a + SHIFT
    p = b + SHIFT
    go_r_m1 = (o >= 1) & (o < HO + 1)
    go_r_0 = (o >= 0) & (o < HO)
    go_r_p1 = (o >= -1) & (o < HO - 1)
    go_c_m1 = (p >= 1) & (p < WO + 1)
    go_c_0 = (p >= 0) & (p < WO)
    go_c_p1 = (p >= -1) & (p < WO - 1)
    g_n = tl.load(g_base + (o - 1) * sgh + p * sgw, mask=go_r_m1 & go_c_0, other=0.0).to(acc_ty)
    g_s = tl.load(g_base + (o + 1) * sgh + p * sgw, mask=go_r_p1 & go_c_0, other=0.0).to(acc_ty)
    g_w = tl.load(g_base + o * sgh + (p - 1) * sgw, mask=go_r_0 & go_c_m1, other=0.0).to(acc_ty)
    g_e = tl.load(g_base + o * sgh + (p + 1) * sgw, mask=go_r_0 & go_c_p1, other=0.0).to(acc_ty)

    # rsqrt, not sqrt + divide: at HBM speed the backward needs ~280 G elements/s on an H100 and
    # sqrt.approx + div.full cost 3 special-function ops per neighbour (12 per element), close
    # to the SFU's throughput; rsqrt costs 1. fp64 (gradcheck) keeps the exact form.
    # North neighbour, centred on (a-1, b): contributes +gv.
    v_n = x_c - x_n2
    h_n = x_ne - x_nw
    r_n = v_n * v_n + h_n * h_n + EPS_C
    term = g_n * v_n * (1.0 / tl.sqrt(r_n) if FP64 else tl.math.rsqrt(r_n))
    # South neighbour, centred on (a+1, b): contributes -gv.
    v_s = x_s2 - x_c
    h_s = x_se - x_sw
    r_s = v_s * v_s + h_s * h_s + EPS_C
    term -= g_s * v_s * (1.0 / tl.sqrt(r_s) if FP64 else tl.math.rsqrt(r_s))
    # West neighbour, centred on (a, b-1): contributes +gh.
    v_w = x_sw - x_nw
    h_w = x_c - x_w2
    r_w = v_w * v_w + h_w * h_w + EPS_C
    term += g_w * h_w * (1.0 / tl.sqrt(r_w) if FP64 else tl.math.rsqrt(r_w))
    # East neighbour, centred on (a, b+1): contributes -gh.
    v_e = x_se - x_ne
    h_e = x_e2 - x_c
    r_e = v_e * v_e + h_e * h_e + EPS_C
    term -= g_e * h_e * (1.0 / tl.sqrt(r_e) if FP64 else tl.math.rsqrt(r_e))

    tl.store(dx_base + a * sdh + b * sdw, term.to(dx_ptr.dtype.element_ty), mask=r_0 & c_0)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _check_inputs(op: str, x: torch.Tensor, padding: int) -> None:
    check_float(op, "x", x)
    if x.dim() != 4:
        raise ValueError(
            f"{op}: x must be 4-D (B, C, H, W), got shape {tuple(x.shape)}; add batch/channel dims"
        )
    if isinstance(padding, bool) or padding not in PADDINGS:
        raise ValueError(
            f"{op}: padding={padding!r} is not supported; use 1 (same-size map) or 2 (padded map, H+2 x W+2)"
        )


def _out_hw(h: int, w: int, padding: int) -> tuple[int, int]:
    return h + 2 * (padding - 1), w + 2 * (padding - 1)


def _empty_like_layout(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Uninitialised tensor of `shape` in x's memory format (channels_last stays channels_last)."""
    fmt = torch.contiguous_format
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def _on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device; make that t's device (cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _needs_int64(*tensors: torch.Tensor) -> bool:
    """True when a row·stride_h + col·stride_w offset (2-pixel halo included) can pass int32.

    Batch and channel offsets are always 64-bit in the kernels; in-plane offsets are 32-bit unless
    a plane spans 2**31 elements or more (huge planes, channels_last with many channels, strided views).
    """
    return any(
        (t.shape[2] + 2) * abs(t.stride(2)) + (t.shape[3] + 2) * abs(t.stride(3)) >= 2**31 for t in tensors
    )


def _block_sizes(rows: int, cols: int, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_W, num_warps) for a rows x cols plane."""
    if interpreter_active():
        # Each interpreted program costs milliseconds: few, large tiles.
        return min(256, triton.next_power_of_2(rows)), min(256, triton.next_power_of_2(cols)), 4
    # 64 contiguous columns: 256 B fp32 rows (16 B vector accesses when W is a multiple of 16
    # and padding is 1). With 8 warps per tile triton 3.8's ptxas for sm_90 gives the forward
    # 48-54 registers per thread and the backward (13 live values per element) 75-80, no spills
    # (tests/test_kernels_aot.py): enough warps resident per SM for a memory-bound stencil.
    # Halo rows come from L1/L2, not HBM. Untimed on a GPU so far: tune with the benchmark.
    block_w = min(64, max(16, triton.next_power_of_2(cols)))
    block_h = min(max(1, (1024 if backward else 2048) // block_w), triton.next_power_of_2(rows))
    return block_h, block_w, 8


@torch.library.custom_op("spsr_kernels::gradient_map_fwd", mutates_args=())
def gradient_map_fwd(x: torch.Tensor, padding: int) -> torch.Tensor:
    """Triton forward. x: (B, C, H, W) float (any strides) → M: (B, C, H', W'), x's dtype.

    H', W' = H, W for padding 1 and H+2, W+2 for padding 2. Registered as
    ``torch.ops.spsr_kernels.gradient_map_fwd``; call it through ``gradient_map`` for autograd
    and dispatch.
    """
    _check_inputs("gradient_map_fwd", x, padding)
    bsz, ch, h, w = x.shape
    ho, wo = _out_hw(h, w, padding)
    m = _empty_like_layout(x, (bsz, ch, ho, wo))
    if m.numel() == 0:
        return m
    block_h, block_w, num_warps = _block_sizes(ho, wo, backward=False)
    tiles_w = triton.cdiv(wo, block_w)
    tiles_per_plane = triton.cdiv(ho, block_h) * tiles_w
    grid = (bsz * ch * tiles_per_plane,)
    with _on_device(x):
        _gradient_map_fwd_kernel[grid](
            x, m, ch, h, w, ho, wo,
            *x.stride(), *m.stride(),
            tiles_w, tiles_per_plane,
            EPS_C=EPS, SHIFT=padding - 1, FP64=x.dtype == torch.float64, INT64_INDEX=_needs_int64(x, m),
            BLOCK_H=block_h, BLOCK_W=block_w, num_warps=num_warps,
        )  # fmt: skip
    return m


@torch.library.custom_op("spsr_kernels::gradient_map_bwd", mutates_args=())
def gradient_map_bwd(x: torch.Tensor, grad_m: torch.Tensor, padding: int) -> torch.Tensor:
    """Triton backward. x: (B, C, H, W), grad_m = dL/dM: (B, C, H', W') → dL/dx (B, C, H, W).

    Recomputes v, h, M from x; any strides for both inputs (an expanded, stride-0 grad_m is fine).
    dL/dx has x's dtype and memory format.
    """
    _check_inputs("gradient_map_bwd", x, padding)
    check_float("gradient_map_bwd", "grad_m", grad_m)
    check_same_device("gradient_map_bwd", x=x, grad_m=grad_m)
    bsz, ch, h, w = x.shape
    ho, wo = _out_hw(h, w, padding)
    if tuple(grad_m.shape) != (bsz, ch, ho, wo):
        raise ValueError(
            f"gradient_map_bwd: grad_m has shape {tuple(grad_m.shape)}, expected {(bsz, ch, ho, wo)} "
            f"for x of shape {tuple(x.shape)} and padding={padding}"
        )
    dx = _empty_like_layout(x, (bsz, ch, h, w))
    if dx.numel() == 0:
        return dx
    block_h, block_w, num_warps = _block_sizes(h, w, backward=True)
    tiles_w = triton.cdiv(w, block_w)
    tiles_per_plane = triton.cdiv(h, block_h) * tiles_w
    grid = (bsz * ch * tiles_per_plane,)
    with _on_device(x):
        _gradient_map_bwd_kernel[grid](
            x, grad_m, dx, ch, h, w, ho, wo,
            *x.stride(), *grad_m.stride(), *dx.stride(),
            tiles_w, tiles_per_plane,
            EPS_C=EPS, SHIFT=padding - 1, FP64=x.dtype == torch.float64,
            INT64_INDEX=_needs_int64(x, grad_m, dx),
            BLOCK_H=block_h, BLOCK_W=block_w, num_warps=num_warps,
        )  # fmt: skip
    return dx


# The ops are opaque to torch.compile (a custom_op, not a triton_op): the kernel is already fused,
# and triton_op cannot trace kernels under TRITON_INTERPRET, which is how CI runs them. The fake
# implementations give compile the output shapes and layouts without launching anything.
@gradient_map_fwd.register_fake
def _(x: torch.Tensor, padding: int) -> torch.Tensor:
    _check_inputs("gradient_map_fwd", x, padding)
    bsz, ch, h, w = x.shape
    return _empty_like_layout(x, (bsz, ch, *_out_hw(h, w, padding)))


@gradient_map_bwd.register_fake
def _(x: torch.Tensor, grad_m: torch.Tensor, padding: int) -> torch.Tensor:
    _check_inputs("gradient_map_bwd", x, padding)
    check_same_device("gradient_map_bwd", x=x, grad_m=grad_m)
    return _empty_like_layout(x, tuple(x.shape))


# --------------------------------------------------------------------------------------------
# Autograd, functional API, module
# --------------------------------------------------------------------------------------------


class GradientMapFunction(torch.autograd.Function):
    """Autograd for the Triton path: saves only x; the backward kernel recomputes v, h, M."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, padding: int) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.padding = padding
        return gradient_map_fwd(x, padding)

    @staticmethod
    def backward(ctx, grad_m: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        (x,) = ctx.saved_tensors
        grad_x = gradient_map_bwd(x, grad_m, ctx.padding) if ctx.needs_input_grad[0] else None
        return grad_x, None


def _gradient_map_torch(x: torch.Tensor, padding: int) -> torch.Tensor:
    """Slice-subtract formulation (F.pad + slicing + sqrt): what torch.compile fuses well.

    Computes in fp32 for fp16/bf16 inputs (the kernels' accumulation rule) and returns x's dtype.
    """
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    xp = F.pad(xf, (padding, padding, padding, padding))
    v = xp[:, :, 2:, 1:-1] - xp[:, :, :-2, 1:-1]
    h = xp[:, :, 1:-1, 2:] - xp[:, :, 1:-1, :-2]
    return torch.sqrt(v * v + h * h + EPS).to(x.dtype)


def gradient_map(x: torch.Tensor, padding: int = 1, *, backend: str = "auto") -> torch.Tensor:
    """Gradient-magnitude map of docs/method.md §1, per channel, differentiable.

    Args:
        x: (B, C, H, W) float32, float16 or bfloat16 (float64 for gradcheck); any strides
            (channels_last and sliced views are read in place).
        padding: 1 → output (B, C, H, W) (the "same-size" map the gradient branch sees);
            2 → output (B, C, H+2, W+2) (the padded map of the gradient loss and gradient D;
            output (i, j) is centred on input (i-1, j-1)).
        backend: "auto" (CUDA → Triton; CPU → PyTorch, or Triton in the interpreter when
            TRITON_INTERPRET=1), "triton" or "torch" to force a path.

    Returns:
        M = sqrt(v² + h² + 1e-6), x's dtype, computed in fp32 (fp64 for fp64 input).
        v[i, j] = x[i+1, j] - x[i-1, j], h[i, j] = x[i, j+1] - x[i, j-1], zeros outside the image.
    """
    _check_inputs("gradient_map", x, padding)
    if resolve_backend(backend, x, op="gradient_map") == "torch":
        return _gradient_map_torch(x, padding)
    return GradientMapFunction.apply(x, padding)


class GradientMap(nn.Module):
    """Module form of ``gradient_map``: (B, C, H, W) → (B, C, H, W) or (B, C, H+2, W+2)."""

    def __init__(self, padding: int = 1, *, backend: str = "auto") -> None:
        super().__init__()
        if isinstance(padding, bool) or padding not in PADDINGS:
            raise ValueError(f"GradientMap: padding={padding!r} is not supported; use 1 or 2")
        if backend not in BACKENDS:
            raise ValueError(f"GradientMap: backend={backend!r} is not one of {BACKENDS}")
        self.padding = padding
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gradient_map(x, self.padding, backend=self.backend)

    def extra_repr(self) -> str:
        return f"padding={self.padding}, backend={self.backend!r}"


def gradient_map_ref(x: torch.Tensor, padding: int = 1, *, backend: str = "auto") -> torch.Tensor:
    """Reference: the public SPSR code's conv2d formulation, in x's dtype (no upcast).

    Fixed per-channel 3×3 kernels [[0,-1,0],[0,0,0],[0,1,0]] (v) and [[0,0,0],[-1,0,1],[0,0,0]]
    (h), conv2d with the given padding (1 or 2). Same signature as ``gradient_map``; `backend`
    is accepted for interchangeability and ignored.
    """
    _check_inputs("gradient_map_ref", x, padding)
    if backend not in BACKENDS:
        raise ValueError(f"gradient_map_ref: backend={backend!r} is not one of {BACKENDS}")
    ch = x.shape[1]
    kv = torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=x.dtype, device=x.device)
    kh = torch.tensor([[0.0, 0.0, 0.0], [-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=x.dtype, device=x.device)
    v = F.conv2d(x, kv.expand(ch, 1, 3, 3), padding=padding, groups=ch)
    h = F.conv2d(x, kh.expand(ch, 1, 3, 3), padding=padding, groups=ch)
    return torch.sqrt(v * v + h * h + EPS)
