"""Fused InfoNCE over every position of a feature map (SHARED SPEC §6, DESIGN contract 2).

For each image b, anchors' predictions P (N, d) meet every key K (M, d) of the same feature map:

    logits[n, j] = scale · cos(P[n], K[j])
    loss[n]      = logsumexp_{j kept for n} logits[n, j] − logits[n, pos[n]]

where key j is removed for anchor n when it lies within Chebyshev distance < radius (on the
feature grid) of any of the anchor's exclusion centres, except the positive, which is always kept.
N = M = 10,000 and d = 32 give 10⁸ logits per image; nothing here materialises them.

Layout (Liger-Kernel recipe): Triton kernels → launchers (``info_nce_fwd``/``info_nce_bwd`` for
the kernels, ``info_nce_chunked_fwd``/``_bwd`` for the PyTorch tile path, all four registered as
torch.library custom ops) → ``InfoNCEFunction`` (Triton) and ``InfoNCEChunkedFunction`` (PyTorch
tiles, CPU) → ``info_nce`` → ``InfoNCELoss`` → ``info_nce_ref`` (the naive baseline).

Kernel recipe (flash-attention / Inf-CL): per (image, block of anchors) the forward loops over key
tiles, computes scale·cos with ``tl.dot`` in log2 units (log2(e) folded into the scale, so the
softmax uses exp2), applies the exclusion mask from grid coordinates inside the tile, and keeps an
online max and sum of exponentials; it writes one log-sum-exp per anchor and the positive logit.
The backward recomputes the tiles: one kernel loops over key tiles to accumulate dP̂, another over
anchor tiles to accumulate dK̂ (no atomics, no races); the gradient of a kept logit is
g·(softmax − one-hot at the positive), and the chain rule through the L2 normalisation is fused
into their epilogues. The normalisation itself is an O((N+M)·d) PyTorch pre-pass.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ._triton import tl, triton  # stand-ins without triton: PyTorch paths only
from ._utils import BACKENDS, check_float, check_same_device, interpreter_active, resolve_backend

OP = "info_nce"
NORM_EPS = 1e-6  # vectors shorter than this are divided by NORM_EPS instead (zero vectors stay finite)
REDUCTIONS = ("none", "mean", "sum")
# Work budget of one PyTorch tile (B · chunk_n · chunk_m logits, fp32): 2 MB per temporary.
TORCH_TILE_ELEMENTS = 1 << 19
# Widest d the kernels take: the fp32 (tf32x3) tiles of wider rows overflow the 227 KB of shared
# memory per block of an H100 even at 16-row tiles; "auto" sends wider inputs to the PyTorch path.
MAX_KERNEL_DIM = 512


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _tile_exclusion(
    kept,
    offs_n,
    offs_m,
    pos,
    n_mask,
    crow_ptr,
    ccol_ptr,
    grid_width,
    radius,
    NUM_CENTERS: tl.constexpr,
):
    """Remove keys near any exclusion centre of each anchor (except the positive) from ``kept``.

    crow/ccol point at this image's (N, NUM_CENTERS) int32 centre rows/columns.
    """
    key_row = offs_m // grid_width
    key_col = offs_m % grid_width
    # Cheap tile-level test first: most tiles are far from every centre, and the per-logit mask
    # (several integer ops per centre) would otherwise cost more than the exponentials.
    row_lo = tl.min(key_row, axis=0)
    row_hi = tl.max(key_row, axis=0)
    hit = tl.zeros_like(offs_n)
    for c in tl.static_range(NUM_CENTERS):
        cr = tl.load(crow_ptr + offs_n * NUM_CENTERS + c, mask=n_mask, other=-(1 << 30))
        hit = hit | ((cr > row_lo - radius) & (cr < row_hi + radius)).to(offs_n.dtype)
    if tl.max(hit, axis=0) > 0:
        excluded = (offs_n[:, None] < 0) & (offs_m[None, :] < 0)
        for c in tl.static_range(NUM_CENTERS):
            cr = tl.load(crow_ptr + offs_n * NUM_CENTERS + c, mask=n_mask, other=-(1 << 30))
            cc = tl.load(ccol_ptr + offs_n * NUM_CENTERS + c, mask=n_mask, other=-(1 << 30))
            near_r = tl.abs(key_row[None, :] - cr[:, None]) < radius
            near_c = tl.abs(key_col[None, :] - cc[:, None]) < radius
            excluded = excluded | (near_r & near_c)
        is_pos = offs_m[None, :] == pos[:, None]
        kept = kept & ((excluded == 0) | is_pos)
    return kept


@triton.jit
def _normalize_backward_tile(dxhat, xhat, norm):
    """Chain rule through x̂ = x / max(|x|, eps) for whole rows: (dx̂ − x̂ (x̂·dx̂)) / |x|, or
    dx̂ / eps where the norm was clamped. Rows are complete (BLOCK_D covers d), so it fuses."""
    radial = tl.sum(xhat * dxhat, axis=1)
    clamped = norm <= 1e-6  # NORM_EPS
    dx = tl.where(clamped[:, None], dxhat, dxhat - xhat * radial[:, None])
    return dx / norm[:, None]


@triton.jit
def _info_nce_fwd_kernel(
    p_ptr,  # (B, N, d) normalised predictions
    k_ptr,  # (B, M, d) normalised keys
    pos_ptr,  # (B, N) int64
    crow_ptr,  # (B, N, C) int32 centre rows (unused without exclusion)
    ccol_ptr,  # (B, N, C) int32 centre columns
    lse_ptr,  # (B, N) fp32 out: natural-log LSE over kept keys
    posl_ptr,  # (B, N) fp32 out: positive logit
    N,
    M,
    D,
    grid_width,
    radius,
    scale,
    HAS_EXCLUSION: tl.constexpr,
    NUM_CENTERS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < N
    d_mask = offs_d < D
    p_base = p_ptr + pid_b * N * D
    k_base = k_ptr + pid_b * M * D

    p = tl.load(
        p_base + offs_n[:, None] * D + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0
    )
    if DOT_FP32:
        p = p.to(tl.float32)
    pos = tl.load(pos_ptr + pid_b * N + offs_n, mask=n_mask, other=0)
    crow_base = crow_ptr + pid_b * N * NUM_CENTERS
    ccol_base = ccol_ptr + pid_b * N * NUM_CENTERS

    # Positive logit from a gathered key row, in fp32.
    k_pos = tl.load(
        k_base + pos[:, None] * D + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0
    )
    pos_logit = tl.sum(p.to(tl.float32) * k_pos.to(tl.float32), axis=1) * scale

    scale_log2 = scale * 1.4426950408889634
    # A finite floor instead of -inf: a tile where a row has no kept key must not give inf - inf.
    m_i = tl.full([BLOCK_N], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start_m in range(0, M, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        k = tl.load(
            k_base + offs_m[:, None] * D + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0
        )
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(p, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        kept = (m_mask[None, :]) & (offs_n[:, None] >= 0)
        if HAS_EXCLUSION:
            kept = _tile_exclusion(
                kept, offs_n, offs_m, pos, n_mask, crow_base, ccol_base, grid_width, radius, NUM_CENTERS
            )
        s = tl.where(kept, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(lse_ptr + pid_b * N + offs_n, lse, mask=n_mask)
    tl.store(posl_ptr + pid_b * N + offs_n, pos_logit, mask=n_mask)


@triton.jit
def _info_nce_bwd_dp_kernel(
    p_ptr,
    k_ptr,
    pos_ptr,
    crow_ptr,
    ccol_ptr,
    lse_ptr,
    g_ptr,  # (B, N) fp32 upstream gradient of the per-anchor loss
    pnorm_ptr,  # (B, N) fp32 norms of the raw predictions, clamped at NORM_EPS
    dp_ptr,  # (B, N, d) out, input dtype: gradient wrt the raw predictions
    N,
    M,
    D,
    grid_width,
    radius,
    scale,
    HAS_EXCLUSION: tl.constexpr,
    NUM_CENTERS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    GRAD_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < N
    d_mask = offs_d < D
    nd_mask = n_mask[:, None] & d_mask[None, :]
    k_base = k_ptr + pid_b * M * D

    p = tl.load(p_ptr + pid_b * N * D + offs_n[:, None] * D + offs_d[None, :], mask=nd_mask, other=0.0)
    if DOT_FP32:
        p = p.to(tl.float32)
    pos = tl.load(pos_ptr + pid_b * N + offs_n, mask=n_mask, other=-1)
    lse_log2 = tl.load(lse_ptr + pid_b * N + offs_n, mask=n_mask, other=0.0) * 1.4426950408889634
    g = tl.load(g_ptr + pid_b * N + offs_n, mask=n_mask, other=0.0)
    crow_base = crow_ptr + pid_b * N * NUM_CENTERS
    ccol_base = ccol_ptr + pid_b * N * NUM_CENTERS

    scale_log2 = scale * 1.4426950408889634
    dp = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, M, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        k = tl.load(
            k_base + offs_m[:, None] * D + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0
        )
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(p, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        kept = (m_mask[None, :]) & (n_mask[:, None])
        if HAS_EXCLUSION:
            kept = _tile_exclusion(
                kept, offs_n, offs_m, pos, n_mask, crow_base, ccol_base, grid_width, radius, NUM_CENTERS
            )
        prob = tl.where(kept, tl.exp2(s - lse_log2[:, None]), 0.0)
        is_pos = offs_m[None, :] == pos[:, None]
        dlogit = g[:, None] * (prob - is_pos.to(tl.float32))
        # fp32 operands: g·(softmax − one-hot) is ~1/(B·N) under a mean, subnormal in fp16.
        dp += tl.dot(dlogit, k.to(tl.float32), input_precision=GRAD_PRECISION)
    norm = tl.load(pnorm_ptr + pid_b * N + offs_n, mask=n_mask, other=1.0)
    dp = _normalize_backward_tile(dp * scale, p.to(tl.float32), norm)
    tl.store(
        dp_ptr + pid_b * N * D + offs_n[:, None] * D + offs_d[None, :],
        dp.to(dp_ptr.dtype.element_ty),
        mask=nd_mask,
    )


@triton.jit
def _info_nce_bwd_dk_kernel(
    p_ptr,
    k_ptr,
    pos_ptr,
    crow_ptr,
    ccol_ptr,
    lse_ptr,
    g_ptr,
    knorm_ptr,  # (B, M) fp32 norms of the raw keys, clamped at NORM_EPS
    dk_ptr,  # (B, M, d) out, input dtype: gradient wrt the raw keys
    N,
    M,
    D,
    grid_width,
    radius,
    scale,
    HAS_EXCLUSION: tl.constexpr,
    NUM_CENTERS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    GRAD_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < M
    d_mask = offs_d < D
    md_mask = m_mask[:, None] & d_mask[None, :]
    p_base = p_ptr + pid_b * N * D
    crow_base = crow_ptr + pid_b * N * NUM_CENTERS
    ccol_base = ccol_ptr + pid_b * N * NUM_CENTERS

    k = tl.load(k_ptr + pid_b * M * D + offs_m[:, None] * D + offs_d[None, :], mask=md_mask, other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
    scale_log2 = scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        p = tl.load(
            p_base + offs_n[:, None] * D + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0
        )
        if DOT_FP32:
            p = p.to(tl.float32)
        pos = tl.load(pos_ptr + pid_b * N + offs_n, mask=n_mask, other=-1)
        lse_log2 = tl.load(lse_ptr + pid_b * N + offs_n, mask=n_mask, other=0.0) * 1.4426950408889634
        # g = 0 on padded anchors makes their (garbage) probabilities contribute nothing.
        g = tl.load(g_ptr + pid_b * N + offs_n, mask=n_mask, other=0.0)
        s = tl.dot(p, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        kept = (m_mask[None, :]) & (n_mask[:, None])
        if HAS_EXCLUSION:
            kept = _tile_exclusion(
                kept, offs_n, offs_m, pos, n_mask, crow_base, ccol_base, grid_width, radius, NUM_CENTERS
            )
        prob = tl.where(kept, tl.exp2(s - lse_log2[:, None]), 0.0)
        is_pos = offs_m[None, :] == pos[:, None]
        dlogit = g[:, None] * (prob - is_pos.to(tl.float32))
        dk += tl.dot(tl.trans(dlogit), p.to(tl.float32), input_precision=GRAD_PRECISION)
    norm = tl.load(knorm_ptr + pid_b * M + offs_m, mask=m_mask, other=1.0)
    dk = _normalize_backward_tile(dk * scale, k.to(tl.float32), norm)
    tl.store(
        dk_ptr + pid_b * M * D + offs_m[:, None] * D + offs_d[None, :],
        dk.to(dk_ptr.dtype.element_ty),
        mask=md_mask,
    )


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _validate(
    pred: torch.Tensor,
    keys: torch.Tensor,
    pos_index: torch.Tensor,
    scale: float,
    grid_width: int | None,
    exclude_centers: torch.Tensor | None,
    exclude_radius: int,
    reduction: str,
    backend: str,
) -> bool:
    """Check user input against contract 2; return whether an exclusion mask is in effect."""
    if backend not in BACKENDS:
        raise ValueError(f"{OP}: backend={backend!r} is not one of {BACKENDS}")
    check_float(OP, "pred", pred)
    check_float(OP, "keys", keys)
    if pred.dtype != keys.dtype:
        raise TypeError(f"{OP}: pred is {pred.dtype} but keys is {keys.dtype}; cast both to one dtype")
    if pred.dim() != 3 or keys.dim() != 3:
        raise ValueError(
            f"{OP}: pred must be (B, N, d) and keys (B, M, d); got pred {tuple(pred.shape)}, "
            f"keys {tuple(keys.shape)}"
        )
    B, N, d = pred.shape
    if keys.shape[0] != B or keys.shape[2] != d:
        raise ValueError(
            f"{OP}: keys {tuple(keys.shape)} must share batch B={B} and width d={d} with pred "
            f"{tuple(pred.shape)}"
        )
    M = keys.shape[1]
    if B == 0 or N == 0 or M == 0 or d == 0:
        raise ValueError(f"{OP}: empty input (pred {tuple(pred.shape)}, keys {tuple(keys.shape)})")
    if not isinstance(pos_index, torch.Tensor) or pos_index.dtype != torch.int64:
        got = pos_index.dtype if isinstance(pos_index, torch.Tensor) else type(pos_index).__name__
        raise TypeError(f"{OP}: pos_index must be an int64 tensor, got {got}; use .long()")
    if tuple(pos_index.shape) != (B, N):
        raise ValueError(f"{OP}: pos_index must be (B, N) = {(B, N)}, got {tuple(pos_index.shape)}")
    tensors = {"pred": pred, "keys": keys, "pos_index": pos_index}
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{OP}: scale must be a finite positive number, got {scale!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{OP}: reduction={reduction!r} is not one of {REDUCTIONS}")
    if isinstance(exclude_radius, bool) or not isinstance(exclude_radius, int) or exclude_radius < 0:
        raise ValueError(
            f"{OP}: exclude_radius must be an int >= 0 (0 removes nothing), got {exclude_radius!r}"
        )
    if exclude_radius > 0 and exclude_centers is None:
        raise ValueError(
            f"{OP}: exclude_radius={exclude_radius} needs exclude_centers (B, N, C); pass both or neither"
        )
    if exclude_centers is not None:
        if not isinstance(exclude_centers, torch.Tensor) or exclude_centers.dtype != torch.int64:
            got = (
                exclude_centers.dtype if isinstance(exclude_centers, torch.Tensor) else type(exclude_centers)
            )
            raise TypeError(f"{OP}: exclude_centers must be an int64 tensor, got {got}; use .long()")
        if exclude_centers.dim() != 3 or tuple(exclude_centers.shape[:2]) != (B, N):
            raise ValueError(
                f"{OP}: exclude_centers must be (B, N, C) with (B, N) = {(B, N)}, "
                f"got {tuple(exclude_centers.shape)}"
            )
        tensors["exclude_centers"] = exclude_centers
    has_exclusion = exclude_radius > 0 and exclude_centers is not None and exclude_centers.shape[-1] > 0
    if has_exclusion:
        if grid_width is None:
            raise ValueError(
                f"{OP}: exclusion needs grid_width (the feature map's number of columns; keys are "
                "flattened row-major)"
            )
        if (
            isinstance(grid_width, bool)
            or not isinstance(grid_width, int)
            or grid_width < 1
            or M % grid_width
        ):
            raise ValueError(
                f"{OP}: grid_width={grid_width!r} must be a positive int dividing M={M} "
                "(keys are one H x W map flattened row-major, M = H * W)"
            )
    check_same_device(OP, **tensors)
    # Range checks read the data (a device sync on CUDA); skipped while torch.compile traces.
    if not torch.compiler.is_compiling():
        # One host transfer for all four bounds: each int(tensor) would be its own sync.
        bounds = [pos_index.min(), pos_index.max()]
        if exclude_centers is not None and exclude_centers.numel():
            bounds += [exclude_centers.min(), exclude_centers.max()]
        bounds = torch.stack(bounds).tolist()
        lo, hi = bounds[0], bounds[1]
        if lo < 0 or hi >= M:
            raise ValueError(f"{OP}: pos_index values must be in [0, M={M}), got range [{lo}, {hi}]")
        if len(bounds) == 4:
            lo, hi = bounds[2], bounds[3]
            if lo < 0 or hi >= M:
                raise ValueError(
                    f"{OP}: exclude_centers values must be grid indices in [0, M={M}), got range [{lo}, {hi}]"
                )
    return has_exclusion


def _normalize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., d) → (x̂ fp32, norm (..., 1) fp32 clamped at NORM_EPS)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).clamp_min(NORM_EPS)
    return xf / norm, norm


def _normalize_backward(dxhat: torch.Tensor, xhat: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Chain rule through x̂ = x / max(|x|, eps): (dx̂ − x̂ (x̂·dx̂)) / |x|, or dx̂ / eps when clamped."""
    radial = (xhat * dxhat).sum(-1, keepdim=True)
    unclamped = norm > NORM_EPS
    return torch.where(unclamped, dxhat - xhat * radial, dxhat) / norm


def _centre_grid(exclude_centers: torch.Tensor, grid_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.div(exclude_centers, grid_width, rounding_mode="floor").to(torch.int32).contiguous(),
        (exclude_centers % grid_width).to(torch.int32).contiguous(),
    )


def _block_sizes(N: int, M: int, d: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_M, BLOCK_D, num_warps, num_stages). Fixed configs: autotune fails under the
    interpreter."""
    block_d = max(16, triton.next_power_of_2(d))
    if interpreter_active():
        # Each program instance costs milliseconds in the interpreter: few, big tiles.
        return (
            min(64, max(16, triton.next_power_of_2(N))),
            min(64, max(16, triton.next_power_of_2(M))),
            block_d,
            4,
            1,
        )
    # d is small (32 in the NSE): the loop is exp-bound, so wide anchor blocks amortise key loads.
    if block_d <= 64:
        return 128, 64, block_d, 4, 3
    # Wider rows: shared memory (ptxas, sm_90, fp32 tf32x3 operands, 4 exclusion centres) is the
    # limit, 227 KB per block: d=128 at 64x64 tiles needs 228 KB with 3 stages, 194 KB with 2;
    # d=256 at 32x32 with 1 stage 128 KB; d=512 at 16x16 with 1 stage 128 KB.
    if block_d == 128:
        return 64, 64, block_d, 8, 2
    tile = 32 if block_d == 256 else 16
    return tile, tile, block_d, 4, 1


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32: plain tf32 would put ~1e-3 relative error into cos (×64 in the logits); tf32x3 keeps
    # near-fp32 accuracy on tensor cores. fp16/bf16 ignore the setting.
    return "ieee" if interpreter_active() else "tf32x3"


def _grad_precision(dtype: torch.dtype) -> str:
    # The gradient dots take fp32 operands (range: see the kernels); tf32 keeps fp16's mantissa
    # for fp16/bf16 inputs, tf32x3 keeps fp32 accuracy for fp32 inputs.
    if interpreter_active():
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _dot_fp32(dtype: torch.dtype) -> bool:
    # The interpreter's tl.dot returns garbage for bfloat16 operands (triton 3.8): upcast there.
    return interpreter_active() and dtype == torch.bfloat16


def _on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device; make that t's device (cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def info_nce_fwd(
    p_hat: torch.Tensor,
    k_hat: torch.Tensor,
    pos_index: torch.Tensor,
    crow: torch.Tensor | None,
    ccol: torch.Tensor | None,
    scale: float,
    grid_width: int,
    radius: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on normalised inputs.

    p_hat: (B, N, d), k_hat: (B, M, d) contiguous, fp32/fp16/bf16; pos_index (B, N) int64;
    crow/ccol: (B, N, C) int32 centre rows/columns or None (no exclusion).
    Returns (lse, pos_logit), each (B, N) fp32.
    """
    B, N, d = p_hat.shape
    M = k_hat.shape[1]
    has_excl = crow is not None and radius > 0
    if not has_excl:
        crow = ccol = pos_index  # never read; any pointer will do
    num_centers = crow.shape[-1] if has_excl else 1
    lse = torch.empty((B, N), dtype=torch.float32, device=p_hat.device)
    pos_logit = torch.empty_like(lse)
    block_n, block_m, block_d, warps, stages = _block_sizes(N, M, d)
    grid = (triton.cdiv(N, block_n), B)
    with _on_device(p_hat):
        _info_nce_fwd_kernel[grid](
            p_hat, k_hat, pos_index, crow, ccol, lse, pos_logit,
            N, M, d, max(grid_width, 1), radius, float(scale),
            HAS_EXCLUSION=has_excl, NUM_CENTERS=num_centers,
            BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d,
            DOT_PRECISION=_dot_precision(p_hat.dtype), DOT_FP32=_dot_fp32(p_hat.dtype),
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return lse, pos_logit


def info_nce_bwd(
    p_hat: torch.Tensor,
    k_hat: torch.Tensor,
    pos_index: torch.Tensor,
    crow: torch.Tensor | None,
    ccol: torch.Tensor | None,
    lse: torch.Tensor,
    grad: torch.Tensor,
    p_norm: torch.Tensor,
    k_norm: torch.Tensor,
    scale: float,
    grid_width: int,
    radius: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients wrt the raw inputs, (dpred (B, N, d), dkeys (B, M, d)) in p_hat's dtype.

    p_norm (B, N), k_norm (B, M): fp32 norms of the raw vectors clamped at NORM_EPS (the
    normalisation's backward is fused into the kernels' epilogues); grad: (B, N) fp32, the
    upstream gradient of the per-anchor loss; lse from ``info_nce_fwd``.
    """
    B, N, d = p_hat.shape
    M = k_hat.shape[1]
    has_excl = crow is not None and radius > 0
    if not has_excl:
        crow = ccol = pos_index
    num_centers = crow.shape[-1] if has_excl else 1
    grad = grad.float().contiguous()
    dp = torch.empty_like(p_hat)
    dk = torch.empty_like(k_hat)
    block_n, block_m, block_d, warps, stages = _block_sizes(N, M, d)
    if not interpreter_active():
        # the backward holds a (BLOCK_N, BLOCK_D) fp32 accumulator and two tiles
        block_n = min(block_n, 64)
    common = dict(
        HAS_EXCLUSION=has_excl, NUM_CENTERS=num_centers,
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(p_hat.dtype), DOT_FP32=_dot_fp32(p_hat.dtype),
        GRAD_PRECISION=_grad_precision(p_hat.dtype), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    args = (N, M, d, max(grid_width, 1), radius, float(scale))
    with _on_device(p_hat):
        _info_nce_bwd_dp_kernel[(triton.cdiv(N, block_n), B)](
            p_hat, k_hat, pos_index, crow, ccol, lse, grad, p_norm, dp, *args, **common
        )
        _info_nce_bwd_dk_kernel[(triton.cdiv(M, block_m), B)](
            p_hat, k_hat, pos_index, crow, ccol, lse, grad, k_norm, dk, *args, **common
        )
    return dp, dk


def _torch_tiles(B: int, N: int, M: int, chunk_size: int | None) -> tuple[int, int]:
    if chunk_size is not None:
        return min(N, chunk_size), min(M, chunk_size)
    chunk_m = min(M, 1024)
    chunk_n = max(1, min(N, TORCH_TILE_ELEMENTS // (B * chunk_m)))
    return chunk_n, chunk_m


def _torch_excluded_keys(
    n0: int,
    n1: int,
    M: int,
    pos_index: torch.Tensor,
    crow: torch.Tensor | None,
    ccol: torch.Tensor | None,
    grid_width: int,
    radius: int,
) -> torch.Tensor | None:
    """(B, n1-n0, C·(2r−1)²) int64: the keys each anchor removes, M where none (off the grid,
    or the positive, which is never removed); None when nothing is removed.

    Listing the few removed keys per anchor and scattering them into each tile costs far less
    than testing every (anchor, key, centre) triple against the grid.
    """
    if crow is None or radius == 0:
        return None
    height = M // grid_width
    span = torch.arange(-(radius - 1), radius, device=pos_index.device, dtype=torch.int32)
    rows = (crow[:, n0:n1, :, None, None] + span[:, None]).expand(-1, -1, -1, span.numel(), span.numel())
    cols = (ccol[:, n0:n1, :, None, None] + span[None, :]).expand_as(rows)
    on_grid = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < grid_width)
    idx = (rows.long() * grid_width + cols).flatten(2)
    idx = torch.where(on_grid.flatten(2), idx, M)
    return idx.masked_fill_(idx == pos_index[:, n0:n1, None], M)


def _torch_removed(excluded: torch.Tensor | None, m0: int, m1: int) -> torch.Tensor | None:
    """(B, n, m1-m0) bool: keys of this tile removed for each anchor, or None when none are."""
    if excluded is None:
        return None
    local = excluded - m0
    in_tile = (local >= 0) & (local < m1 - m0)
    if not bool(in_tile.any()):
        return None
    local = torch.where(in_tile, local, m1 - m0)  # spill column, dropped below
    removed = torch.zeros((*excluded.shape[:2], m1 - m0 + 1), dtype=torch.bool, device=excluded.device)
    removed.scatter_(2, local, True)
    return removed[..., : m1 - m0]


def info_nce_chunked_fwd(
    p_hat: torch.Tensor,
    k_hat: torch.Tensor,
    pos_index: torch.Tensor,
    crow: torch.Tensor | None,
    ccol: torch.Tensor | None,
    scale: float,
    grid_width: int,
    radius: int,
    chunk_n: int,
    chunk_m: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch twin of ``info_nce_fwd``: online log-sum-exp over (B, chunk_n, chunk_m) tiles.

    Computes in p_hat's dtype (fp32, or fp64 for gradcheck). Returns (lse, pos_logit), (B, N).
    """
    B, N, d = p_hat.shape
    M = k_hat.shape[1]
    acc = p_hat.dtype
    lse = torch.empty((B, N), dtype=acc, device=p_hat.device)
    for n0 in range(0, N, chunk_n):
        n1 = min(N, n0 + chunk_n)
        p_blk = p_hat[:, n0:n1]
        excluded = _torch_excluded_keys(n0, n1, M, pos_index, crow, ccol, grid_width, radius)
        run_max = torch.full((B, n1 - n0), -math.inf, dtype=acc, device=p_hat.device)
        run_sum = torch.zeros((B, n1 - n0), dtype=acc, device=p_hat.device)
        for m0 in range(0, M, chunk_m):
            m1 = min(M, m0 + chunk_m)
            s = torch.bmm(p_blk, k_hat[:, m0:m1].transpose(1, 2)).mul_(scale)
            removed = _torch_removed(excluded, m0, m1)
            if removed is not None:
                s.masked_fill_(removed, -math.inf)
            new_max = torch.maximum(run_max, s.amax(dim=-1))
            # A row with nothing kept so far has max -inf; shift by 0 there to avoid inf - inf.
            safe = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
            run_sum = run_sum * torch.exp(run_max - safe) + torch.exp(s.sub_(safe[..., None])).sum(-1)
            run_max = new_max
        lse[:, n0:n1] = run_max + torch.log(run_sum)
    k_pos = torch.gather(k_hat, 1, pos_index[..., None].expand(-1, -1, d))
    pos_logit = (p_hat * k_pos).sum(-1) * scale
    return lse, pos_logit


def info_nce_chunked_bwd(
    p_hat: torch.Tensor,
    k_hat: torch.Tensor,
    pos_index: torch.Tensor,
    crow: torch.Tensor | None,
    ccol: torch.Tensor | None,
    lse: torch.Tensor,
    grad: torch.Tensor,
    scale: float,
    grid_width: int,
    radius: int,
    chunk_n: int,
    chunk_m: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch twin of ``info_nce_bwd``: (dp̂ (B, N, d), dk̂ (B, M, d)) in p_hat's dtype."""
    _, N, d = p_hat.shape
    M = k_hat.shape[1]
    g = grad.to(p_hat.dtype)
    dp_hat = torch.zeros_like(p_hat)
    dk_hat = torch.zeros_like(k_hat)
    # One pass suffices here (no concurrent writers): accumulate both gradients from each tile.
    for n0 in range(0, N, chunk_n):
        n1 = min(N, n0 + chunk_n)
        p_blk = p_hat[:, n0:n1]
        lse_blk, g_blk = lse[:, n0:n1, None], g[:, n0:n1, None]
        excluded = _torch_excluded_keys(n0, n1, M, pos_index, crow, ccol, grid_width, radius)
        for m0 in range(0, M, chunk_m):
            m1 = min(M, m0 + chunk_m)
            k_blk = k_hat[:, m0:m1]
            prob = torch.exp(torch.bmm(p_blk, k_blk.transpose(1, 2)).mul_(scale).sub_(lse_blk))
            removed = _torch_removed(excluded, m0, m1)
            if removed is not None:
                prob.masked_fill_(removed, 0.0)
            dlogit = prob.mul_(g_blk)
            dp_hat[:, n0:n1] += torch.bmm(dlogit, k_blk)
            dk_hat[:, m0:m1] += torch.bmm(dlogit.transpose(1, 2), p_blk)
    # The one-hot at the positive: −g on the positive logit.
    index = pos_index[..., None].expand(-1, -1, d)
    dp_hat -= g[..., None] * torch.gather(k_hat, 1, index)
    dk_hat.scatter_add_(1, index, -g[..., None] * p_hat)
    return dp_hat.mul_(scale), dk_hat.mul_(scale)


# torch.library registration: the launchers become opaque ops, so torch.compile traces a model
# that calls info_nce (through the autograd.Functions below) without unrolling tile loops or
# tracing into Triton.


@torch.library.custom_op("spsr_kernels::info_nce_triton_fwd", mutates_args=())
def _triton_fwd_op(
    p_hat: torch.Tensor,
    k_hat: torch.Tensor,
    pos_index: torch.Tensor,
    crow: torch.Tensor | None,
    ccol: torch.Tensor | None,
    scale: float,
    grid_width: int,
    radius: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return info_nce_fwd(p_hat, k_hat, pos_index, crow, ccol, scale, grid_width, radius)


@torch.library.custom_op("spsr_kernels::info_nce_triton_bwd", mutates_args=())
def _triton_bwd_op(
    p_hat: torch.Tensor,
    k_hat: torch.Tensor,
    pos_index: torch.Tensor,
    crow: torch.Tensor | None,
    ccol: torch.Tensor | None,
    lse: torch.Tensor,
    grad: torch.Tensor,
    p_norm: torch.Tensor,
    k_norm: torch.Tensor,
    scale: float,
    grid_width: int,
    radius: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return info_nce_bwd(
        p_hat, k_hat, pos_index, crow, ccol, lse, grad, p_norm, k_norm, scale, grid_width, radius
    )


@torch.library.custom_op("spsr_kernels::info_nce_chunked_fwd", mutates_args=())
def _chunked_fwd_op(
    p_hat: torch.Tensor,
    k_hat: torch.Tensor,
    pos_index: torch.Tensor,
    crow: torch.Tensor | None,
    ccol: torch.Tensor | None,
    scale: float,
    grid_width: int,
    radius: int,
    chunk_n: int,
    chunk_m: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return info_nce_chunked_fwd(
        p_hat, k_hat, pos_index, crow, ccol, scale, grid_width, radius, chunk_n, chunk_m
    )


@torch.library.custom_op("spsr_kernels::info_nce_chunked_bwd", mutates_args=())
def _chunked_bwd_op(
    p_hat: torch.Tensor,
    k_hat: torch.Tensor,
    pos_index: torch.Tensor,
    crow: torch.Tensor | None,
    ccol: torch.Tensor | None,
    lse: torch.Tensor,
    grad: torch.Tensor,
    scale: float,
    grid_width: int,
    radius: int,
    chunk_n: int,
    chunk_m: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return info_nce_chunked_bwd(
        p_hat, k_hat, pos_index, crow, ccol, lse, grad, scale, grid_width, radius, chunk_n, chunk_m
    )


@_triton_fwd_op.register_fake
def _(p_hat, k_hat, pos_index, crow, ccol, scale, grid_width, radius):
    out = p_hat.new_empty(p_hat.shape[:2], dtype=torch.float32)
    return out, torch.empty_like(out)


@_chunked_fwd_op.register_fake
def _(p_hat, k_hat, pos_index, crow, ccol, scale, grid_width, radius, chunk_n, chunk_m):
    out = p_hat.new_empty(p_hat.shape[:2])
    return out, torch.empty_like(out)


@_triton_bwd_op.register_fake
def _(p_hat, k_hat, pos_index, crow, ccol, lse, grad, p_norm, k_norm, scale, grid_width, radius):
    return torch.empty_like(p_hat), torch.empty_like(k_hat)


@_chunked_bwd_op.register_fake
def _(p_hat, k_hat, pos_index, crow, ccol, lse, grad, scale, grid_width, radius, chunk_n, chunk_m):
    return torch.empty_like(p_hat), torch.empty_like(k_hat)


# --------------------------------------------------------------------------------------------
# autograd.Functions
# --------------------------------------------------------------------------------------------


class InfoNCEFunction(torch.autograd.Function):
    """Triton path. Saves the normalised inputs (input dtype), their norms and the LSE only."""

    @staticmethod
    def forward(ctx, pred, keys, pos_index, crow, ccol, scale, grid_width, radius):
        p_hat, p_norm = _normalize(pred)
        k_hat, k_norm = _normalize(keys)
        # The kernels read the normalised vectors in the input dtype (fp16/bf16 tensor-core dots).
        p_low = p_hat.to(pred.dtype).contiguous()
        k_low = k_hat.to(keys.dtype).contiguous()
        p_norm, k_norm = p_norm[..., 0].contiguous(), k_norm[..., 0].contiguous()
        pos_index = pos_index.contiguous()
        lse, pos_logit = _triton_fwd_op(p_low, k_low, pos_index, crow, ccol, scale, grid_width, radius)
        ctx.save_for_backward(p_low, k_low, p_norm, k_norm, pos_index, crow, ccol, lse)
        ctx.scale, ctx.grid_width, ctx.radius = scale, grid_width, radius
        return (lse - pos_logit).to(pred.dtype)

    @staticmethod
    def backward(ctx, grad):
        p_low, k_low, p_norm, k_norm, pos_index, crow, ccol, lse = ctx.saved_tensors
        dpred, dkeys = _triton_bwd_op(
            p_low, k_low, pos_index, crow, ccol, lse, grad.float().contiguous(), p_norm, k_norm,
            ctx.scale, ctx.grid_width, ctx.radius,
        )  # fmt: skip
        return dpred, dkeys, None, None, None, None, None, None


class InfoNCEChunkedFunction(torch.autograd.Function):
    """PyTorch path with the kernel's memory behaviour: (B, chunk_n, chunk_m) tiles of logits,
    online log-sum-exp over key tiles, tiles recomputed in backward; fp32 (fp64) throughout."""

    @staticmethod
    def forward(ctx, pred, keys, pos_index, crow, ccol, scale, grid_width, radius, chunk_n, chunk_m):
        p_hat, p_norm = _normalize(pred)
        k_hat, k_norm = _normalize(keys)
        lse, pos_logit = _chunked_fwd_op(
            p_hat, k_hat, pos_index, crow, ccol, scale, grid_width, radius, chunk_n, chunk_m
        )
        ctx.save_for_backward(p_hat, k_hat, p_norm, k_norm, pos_index, crow, ccol, lse)
        ctx.args = (scale, grid_width, radius, chunk_n, chunk_m)
        return (lse - pos_logit).to(pred.dtype)

    @staticmethod
    def backward(ctx, grad):
        p_hat, k_hat, p_norm, k_norm, pos_index, crow, ccol, lse = ctx.saved_tensors
        in_dtype = grad.dtype
        dp_hat, dk_hat = _chunked_bwd_op(
            p_hat, k_hat, pos_index, crow, ccol, lse, grad.to(p_hat.dtype).contiguous(), *ctx.args
        )
        dpred = _normalize_backward(dp_hat, p_hat, p_norm).to(in_dtype)
        dkeys = _normalize_backward(dk_hat, k_hat, k_norm).to(in_dtype)
        return dpred, dkeys, None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def info_nce(
    pred: torch.Tensor,
    keys: torch.Tensor,
    pos_index: torch.Tensor,
    *,
    scale: float = 64.0,
    grid_width: int | None = None,
    exclude_centers: torch.Tensor | None = None,
    exclude_radius: int = 0,
    reduction: str = "mean",
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """InfoNCE of each anchor against every position of its image's feature map, without
    materialising the (B, N, M) logits.

    Args:
        pred: (B, N, d) float32/float16/bfloat16 (float64 on the torch path), one prediction
            per anchor. L2-normalised inside (vectors shorter than 1e-6 are divided by 1e-6).
        keys: (B, M, d) same dtype, every position of the image's feature map, flattened
            row-major from an (M / grid_width, grid_width) grid. L2-normalised inside.
        pos_index: (B, N) int64 in [0, M): the positive key of each anchor.
        scale: τ; logits are scale · cos(pred, key). Default 64 (SPEC §6).
        grid_width: columns of the feature grid; required when exclusion is used.
        exclude_centers: (B, N, C) int64 grid indices in [0, M), or None. Key j is removed from
            anchor n's softmax when max(|row_j − row_c|, |col_j − col_c|) < exclude_radius for
            any of its centres c — except the positive, which is never removed.
        exclude_radius: int >= 0 in grid units; 0 removes nothing.
        reduction: "none" → (B, N), "mean" or "sum" → scalar.
        backend: "auto" (CUDA or TRITON_INTERPRET=1 → Triton, else the chunked PyTorch path;
            float64 or d > 512 always take the PyTorch path), "triton" or "torch".
        chunk_size: torch path only: tile edge in anchors and keys (None: a ~2 MB fp32 tile budget).

    Returns:
        Loss in the input dtype: per anchor logsumexp over kept keys − positive logit
        (0 when every negative is excluded), reduced as asked. Differentiable in pred and keys.
    """
    has_excl = _validate(
        pred, keys, pos_index, scale, grid_width, exclude_centers, exclude_radius, reduction, backend
    )
    path = resolve_backend(backend, pred, keys, op=OP)
    if path == "triton" and pred.dtype == torch.float64:
        if backend == "triton":
            raise TypeError(
                f"{OP}: the Triton kernels take float32/float16/bfloat16, got float64; use backend='torch'"
            )
        path = "torch"
    if path == "triton" and pred.shape[-1] > MAX_KERNEL_DIM:
        if backend == "triton":
            raise ValueError(
                f"{OP}: the Triton kernels take d <= {MAX_KERNEL_DIM}, got d={pred.shape[-1]}; "
                "use backend='torch'"
            )
        path = "torch"
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"{OP}: chunk_size must be a positive int or None, got {chunk_size!r}")
    crow = ccol = None
    if has_excl:
        crow, ccol = _centre_grid(exclude_centers, grid_width)
    width = grid_width if has_excl else 1
    radius = exclude_radius if has_excl else 0
    if path == "triton":
        loss = InfoNCEFunction.apply(pred, keys, pos_index, crow, ccol, float(scale), width, radius)
    else:
        chunk_n, chunk_m = _torch_tiles(pred.shape[0], pred.shape[1], keys.shape[1], chunk_size)
        loss = InfoNCEChunkedFunction.apply(
            pred, keys, pos_index, crow, ccol, float(scale), width, radius, chunk_n, chunk_m
        )
    return _reduce(loss, reduction)


class InfoNCELoss(torch.nn.Module):
    """Module form of :func:`info_nce` with fixed scale, exclusion radius, reduction and backend."""

    def __init__(
        self, scale: float = 64.0, exclude_radius: int = 0, reduction: str = "mean", backend: str = "auto"
    ):
        super().__init__()
        self.scale, self.exclude_radius, self.reduction, self.backend = (
            scale,
            exclude_radius,
            reduction,
            backend,
        )

    def forward(
        self,
        pred: torch.Tensor,
        keys: torch.Tensor,
        pos_index: torch.Tensor,
        grid_width: int | None = None,
        exclude_centers: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return info_nce(
            pred, keys, pos_index, scale=self.scale, grid_width=grid_width, exclude_centers=exclude_centers,
            exclude_radius=self.exclude_radius, reduction=self.reduction, backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"scale={self.scale}, exclude_radius={self.exclude_radius}, reduction={self.reduction!r}"


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def info_nce_ref(
    pred: torch.Tensor,
    keys: torch.Tensor,
    pos_index: torch.Tensor,
    *,
    scale: float = 64.0,
    grid_width: int | None = None,
    exclude_centers: torch.Tensor | None = None,
    exclude_radius: int = 0,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Naive InfoNCE: materialises the (B, N, M) logits and mask; same contract as :func:`info_nce`.

    Computes in the input dtype (so its error in fp16/bf16 is PyTorch's own); ``backend`` is
    accepted for signature compatibility and ignored. Memory: O(B·N·M).
    """
    _validate(pred, keys, pos_index, scale, grid_width, exclude_centers, exclude_radius, reduction, backend)
    p = torch.nn.functional.normalize(pred, dim=-1, eps=NORM_EPS)
    k = torch.nn.functional.normalize(keys, dim=-1, eps=NORM_EPS)
    logits = scale * torch.bmm(p, k.transpose(1, 2))  # (B, N, M)
    if exclude_centers is not None and exclude_radius > 0:
        M = keys.shape[1]
        j = torch.arange(M, device=pred.device, dtype=torch.int32)
        rows, cols = j // grid_width, j % grid_width
        removed = torch.zeros(logits.shape, dtype=torch.bool, device=pred.device)
        for c in range(exclude_centers.shape[-1]):  # one (B, N, M) mask per centre, not (B, N, C, M)
            centre = exclude_centers[..., c, None].to(torch.int32)
            near_row = (rows - centre // grid_width).abs_() < exclude_radius
            removed |= near_row & ((cols - centre % grid_width).abs_() < exclude_radius)
        removed &= j != pos_index[..., None]
        logits = logits.masked_fill(removed, float("-inf"))
    loss = torch.logsumexp(logits, dim=-1) - torch.gather(logits, 2, pos_index[..., None])[..., 0]
    return _reduce(loss, reduction)
