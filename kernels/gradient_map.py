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
dL/dM, so the autograd graph saves nothing but x. Both tile 2-D planes (one per (batch, channel),
or one per image of W·C contiguous columns for channels_last), handle the halo with masks (no
padded copy) and take arbitrary strides, so channels_last and sliced inputs are used in place;
rows aligned to 16 bytes get 128-bit loads (the "Kernels" comment below).
"""

from __future__ import annotations

import contextlib
import operator

import torch
import torch.nn.functional as F
from torch import nn

from ._triton import tl, triton  # stand-ins without triton: PyTorch paths only
from ._utils import (
    BACKENDS,
    check_float,
    check_same_device,
    interpreter_active,
    resolve_backend,
)

EPS = 1e-6
PADDINGS = (1, 2)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
#
# Both kernels see every tensor as planes of rows × columns, in one of three layouts (the launcher
# picks one per call, `_plan`, from the strides of all the tensors of the call):
#
# - "planar" (UNIT_COL, not FLAT): unit stride along W (contiguous NCHW, and views that keep rows
#   contiguous). One plane per (image, channel); the column neighbour is NB = 1 element away.
# - "channels_last" (UNIT_COL and FLAT): stride 1 along C and C along W. One plane per image whose
#   rows are W·C contiguous elements; the column neighbour is NB = C elements away (the left one
#   exists iff flat column >= C, the right one iff < (W-1)·C: no division).
# - "strided" (neither): anything else (a view with a column stride, a stride-0 incoming gradient,
#   mixed layouts). One plane per (image, channel), runtime column strides, no vector loads.
#
# Alignment (docs/kernels_gradient_map.md, "Compiled code"). Tiles are indexed by input
# coordinates, their first column a multiple of VEC; for padding 2 the output is written one row
# and NB columns further on (scalar stores). The loads at a tile's own columns (forward x[i±1, j];
# backward x[i, j], x[i±2, j], and dL/dM at column j) are then aligned vectors whenever the
# tensor's rows are: VEC > 1 means the launcher checked that the pointer, the plane and row strides
# and the row length are multiples of VEC elements (VEC·size = 16 or 8 bytes, `_vec`), and
# `_multiple` / tl.multiple_of show that to the compiler. The column neighbours (j±NB) are
# misaligned by construction and stay scalar (x[i, j±2] of the fp32 backward: 64-bit).
#
# Specialisation: the integer arguments and the pointers are not specialised by the JIT
# (do_not_specialize: no "== 1" / "% 16" variants), so every image size of one alignment class
# (VEC) shares one compiled kernel; NB is a constexpr (the neighbour offsets become immediates:
# the channels_last kernels compile once per channel count, 3 for images).
#
# Each program takes one of two tile bodies: a tile whose whole halo lies inside the image takes the
# unmasked one (no mask arithmetic, no predicated loads); edge tiles take the masked one, whose
# zero-padding masks are constant over VEC columns (the row length is a multiple of VEC), so its
# aligned loads vectorise as well.

_FWD_DO_NOT_SPECIALIZE = (
    "x_ptr", "m_ptr", "n_inner", "H", "COLS",
    "sxb", "sxc", "sxh", "sxw", "smb", "smc", "smh", "smw", "tiles_w", "tiles_per_plane",
)  # fmt: skip
_BWD_DO_NOT_SPECIALIZE = (
    "x_ptr", "g_ptr", "dx_ptr", "n_inner", "H", "COLS",
    "sxb", "sxc", "sxh", "sxw", "sgb", "sgc", "sgh", "sgw", "sdb", "sdc", "sdh", "sdw",
    "tiles_w", "tiles_per_plane",
)  # fmt: skip


@triton.jit
def _multiple(v, VEC: tl.constexpr):
    """v, which the launcher checked to be a multiple of VEC, in a form whose divisibility the
    compiler's alignment analysis sees (an unspecialised argument has none)."""
    if VEC > 1:
        v = v // VEC * VEC
    return v


@triton.jit
def _plane_base(ptr, b, c, sb, sc, FLAT: tl.constexpr, VEC: tl.constexpr):
    """Pointer to plane (b, c) (FLAT: image b); 64-bit offsets; aligned to VEC elements when VEC > 1."""
    base = ptr + b.to(tl.int64) * _multiple(sb, VEC)
    if not FLAT:
        base += c.to(tl.int64) * _multiple(sc, VEC)
    if VEC > 1:
        base = tl.multiple_of(base, VEC * (ptr.dtype.element_ty.primitive_bitwidth // 8))
    return base


@triton.jit
def _fwd_tile(
    x_base, m_base, row0, col0, H, COLS, nb: tl.constexpr, sxh, sxw, smh, smw,
    EPS_C: tl.constexpr, SHIFT: tl.constexpr, FP64: tl.constexpr, UNIT_COL: tl.constexpr,
    MASKED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    # Output (ci + SHIFT, cj + SHIFT·nb) of the input-coordinate tile (ci, cj) (cj: flat column).
    ci = row0 + tl.arange(0, BLOCK_H)[:, None]
    cj = col0 + tl.arange(0, BLOCK_W)[None, :]
    if UNIT_COL:
        xj = cj
        xd = nb
        mj = cj + SHIFT * nb
    else:
        xj = cj * sxw
        xd = sxw
        mj = (cj + SHIFT) * smw
    # Addresses relative to the centre: one per element, the neighbours at uniform offsets.
    centre = x_base + ci * sxh + xj
    if MASKED:
        # Zero padding: every out-of-image neighbour is a masked load with other=0.
        row_c = (ci >= 0) & (ci < H)
        col_c = (cj >= 0) & (cj < COLS)
        x_up = tl.load(centre - sxh, mask=(ci >= 1) & (ci <= H) & col_c, other=0.0)
        x_dn = tl.load(centre + sxh, mask=(ci >= -1) & (ci < H - 1) & col_c, other=0.0)
        x_lf = tl.load(centre - xd, mask=row_c & (cj >= nb) & (cj < COLS + nb), other=0.0)
        x_rt = tl.load(centre + xd, mask=row_c & (cj >= -nb) & (cj < COLS - nb), other=0.0)
    else:
        x_up = tl.load(centre - sxh)
        x_dn = tl.load(centre + sxh)
        x_lf = tl.load(centre - xd)
        x_rt = tl.load(centre + xd)

    acc_ty: tl.constexpr = tl.float64 if FP64 else tl.float32
    v = x_dn.to(acc_ty) - x_up.to(acc_ty)
    h = x_rt.to(acc_ty) - x_lf.to(acc_ty)
    m = tl.sqrt(v * v + h * h + EPS_C).to(m_base.dtype.element_ty)

    out = m_base + (ci + SHIFT) * smh + mj
    if MASKED:
        in_out = (ci >= -SHIFT) & (ci < H + SHIFT) & (cj >= -SHIFT * nb) & (cj < COLS + SHIFT * nb)
        tl.store(out, m, mask=in_out)
    else:
        tl.store(out, m)


@triton.jit(do_not_specialize=_FWD_DO_NOT_SPECIALIZE)
def _gradient_map_fwd_kernel(
    x_ptr,
    m_ptr,
    n_inner,  # planes per image: C, or 1 (FLAT)
    H,
    COLS,  # columns of an input plane: W, or W·C (FLAT)
    NB: tl.constexpr,  # column distance of the left/right neighbour: 1, or C (FLAT)
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
    FLAT: tl.constexpr,  # channels_last: one plane per image, rows of W·C elements
    UNIT_COL: tl.constexpr,  # unit column stride (planar or FLAT); else the strided layout
    VEC: tl.constexpr,  # x (and for padding 1 m) aligned to VEC elements; 1: no alignment known
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # One program = one (BLOCK_H, BLOCK_W) tile of one plane. A 1-D grid keeps the tiles of a
    # plane adjacent in launch order, so halo rows are re-read from L2, not HBM.
    pid = tl.program_id(0)
    plane = pid // tiles_per_plane
    tile = pid - plane * tiles_per_plane
    if FLAT:
        b = plane
        c = 0  # unused: one plane per image
    else:
        b = plane // n_inner
        c = plane - b * n_inner
    x_base = _plane_base(x_ptr, b, c, sxb, sxc, FLAT, VEC)
    # Padding 1 stores at the loads' columns: m shares the alignment. Padding 2 stores one column
    # (NB) further on: misaligned whatever m's strides, so no claim is made about m.
    m_vec: tl.constexpr = VEC if SHIFT == 0 else 1
    m_base = _plane_base(m_ptr, b, c, smb, smc, FLAT, m_vec)
    sxh = _multiple(sxh, VEC)
    smh = _multiple(smh, m_vec)
    COLS = _multiple(COLS, VEC)  # the masks' bound: constant over VEC columns

    # Input-coordinate tiles: rows from -SHIFT, columns from -lead (the padding-2 ring rounded out
    # to VEC columns, so col0 stays a multiple of VEC); gradient_map_fwd computes the same lead.
    lead: tl.constexpr = (SHIFT * NB + VEC - 1) // VEC * VEC
    tile_r = tile // tiles_w
    row0 = tile_r * BLOCK_H - SHIFT
    col0 = (tile - tile_r * tiles_w) * BLOCK_W - lead
    if INT64_INDEX:
        row0 = row0.to(tl.int64)
        col0 = col0.to(tl.int64)
    interior = (row0 >= 1) & (row0 + BLOCK_H < H) & (col0 >= NB) & (col0 + BLOCK_W + NB <= COLS)
    if interior:
        _fwd_tile(
            x_base, m_base, row0, col0, H, COLS, NB, sxh, sxw, smh, smw,
            EPS_C, SHIFT, FP64, UNIT_COL, MASKED=False, BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W,
        )  # fmt: skip
    else:
        _fwd_tile(
            x_base, m_base, row0, col0, H, COLS, NB, sxh, sxw, smh, smw,
            EPS_C, SHIFT, FP64, UNIT_COL, MASKED=True, BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W,
        )  # fmt: skip


@triton.jit
def _bwd_tile(
    x_base, g_base, dx_base, a0, b0, H, COLS, nb: tl.constexpr, sxh, sxw, sgh, sgw, sdh, sdw,
    EPS_C: tl.constexpr, SHIFT: tl.constexpr, FP64: tl.constexpr, UNIT_COL: tl.constexpr,
    MASKED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    # dx[a, b] = gv[o-1, p] - gv[o+1, p] + gh[o, p-1] - gh[o, p+1] with (o, p) = (a, b) + SHIFT
    # the output position centred on input (a, b), gv = g·v/M, gh = g·h/M. The four output
    # neighbours are centred on inputs (a∓1, b) and (a, b∓1); their stencils touch 9 distinct
    # inputs: the centre, (a±2, b), (a, b±2) and the 4 diagonals. v, h, M are recomputed from
    # those, so the forward saves nothing but x. Columns are flat (b·C + c) when FLAT, where the
    # column neighbour is nb = C away.
    a = a0 + tl.arange(0, BLOCK_H)[:, None]
    b = b0 + tl.arange(0, BLOCK_W)[None, :]
    if UNIT_COL:
        xj = b
        xd = nb
        gj = b + SHIFT * nb
        gd = nb
        dj = b
    else:
        xj = b * sxw
        xd = sxw
        gj = (b + SHIFT) * sgw
        gd = sgw
        dj = b * sdw
    if MASKED:
        # a, b >= 0 in every tile; lanes outside the image (a >= H or b >= COLS) store nothing, so
        # each mask is `inside` and'ed with the neighbour's own condition. (Masks before
        # addresses: a common prefix of the two bodies is hoisted above the branch, and 13 addresses
        # per element live across the mask computation took the strided layout from 80 registers
        # to 120.)
        inside = (a < H) & (b < COLS)
        up1 = a >= 1
        dn1 = a < H - 1
        lf1 = b >= nb
        rt1 = b < COLS - nb
    # Addresses relative to the centre: one per element, the neighbours at uniform offsets.
    p_c = x_base + a * sxh + xj
    p_n2 = p_c - 2 * sxh
    p_s2 = p_c + 2 * sxh
    p_w2 = p_c - 2 * xd
    p_e2 = p_c + 2 * xd
    p_nw = p_c - (sxh + xd)
    p_ne = p_c - (sxh - xd)
    p_sw = p_c + (sxh - xd)
    p_se = p_c + (sxh + xd)
    # Incoming gradient at the four neighbouring output positions (o∓1, p) and (o, p∓nb), around
    # the output position (o, p) = (a + SHIFT, b + SHIFT·nb) centred on input (a, b).
    q_c = g_base + (a + SHIFT) * sgh + gj
    q_n = q_c - sgh
    q_s = q_c + sgh
    q_w = q_c - gd
    q_e = q_c + gd

    acc_ty: tl.constexpr = tl.float64 if FP64 else tl.float32
    if MASKED:
        x_c = tl.load(p_c, mask=inside, other=0.0).to(acc_ty)
        x_n2 = tl.load(p_n2, mask=inside & (a >= 2), other=0.0).to(acc_ty)
        x_s2 = tl.load(p_s2, mask=inside & (a < H - 2), other=0.0).to(acc_ty)
        x_w2 = tl.load(p_w2, mask=inside & (b >= 2 * nb), other=0.0).to(acc_ty)
        x_e2 = tl.load(p_e2, mask=inside & (b < COLS - 2 * nb), other=0.0).to(acc_ty)
        x_nw = tl.load(p_nw, mask=inside & up1 & lf1, other=0.0).to(acc_ty)
        x_ne = tl.load(p_ne, mask=inside & up1 & rt1, other=0.0).to(acc_ty)
        x_sw = tl.load(p_sw, mask=inside & dn1 & lf1, other=0.0).to(acc_ty)
        x_se = tl.load(p_se, mask=inside & dn1 & rt1, other=0.0).to(acc_ty)
        if SHIFT == 0:
            # Same-size map: a neighbour outside the output grid has no term, which a zero g expresses.
            g_n = tl.load(q_n, mask=inside & up1, other=0.0).to(acc_ty)
            g_s = tl.load(q_s, mask=inside & dn1, other=0.0).to(acc_ty)
            g_w = tl.load(q_w, mask=inside & lf1, other=0.0).to(acc_ty)
            g_e = tl.load(q_e, mask=inside & rt1, other=0.0).to(acc_ty)
        else:
            # Padded map: the output ring makes all four neighbours of an image pixel exist.
            g_n = tl.load(q_n, mask=inside, other=0.0).to(acc_ty)
            g_s = tl.load(q_s, mask=inside, other=0.0).to(acc_ty)
            g_w = tl.load(q_w, mask=inside, other=0.0).to(acc_ty)
            g_e = tl.load(q_e, mask=inside, other=0.0).to(acc_ty)
    else:
        x_c = tl.load(p_c).to(acc_ty)
        x_n2 = tl.load(p_n2).to(acc_ty)
        x_s2 = tl.load(p_s2).to(acc_ty)
        x_w2 = tl.load(p_w2).to(acc_ty)
        x_e2 = tl.load(p_e2).to(acc_ty)
        x_nw = tl.load(p_nw).to(acc_ty)
        x_ne = tl.load(p_ne).to(acc_ty)
        x_sw = tl.load(p_sw).to(acc_ty)
        x_se = tl.load(p_se).to(acc_ty)
        g_n = tl.load(q_n).to(acc_ty)
        g_s = tl.load(q_s).to(acc_ty)
        g_w = tl.load(q_w).to(acc_ty)
        g_e = tl.load(q_e).to(acc_ty)

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

    out = dx_base + a * sdh + dj
    if MASKED:
        tl.store(out, term.to(dx_base.dtype.element_ty), mask=inside)
    else:
        tl.store(out, term.to(dx_base.dtype.element_ty))


@triton.jit(do_not_specialize=_BWD_DO_NOT_SPECIALIZE)
def _gradient_map_bwd_kernel(
    x_ptr,
    g_ptr,
    dx_ptr,
    n_inner,
    H,
    COLS,
    NB: tl.constexpr,
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
    FLAT: tl.constexpr,
    UNIT_COL: tl.constexpr,
    VEC: tl.constexpr,  # x and dx aligned to VEC elements (1: no alignment known)
    VEC_G: tl.constexpr,  # the incoming gradient aligned to VEC_G <= VEC elements
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    pid = tl.program_id(0)
    plane = pid // tiles_per_plane
    tile = pid - plane * tiles_per_plane
    if FLAT:
        bb = plane
        c = 0  # unused: one plane per image
    else:
        bb = plane // n_inner
        c = plane - bb * n_inner
    x_base = _plane_base(x_ptr, bb, c, sxb, sxc, FLAT, VEC)
    g_base = _plane_base(g_ptr, bb, c, sgb, sgc, FLAT, VEC_G)
    dx_base = _plane_base(dx_ptr, bb, c, sdb, sdc, FLAT, VEC)
    sxh = _multiple(sxh, VEC)
    sgh = _multiple(sgh, VEC_G)
    sdh = _multiple(sdh, VEC)
    COLS = _multiple(COLS, VEC)

    tile_r = tile // tiles_w
    a0 = tile_r * BLOCK_H
    b0 = (tile - tile_r * tiles_w) * BLOCK_W
    if INT64_INDEX:
        a0 = a0.to(tl.int64)
        b0 = b0.to(tl.int64)
    interior = (a0 >= 2) & (a0 + BLOCK_H + 2 <= H) & (b0 >= 2 * NB) & (b0 + BLOCK_W + 2 * NB <= COLS)
    if interior:
        _bwd_tile(
            x_base, g_base, dx_base, a0, b0, H, COLS, NB, sxh, sxw, sgh, sgw, sdh, sdw,
            EPS_C, SHIFT, FP64, UNIT_COL, MASKED=False, BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W,
        )  # fmt: skip
    else:
        _bwd_tile(
            x_base, g_base, dx_base, a0, b0, H, COLS, NB, sxh, sxw, sgh, sgw, sdh, sdw,
            EPS_C, SHIFT, FP64, UNIT_COL, MASKED=True, BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _check_inputs(op: str, x: torch.Tensor, padding: int) -> None:
    check_float(op, "x", x)
    if x.dim() != 4:
        raise ValueError(
            f"{op}: x must be 4-D (B, C, H, W), got shape {tuple(x.shape)}; add batch/channel dims"
        )
    _check_padding(op, padding)


def _check_padding(op: str, padding: object) -> None:
    try:
        index = operator.index(padding)  # an int (numpy's too); 2.0 is not: F.pad would refuse it later
    except TypeError:
        index = None
    if isinstance(padding, bool) or index not in PADDINGS:
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
    The channels_last layout's flat columns (w·C + c, neighbours included) are within the same
    (W+2)·stride_w term, stride_w being C there.
    """
    return any(
        (t.shape[2] + 2) * abs(t.stride(2)) + (t.shape[3] + 2) * abs(t.stride(3)) >= 2**31 for t in tensors
    )


def _plan(*tensors: torch.Tensor) -> str:
    """The kernels' layout for these same-(B, C)-shaped tensors: "planar" when every one has unit
    stride along W; "channels_last" when every one has stride 1 along C and C along W (C > 1);
    otherwise "strided" (the general path: any strides, scalar loads)."""
    if all(t.stride(3) == 1 for t in tensors):
        return "planar"
    ch = tensors[0].shape[1]
    if ch > 1 and all(t.stride(1) == 1 and t.stride(3) == ch for t in tensors):
        return "channels_last"
    return "strided"


def _vec(t: torch.Tensor, layout: str, cols: int | None) -> int:
    """Elements per aligned vector access of t in `layout`: 16 // size when the data pointer, plane
    and row strides (and `cols`, the masks' row length, unless None) are all multiples of 16 bytes,
    8 // size for 8 bytes, else 1. The kernels are compiled once per value (their alignment class)."""
    if layout == "strided":
        return 1
    size = t.element_size()
    terms = [t.data_ptr(), t.stride(0) * size, t.stride(2) * size]
    if layout == "planar":
        terms.append(t.stride(1) * size)
    if cols is not None:
        terms.append(cols * size)
    for align in (16, 8):
        if align > size and all(v % align == 0 for v in terms):
            return align // size
    return 1


def _geometry(x: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(planes, n_inner, cols, nb): x's planes, planes per image, columns of a plane and the column
    distance of a pixel's left/right neighbour in `layout`."""
    bsz, ch, _, w = x.shape
    if layout == "channels_last":
        return bsz, 1, w * ch, ch
    return bsz * ch, ch, w, 1


def _block_sizes(rows: int, cols: int, backward: bool, vec: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_W, num_warps) for a rows x cols tiled plane whose aligned loads take vec elements."""
    if interpreter_active():
        # Each interpreted program costs milliseconds: few, large tiles.
        return min(256, triton.next_power_of_2(rows)), min(256, triton.next_power_of_2(cols)), 4
    # 64 contiguous columns (256 B of fp32), 8 warps, 8 elements per thread: two 128-bit fp32
    # vectors or one of 8 bf16 per aligned load and thread. The backward (13 loaded values per
    # element) takes 4 per thread, enough for one fp32 vector, except with 8-element vectors
    # (16-byte-aligned bf16/fp16), which need 8. Registers per thread and spills (none) are in
    # docs/kernels_gradient_map.md, checked by tests/test_kernels_aot.py. Halo rows come from
    # L1/L2, not HBM. Untimed on a GPU so far: tune with the benchmark.
    block_w = min(64, max(16, triton.next_power_of_2(cols)))
    per_block = 1024 if backward and vec < 8 else 2048
    block_h = min(max(1, per_block // block_w), triton.next_power_of_2(rows))
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
    shift = padding - 1
    layout = _plan(x, m)
    planes, n_inner, cols, nb = _geometry(x, layout)
    vec = _vec(x, layout, cols)
    if shift == 0:  # m is stored at the loads' columns (padding 2: one column off, no claim)
        vec = min(vec, _vec(m, layout, cols))
    lead = -(-shift * nb // vec) * vec  # the kernel's `lead`: the ring rounded out to vec columns
    rows_t, cols_t = h + 2 * shift, cols + shift * nb + lead
    block_h, block_w, num_warps = _block_sizes(rows_t, cols_t, backward=False, vec=vec)
    tiles_w = triton.cdiv(cols_t, block_w)
    tiles_per_plane = triton.cdiv(rows_t, block_h) * tiles_w
    grid = (planes * tiles_per_plane,)
    sx, sm = x.stride(), m.stride()
    with _on_device(x):
        _gradient_map_fwd_kernel[grid](
            x, m, n_inner, h, cols, nb,
            *sx, *sm,
            tiles_w, tiles_per_plane,
            EPS_C=EPS, SHIFT=shift, FP64=x.dtype == torch.float64, INT64_INDEX=_needs_int64(x, m),
            FLAT=layout == "channels_last", UNIT_COL=layout != "strided", VEC=vec,
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
    layout = _plan(x, grad_m, dx)
    planes, n_inner, cols, nb = _geometry(x, layout)
    vec = min(_vec(x, layout, cols), _vec(dx, layout, cols))
    # grad_m's masks are x's (bounded by cols), so its own row length does not matter.
    vec_g = min(_vec(grad_m, layout, None), vec)
    block_h, block_w, num_warps = _block_sizes(h, cols, backward=True, vec=vec)
    tiles_w = triton.cdiv(cols, block_w)
    tiles_per_plane = triton.cdiv(h, block_h) * tiles_w
    grid = (planes * tiles_per_plane,)
    with _on_device(x):
        _gradient_map_bwd_kernel[grid](
            x, grad_m, dx, n_inner, h, cols, nb,
            *x.stride(), *grad_m.stride(), *dx.stride(),
            tiles_w, tiles_per_plane,
            EPS_C=EPS, SHIFT=padding - 1, FP64=x.dtype == torch.float64,
            INT64_INDEX=_needs_int64(x, grad_m, dx),
            FLAT=layout == "channels_last", UNIT_COL=layout != "strided", VEC=vec, VEC_G=vec_g,
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
        if not ctx.needs_input_grad[0]:
            return None, None
        if torch.is_grad_enabled():
            # create_graph=True (a gradient penalty through the map): the differentiable PyTorch
            # formulation, so the Triton path is twice differentiable as the torch path is.
            (grad_x,) = torch.autograd.grad(_gradient_map_torch(x, ctx.padding), x, grad_m, create_graph=True)
            return grad_x, None
        return gradient_map_bwd(x, grad_m, ctx.padding), None


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
        _check_padding("GradientMap", padding)
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
    bsz, ch, h, w = x.shape
    if h == 0 or w == 0:
        # conv2d refuses an empty image; the map is then the padding's: v = h = 0, sqrt(EPS)
        # (padding 2 gives a 2-pixel-wide frame, padding 1 nothing), tied to x for autograd.
        eps = torch.full((bsz, ch, *_out_hw(h, w, padding)), EPS, dtype=x.dtype, device=x.device)
        return torch.sqrt(eps) + 0 * x.sum()
    kv = torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=x.dtype, device=x.device)
    kh = torch.tensor([[0.0, 0.0, 0.0], [-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=x.dtype, device=x.device)
    v = F.conv2d(x, kv.expand(ch, 1, 3, 3), padding=padding, groups=ch)
    h = F.conv2d(x, kh.expand(ch, 1, 3, 3), padding=padding, groups=ch)
    return torch.sqrt(v * v + h * h + EPS)
