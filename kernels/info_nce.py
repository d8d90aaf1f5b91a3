"""Fused InfoNCE over every position of a feature map (docs/method.md §6; API: docs/kernels_info_nce.md).

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
softmax uses exp2), applies the exclusion mask in the few tiles near a centre from a bitmap (one
bit per logit, built from the grid coordinates by a pre-pass kernel once per call), and keeps an
online max and sum of exponentials; it writes one log-sum-exp per anchor and the positive logit.
The backward recomputes the tiles: one kernel loops over key tiles to accumulate dP̂, another over
anchor tiles to accumulate dK̂ (no atomics, no races); the gradient of a kept logit is
g·(softmax − one-hot at the positive), and the chain rule through the L2 normalisation is fused
into their epilogues. The normalisation itself is an O((N+M)·d) PyTorch pre-pass.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from ._triton import tl, triton  # stand-ins without triton: PyTorch paths only
from ._utils import (
    BACKENDS,
    check_float,
    check_same_device,
    first_order_only,
    interpreter_active,
    resolve_backend,
)

OP = "info_nce"
_SECOND_ORDER_FIX = "info_nce_ref (it materialises the logits) is; use it for second-order gradients"
NORM_EPS = 1e-6  # vectors shorter than this are divided by NORM_EPS instead (zero vectors stay finite)
REDUCTIONS = ("none", "mean", "sum")
# Smallest default PyTorch tile (B · chunk_n · chunk_m logits): below this, per-op overhead
# (dispatch, OpenMP fork/join, which a busy machine stretches) outweighs the cache benefit.
TORCH_MIN_TILE_ELEMENTS = 1 << 16
# Default PyTorch tile on a GPU (fp32 logits, 256 MiB): there a tile is a few kernel launches, so
# it is sized by memory, not by a CPU core's cache (which would make B=48, N=M=10^4 into 10^4 tiles
# of one anchor row each, ~10^5 launches per pass).
TORCH_GPU_TILE_ELEMENTS = 1 << 26
# Widest d the kernels take, by input dtype (launch/bench_kernels.py --static: every kernel compiles
# for sm_90 without register spills up to these). fp32 runs its dots as tf32x3 (three MMAs on split
# operands): d = 64 needs 32 x 64 backward tiles; d = 128 compiles spill-free only at 16 x 16
# backward tiles, too small to be worth shipping untimed, and wider fp32 tiles would also overflow
# the 227 KB of shared memory per block. 16-bit inputs compile spill-free up to 512. "auto" sends
# wider inputs to the PyTorch tile path.
MAX_KERNEL_DIM = {torch.float32: 64, torch.float16: 512, torch.bfloat16: 512}


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


# Size arguments the JIT would otherwise specialise (value 1, divisibility by 16): one compiled
# kernel serves every N, M and grid. D stays specialised (rows are padded to a power of two, and
# its divisibility is what makes the row loads 128-bit vectors).
_SIZE_ARGS = ["N", "M", "grid_width", "radius", "NW"]

# Grid rows/columns of padded anchors and missing centres: far from every key, and far enough
# from int32's ends that the unsigned near-tests below cannot wrap.
_FAR = -(1 << 30)


@triton.jit
def _centre_corner(crow_ptr, ccol_ptr, offs_n, n_mask, radius, c: tl.constexpr, NUM_CENTERS: tl.constexpr):
    """Top-left (row, col) of centre c's excluded square, per anchor ((BLOCK_N,) int32 each);
    _FAR for padded anchors and for c >= NUM_CENTERS."""
    if c < NUM_CENTERS:
        row = tl.load(crow_ptr + offs_n * NUM_CENTERS + c, mask=n_mask, other=-(1 << 30)) - (radius - 1)
        col = tl.load(ccol_ptr + offs_n * NUM_CENTERS + c, mask=n_mask, other=-(1 << 30)) - (radius - 1)
    else:
        row = tl.full(offs_n.shape, -(1 << 30), tl.int32)
        col = tl.full(offs_n.shape, -(1 << 30), tl.int32)
    return row, col


@triton.jit
def _near(key_row, key_col, row0, col0, span):
    """(BLOCK_N, BLOCK_M): key within the square [row0, row0+span) x [col0, col0+span), as two
    unsigned range tests (one subtract and one compare per axis)."""
    dr = (key_row[None, :] - row0[:, None]).to(tl.uint32, bitcast=True)
    dc = (key_col[None, :] - col0[:, None]).to(tl.uint32, bitcast=True)
    return (dr < span) & (dc < span)


@triton.jit
def _removed(
    offs_m, pos, offs_n, n_mask, crow_ptr, ccol_ptr, grid_width, radius,
    r0, c0, r1, c1, r2, c2, r3, c3, NUM_CENTERS: tl.constexpr,
):  # fmt: skip
    """(BLOCK_N, BLOCK_M) bool: keys removed for each anchor — within Chebyshev distance < radius
    of one of its centres, the positive excepted. The first four centres' corners come in
    registers (loaded once before the key loop); any further centres are loaded here."""
    key_row = offs_m // grid_width
    key_col = offs_m - key_row * grid_width
    span = (2 * radius - 1).to(tl.uint32)
    rem = _near(key_row, key_col, r0, c0, span)
    if NUM_CENTERS > 1:
        rem = rem | _near(key_row, key_col, r1, c1, span)
    if NUM_CENTERS > 2:
        rem = rem | _near(key_row, key_col, r2, c2, span)
    if NUM_CENTERS > 3:
        rem = rem | _near(key_row, key_col, r3, c3, span)
    for c in tl.static_range(4, NUM_CENTERS):
        rc, cc = _centre_corner(crow_ptr, ccol_ptr, offs_n, n_mask, radius, c, NUM_CENTERS)
        rem = rem | _near(key_row, key_col, rc, cc, span)
    return rem & (offs_m[None, :] != pos[:, None])


@triton.jit
def _tile_needs_mask(start_m, M, grid_width, radius, lo, hi, BLOCK_M: tl.constexpr):
    """Scalar test: can any key of the tile [start_m, start_m + BLOCK_M) be within `radius` rows
    of a centre row in [lo, hi] (the anchor block's bounds, precomputed)? No reductions, no
    barriers: most tiles are far from every centre and skip the per-logit mask."""
    row_lo = start_m // grid_width
    row_hi = (tl.minimum(start_m + BLOCK_M, M) - 1) // grid_width
    return (row_hi > lo - radius) & (row_lo < hi + radius)


@triton.jit
def _removed_from_words(words_row, n_mask, NW, start, BLOCK_M: tl.constexpr):
    """(BLOCK_N, BLOCK_M) bool, keys [start, start + BLOCK_M): bit j % 32 of word j // 32 of each
    anchor's row of the exclusion bitmap (``_exclusion_words_kernel``). words_row: (BLOCK_N,)
    pointers to the anchors' rows of NW words; start is a multiple of min(BLOCK_M, 32).

    Per logit this is one AND with a loop-invariant one-hot column bit and one select: the
    per-centre geometry was paid once, in the pre-pass, not in every masked tile of every pass."""
    lane = tl.arange(0, BLOCK_M)
    q = start // 32
    w = tl.load(words_row + q, mask=n_mask, other=0)[:, None]
    if BLOCK_M >= 32:
        for k in tl.static_range(1, BLOCK_M // 32):
            wk = tl.load(words_row + q + k, mask=n_mask & (q + k < NW), other=0)
            w = tl.where((lane >= 32 * k)[None, :], wk[:, None], w)
        bit = 1 << (lane % 32)
    else:
        bit = 1 << ((start % 32) + lane)
    return (w & bit[None, :]) != 0


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _exclusion_words_kernel(
    pos_ptr,  # (B, N) int64
    crow_ptr,  # (B, N, C) int32 centre rows
    ccol_ptr,  # (B, N, C) int32 centre columns
    bound_ptr,  # (B, cdiv(N, BLOCK_N), 2) int32: min, max centre row of each anchor block
    words_ptr,  # (B, N, NW) int32 out: bit t of word q set when key 32q + t is removed
    N,
    M,
    NW,
    grid_width,
    radius,
    NUM_CENTERS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WORDS: tl.constexpr,
):
    """The exclusion mask as a bitmap, one bit per (anchor, key): the geometry (Chebyshev squares
    around up to NUM_CENTERS centres, the positive kept) is evaluated once per call here, and the
    loss kernels' masked tiles only test bits. Blocks far from every centre store zeros."""
    # One flat grid dimension over (anchor block, word block): x takes 2**31 - 1 programs, where
    # y would cap the word blocks at 65,535 (M below 8.4 M keys).
    word_blocks = tl.cdiv(NW, WORDS)
    pid_n = tl.program_id(0) // word_blocks
    q0 = (tl.program_id(0) % word_blocks) * WORDS
    pid_b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_q = q0 + tl.arange(0, WORDS)
    out = words_ptr + (pid_b * N + offs_n[:, None]) * NW + offs_q[None, :]
    out_mask = n_mask[:, None] & (offs_q < NW)[None, :]
    bound = bound_ptr + (pid_b * tl.cdiv(N, BLOCK_N) + pid_n) * 2
    lo = tl.load(bound)
    hi = tl.load(bound + 1)
    if _tile_needs_mask(q0 * 32, M, grid_width, radius, lo, hi, WORDS * 32):
        pos = tl.load(pos_ptr + pid_b * N + offs_n, mask=n_mask, other=-1)
        crow_base = crow_ptr + pid_b * N * NUM_CENTERS
        ccol_base = ccol_ptr + pid_b * N * NUM_CENTERS
        r0, c0 = _centre_corner(crow_base, ccol_base, offs_n, n_mask, radius, 0, NUM_CENTERS)
        r1, c1 = _centre_corner(crow_base, ccol_base, offs_n, n_mask, radius, 1, NUM_CENTERS)
        r2, c2 = _centre_corner(crow_base, ccol_base, offs_n, n_mask, radius, 2, NUM_CENTERS)
        r3, c3 = _centre_corner(crow_base, ccol_base, offs_n, n_mask, radius, 3, NUM_CENTERS)
        offs_m = q0 * 32 + tl.arange(0, WORDS * 32)
        removed = _removed(
            offs_m, pos, offs_n, n_mask, crow_base, ccol_base, grid_width, radius,
            r0, c0, r1, c1, r2, c2, r3, c3, NUM_CENTERS,
        )  # fmt: skip
        removed = removed & (offs_m < M)[None, :]
        lane = (tl.arange(0, WORDS * 32) % 32).to(tl.uint32)
        bits = tl.where(removed, tl.full((1,), 1, tl.uint32) << lane[None, :], 0).to(tl.uint32)
        # A sum of distinct powers of two is their OR (and the reduction the interpreter runs
        # fast: its tl.reduce_or calls a Python combine function per element).
        words = tl.sum(tl.reshape(bits, (BLOCK_N, WORDS, 32)), axis=2).to(tl.uint32)
        tl.store(out, words.to(tl.int32, bitcast=True), mask=out_mask)
    else:
        tl.store(out, tl.zeros((BLOCK_N, WORDS), dtype=tl.int32), mask=out_mask)


@triton.jit
def _normalize_backward_tile(dxhat, xhat, norm):
    """Chain rule through x̂ = x / max(|x|, eps) for whole rows: (dx̂ − x̂ (x̂·dx̂)) / |x|, or
    dx̂ / eps where the norm was clamped. Rows are complete (BLOCK_D covers d), so it fuses."""
    radial = tl.sum(xhat * dxhat, axis=1)
    clamped = norm <= 1e-6  # NORM_EPS
    dx = tl.where(clamped[:, None], dxhat, dxhat - xhat * radial[:, None])
    return dx / norm[:, None]


@triton.jit
def _store_grad(ptr, offs, mask, grad, SATURATE: tl.constexpr):
    """Store in the output dtype; fp16 saturates at its largest finite value (the 1/eps gradient
    of a zero vector would otherwise be inf)."""
    if SATURATE:
        grad = tl.minimum(tl.maximum(grad, -65504.0), 65504.0)
    tl.store(ptr + offs, grad.to(ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _info_nce_fwd_kernel(
    p_ptr,  # (B, N, D) normalised predictions
    k_ptr,  # (B, M, D) normalised keys
    pos_ptr,  # (B, N) int64
    words_ptr,  # (B, N, NW) int32 exclusion bitmap (unused without exclusion)
    bound_ptr,  # (B, cdiv(N, BLOCK_N), 2) int32: min, max centre row of each anchor block
    lse_ptr,  # (B, N) fp32 out: natural-log LSE over kept keys (split: (B, SPLITS, N) partials)
    nkept_ptr,  # split only: (B, SPLITS, N) int32 out, 1 where the split keeps at most the positive
    posl_ptr,  # (B, N) fp32 out: positive logit
    N,
    M,
    D,
    grid_width,
    radius,
    NW,
    scale,
    keys_per_split,  # keys each program of a split-key launch covers (M without a split)
    HAS_EXCLUSION: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,  # D == BLOCK_D: rows need no column mask (full, aligned vector loads)
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < N
    d_mask = offs_d < D if not EVEN_D else offs_d < BLOCK_D
    p_base = p_ptr + pid_b * N * D
    k_base = k_ptr + pid_b * M * D

    p = tl.load(
        p_base + offs_n[:, None] * D + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0
    )
    if DOT_FP32:
        p = p.to(tl.float32)
    pos = tl.load(pos_ptr + pid_b * N + offs_n, mask=n_mask, other=0)
    words_row = words_ptr + (pid_b * N + offs_n) * NW
    bound = bound_ptr + (pid_b * tl.num_programs(0) + pid_n) * 2
    lo = tl.load(bound)
    hi = tl.load(bound + 1)

    # Positive logit from a gathered key row, in fp32.
    k_pos = tl.load(
        k_base + pos[:, None] * D + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0
    )
    pos_logit = tl.sum(p.to(tl.float32) * k_pos.to(tl.float32), axis=1) * scale

    scale_log2 = scale * 1.4426950408889634
    # A finite floor instead of -inf: a tile where a row has no kept key must not give inf - inf.
    m_i = tl.full([BLOCK_N], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    m_start = split * keys_per_split
    m_end = tl.minimum(m_start + keys_per_split, M)
    for start_m in range(m_start, m_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        k = tl.load(
            k_base + offs_m[:, None] * D + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0
        )
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(p, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(m_mask[None, :], s, float("-inf"))
        masked = False
        if HAS_EXCLUSION:
            masked = _tile_needs_mask(start_m, m_end, grid_width, radius, lo, hi, BLOCK_M)
        # Only the logits leave the branch (a yielded 2-D mask would take a register per logit).
        if masked:
            s = tl.where(_removed_from_words(words_row, n_mask, NW, start_m, BLOCK_M), float("-inf"), s)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    # Only the positive counted (every negative removed, or each below 2^-16 of it): the sum is
    # then 1 and its max the positive, up to the rounding gap between the tile's logit and the
    # gathered one. Snap the positive to the LSE so the loss is exactly 0 instead of that gap
    # (the LSE itself stays as the backward expects it). A test on the sum, not a count of
    # kept keys: a per-logit count would cost registers and instructions in every masked tile.
    only_pos = (l_i <= 1.0000153) & (tl.abs(lse - pos_logit) <= 1e-3 * tl.maximum(tl.abs(pos_logit), 1.0))
    if SPLITS == 1:
        pos_logit = tl.where(only_pos, lse, pos_logit)
        tl.store(lse_ptr + pid_b * N + offs_n, lse, mask=n_mask)
    else:
        # Partial LSE (-inf where the split kept nothing) and whether the split holds nothing but
        # (at most) the positive; info_nce_fwd merges them (flash-decoding). only_pos counts in
        # the split that holds the positive only: elsewhere it would also hold for one negative
        # as strong as the positive (the merged loss would be 0 instead of log 2).
        tl.store(lse_ptr + (pid_b * SPLITS + split) * N + offs_n, lse, mask=n_mask)
        holds_pos = (pos >= m_start) & (pos < m_end)
        flag = ((only_pos & holds_pos) | (l_i == 0.0)).to(tl.int32)
        tl.store(nkept_ptr + (pid_b * SPLITS + split) * N + offs_n, flag, mask=n_mask)
    if split == 0:
        tl.store(posl_ptr + pid_b * N + offs_n, pos_logit, mask=n_mask)


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _info_nce_bwd_dp_kernel(
    p_ptr,
    k_ptr,
    pos_ptr,
    words_ptr,  # (B, N, NW) int32 exclusion bitmap
    bound_ptr,
    lse_ptr,
    g_ptr,  # (B, N) fp32 upstream gradient of the per-anchor loss
    pnorm_ptr,  # (B, N) fp32 norms of the raw predictions, clamped at NORM_EPS
    dp_ptr,  # (B, N, D) out, input dtype: gradient wrt the raw predictions
    N,
    M,
    D,
    grid_width,
    radius,
    NW,
    scale,
    HAS_EXCLUSION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    GRAD_PRECISION: tl.constexpr,
    GRAD_BF16: tl.constexpr,
    SATURATE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < N
    d_mask = offs_d < D if not EVEN_D else offs_d < BLOCK_D
    nd_mask = n_mask[:, None] & d_mask[None, :]
    k_base = k_ptr + pid_b * M * D

    p = tl.load(p_ptr + pid_b * N * D + offs_n[:, None] * D + offs_d[None, :], mask=nd_mask, other=0.0)
    if DOT_FP32:
        p = p.to(tl.float32)
    pos = tl.load(pos_ptr + pid_b * N + offs_n, mask=n_mask, other=-1)
    lse_log2 = tl.load(lse_ptr + pid_b * N + offs_n, mask=n_mask, other=0.0) * 1.4426950408889634
    g = tl.load(g_ptr + pid_b * N + offs_n, mask=n_mask, other=0.0)
    words_row = words_ptr + (pid_b * N + offs_n) * NW
    bound = bound_ptr + (pid_b * tl.num_programs(0) + pid_n) * 2
    lo = tl.load(bound)
    hi = tl.load(bound + 1)

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
        s = tl.where(m_mask[None, :] & n_mask[:, None], s - lse_log2[:, None], float("-inf"))
        if HAS_EXCLUSION:  # noqa: SIM102 (compile-time branch around a run-time one)
            if _tile_needs_mask(start_m, M, grid_width, radius, lo, hi, BLOCK_M):
                removed = _removed_from_words(words_row, n_mask, NW, start_m, BLOCK_M)
                s = tl.where(removed, float("-inf"), s)
        prob = tl.exp2(s)
        is_pos = offs_m[None, :] == pos[:, None]
        dlogit = g[:, None] * (prob - is_pos.to(tl.float32))
        if GRAD_BF16:
            # bf16 operands: g·(softmax − one-hot) is ~1/(B·N) under a mean, and bf16 keeps
            # fp32's exponent range (fp16 would flush it to subnormals; fp16 stays on tf32).
            dp += tl.dot(dlogit.to(tl.bfloat16), k)
        else:
            dp += tl.dot(dlogit, k.to(tl.float32), input_precision=GRAD_PRECISION)
    norm = tl.load(pnorm_ptr + pid_b * N + offs_n, mask=n_mask, other=1.0)
    dp = _normalize_backward_tile(dp * scale, p.to(tl.float32), norm)
    _store_grad(dp_ptr + pid_b * N * D, offs_n[:, None] * D + offs_d[None, :], nd_mask, dp, SATURATE)


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _info_nce_bwd_dk_kernel(
    p_ptr,
    k_ptr,
    pos_ptr,
    words_ptr,  # (B, N, NW) int32 exclusion bitmap
    bound_ptr,  # (B, cdiv(N, BLOCK_N), 2) int32 per anchor tile of this kernel's loop
    lse_ptr,
    g_ptr,
    knorm_ptr,  # (B, M) fp32 norms of the raw keys, clamped at NORM_EPS
    dk_ptr,  # (B, M, D) out, input dtype: gradient wrt the raw keys
    N,
    M,
    D,
    grid_width,
    radius,
    NW,
    scale,
    HAS_EXCLUSION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    GRAD_PRECISION: tl.constexpr,
    GRAD_BF16: tl.constexpr,
    SATURATE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < M
    d_mask = offs_d < D if not EVEN_D else offs_d < BLOCK_D
    md_mask = m_mask[:, None] & d_mask[None, :]
    p_base = p_ptr + pid_b * N * D
    n_blocks = tl.cdiv(N, BLOCK_N)

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
        s = tl.where(m_mask[None, :] & n_mask[:, None], s - lse_log2[:, None], float("-inf"))
        if HAS_EXCLUSION:
            bound = bound_ptr + (pid_b * n_blocks + start_n // BLOCK_N) * 2
            lo = tl.load(bound)
            hi = tl.load(bound + 1)
            if _tile_needs_mask(pid_m * BLOCK_M, M, grid_width, radius, lo, hi, BLOCK_M):
                words_row = words_ptr + (pid_b * N + offs_n) * NW
                removed = _removed_from_words(words_row, n_mask, NW, pid_m * BLOCK_M, BLOCK_M)
                s = tl.where(removed, float("-inf"), s)
        prob = tl.exp2(s)
        is_pos = offs_m[None, :] == pos[:, None]
        dlogit = g[:, None] * (prob - is_pos.to(tl.float32))
        if GRAD_BF16:
            dk += tl.dot(tl.trans(dlogit.to(tl.bfloat16)), p)
        else:
            dk += tl.dot(tl.trans(dlogit), p.to(tl.float32), input_precision=GRAD_PRECISION)
    norm = tl.load(knorm_ptr + pid_b * M + offs_m, mask=m_mask, other=1.0)
    dk = _normalize_backward_tile(dk * scale, k.to(tl.float32), norm)
    _store_grad(dk_ptr + pid_b * M * D, offs_m[:, None] * D + offs_d[None, :], md_mask, dk, SATURATE)


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
        raise ValueError(f"{OP}: empty input (pred {tuple(pred.shape)}, keys {tuple(keys.shape)}): B, N, M "
                         "and d must each be at least 1 (an anchor needs its positive among the keys)")
    if not isinstance(pos_index, torch.Tensor) or pos_index.dtype != torch.int64:
        got = pos_index.dtype if isinstance(pos_index, torch.Tensor) else type(pos_index).__name__
        raise TypeError(f"{OP}: pos_index must be an int64 tensor, got {got}; use .long()")
    if tuple(pos_index.shape) != (B, N):
        raise ValueError(f"{OP}: pos_index must be (B, N) = {(B, N)}, got {tuple(pos_index.shape)}")
    tensors = {"pred": pred, "keys": keys, "pos_index": pos_index}
    if isinstance(scale, bool) or not (
        isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0
    ):
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
    # Range checks read the data. On CUDA they are device-side asserts (no host sync, so CUDA-graph
    # capture works; a bad index fails at the next synchronisation); on CPU clear ValueErrors.
    # Skipped while torch.compile traces.
    if torch.compiler.is_compiling():
        return has_exclusion
    if pred.is_cuda:
        ok = (pos_index.min() >= 0) & (pos_index.max() < M)
        torch._assert_async(ok, f"{OP}: pos_index values must be in [0, M={M})")
        if exclude_centers is not None and exclude_centers.numel():
            ok = (exclude_centers.min() >= 0) & (exclude_centers.max() < M)
            torch._assert_async(ok, f"{OP}: exclude_centers values must be grid indices in [0, M={M})")
    else:
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
    """x (..., d) → (x̂ fp32, norm (..., 1) fp32 clamped at NORM_EPS).

    The norm is taken of x / max|x| (then scaled back), so |x| up to fp32's maximum neither
    overflows in the squares nor underflows: x̂ stays exact where the plain formula gives 0/inf.
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    peak = xf.abs().amax(-1, keepdim=True)
    xs = xf / torch.where(peak > 0, peak, torch.ones_like(peak))
    norm_s = torch.linalg.vector_norm(xs, dim=-1, keepdim=True)  # in [1, sqrt(d)], or 0
    norm = (norm_s * peak).clamp_min(NORM_EPS)
    return torch.where(norm > NORM_EPS, xs / norm_s.clamp_min(1.0), xf / NORM_EPS), norm


def _pad_rows(x: torch.Tensor) -> torch.Tensor:
    """x (B, n, d) contiguous, zero-padded to d' = the kernels' BLOCK_D (a power of two >= 16)."""
    d = x.shape[-1]
    width = max(16, triton.next_power_of_2(d))
    return torch.nn.functional.pad(x, (0, width - d)).contiguous() if width != d else x.contiguous()


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
        return 128, 64, block_d, 8, 3
    # Wider rows: shared memory (ptxas, sm_90, fp32 tf32x3 operands, 4 exclusion centres) is the
    # limit, 227 KB per block: d=128 at 64x64 tiles needs 228 KB with 3 stages, 194 KB with 2;
    # d=256 at 32x32 with 1 stage 128 KB; d=512 at 16x16 with 1 stage 128 KB.
    if block_d == 128:
        return 64, 64, block_d, 8, 2
    tile = 32 if block_d == 256 else 16
    return tile, tile, block_d, 4, 1


def _bwd_block_sizes(N: int, M: int, d: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """The backward kernels' (BLOCK_N, BLOCK_M, BLOCK_D, num_warps, num_stages): each holds a
    (BLOCK_N or BLOCK_M, BLOCK_D) fp32 accumulator besides two operand tiles."""
    block_n, block_m, block_d, warps, stages = _block_sizes(N, M, d)
    if interpreter_active():
        return block_n, block_m, block_d, warps, stages
    # Spill-free on sm_90 (ptxas of triton 3.8, launch/bench_kernels.py --static): 64 anchors for
    # 16-bit d <= 64; 16-bit d = 128 at 32 x 32 (64 x 64 spills). fp32 runs its dots as tf32x3
    # (split operands, about twice the registers): d = 64 at 32 x 64 with 2 stages (64 x 64
    # spills 16-584 B per thread, 64 x 32 32 B), d = 128 at 16 x 16 (32 x 32 spills 48-88 B).
    block_n = min(block_n, 64)
    if dtype == torch.float32 and block_d == 64:
        block_n, block_m, stages = 32, 64, 2
    elif dtype == torch.float32 and block_d == 128:
        block_n, block_m, warps, stages = 16, 16, 4, 1
    elif block_d == 128:
        block_n, block_m, stages = 32, 32, 1
    return block_n, block_m, block_d, warps, stages


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


def _num_sms(device: torch.device) -> int:
    """SMs of the device; 0 in the interpreter (no split-key launches there: each program costs
    milliseconds) and off CUDA."""
    if interpreter_active() or device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def _key_splits(programs: int, M: int, block_m: int, num_sms: int) -> int:
    """Key splits of the forward (flash-decoding): 1 unless the (anchor block, image) grid has
    fewer programs than the GPU has SMs; then enough splits for ~2 programs per SM, each split
    keeping at least 8 key tiles so the partial-LSE merge stays negligible."""
    if programs >= num_sms:
        return 1
    return max(1, min(triton.cdiv(2 * num_sms, programs), M // (8 * block_m)))


def _block_bounds(crow: torch.Tensor, block_n: int) -> torch.Tensor:
    """(B, cdiv(N, block_n), 2) int32: lowest and highest centre row of each anchor block, for
    the kernels' scalar test of which key tiles need the exclusion mask."""
    B, N, _ = crow.shape
    pad = triton.cdiv(N, block_n) * block_n - N
    lo = torch.nn.functional.pad(crow.amin(-1), (0, pad), value=1 << 30).view(B, -1, block_n).amin(-1)
    hi = torch.nn.functional.pad(crow.amax(-1), (0, pad), value=-(1 << 30)).view(B, -1, block_n).amax(-1)
    return torch.stack([lo, hi], dim=-1).contiguous()


def _launch_setup(pos_index, crow, ccol, radius, M, grid_width):
    has_excl = crow is not None and radius > 0
    if not has_excl:
        crow = ccol = pos_index.new_zeros((1, 1, 1), dtype=torch.int32)  # never read
    radius = _effective_radius(radius, M, grid_width) if has_excl else 0
    return has_excl, crow, ccol, radius


def _words_config() -> tuple[int, int, int]:
    """(BLOCK_N, WORDS, num_warps) of the bitmap pre-pass: 16 anchors x 4 words (128 keys) per
    program on a GPU (sm_90: 68-176 registers for 1-8 centres, no spills; 32 x 4 spills with 3
    centres, 16 x 8 with 5 or more); in the interpreter few, large programs."""
    if interpreter_active():
        return 64, 32, 4
    return 16, 4, 4


def exclusion_words(
    pos_index: torch.Tensor, crow: torch.Tensor, ccol: torch.Tensor, M: int, grid_width: int, radius: int
) -> torch.Tensor:
    """(B, N, cdiv(M, 32)) int32 bitmap of removed keys: bit t of word q of anchor n is set when
    key 32q + t is removed for it (within Chebyshev distance < radius of one of its centres, not
    the positive). One bit per logit: N·M/8 bytes per image (12.5 MB at N = M = 10⁴, 1/32 of one
    fp32 logit matrix), built by one launch and freed when the caller returns. radius is the
    clamped (``_effective_radius``) value; crow/ccol as ``_centre_grid`` returns them."""
    B, N, num_centers = crow.shape
    nw = triton.cdiv(M, 32)
    block_n, words, warps = _words_config()
    bounds = _block_bounds(crow, block_n)
    out = torch.empty((B, N, nw), dtype=torch.int32, device=crow.device)
    with _on_device(crow):
        _exclusion_words_kernel[(triton.cdiv(N, block_n) * triton.cdiv(nw, words), B)](
            pos_index, crow, ccol, bounds, out, N, M, nw, max(grid_width, 1), radius,
            NUM_CENTERS=num_centers, BLOCK_N=block_n, WORDS=words, num_warps=warps,
        )  # fmt: skip
    return out


def info_nce_fwd(
    p_hat: torch.Tensor,
    k_hat: torch.Tensor,
    pos_index: torch.Tensor,
    crow: torch.Tensor | None,
    ccol: torch.Tensor | None,
    scale: float,
    grid_width: int,
    radius: int,
    splits: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on normalised inputs.

    p_hat: (B, N, d), k_hat: (B, M, d) contiguous, fp32/fp16/bf16 (rows padded to a power of two
    >= 16 load as full vectors); pos_index (B, N) int64; crow/ccol: (B, N, C) int32 centre
    rows/columns or None (no exclusion). splits: key splits (0: ``_key_splits``'s choice).
    Returns (lse, pos_logit), each (B, N) fp32.
    """
    B, N, d = p_hat.shape
    M = k_hat.shape[1]
    has_excl, crow, ccol, radius = _launch_setup(pos_index, crow, ccol, radius, M, grid_width)
    block_n, block_m, block_d, warps, stages = _block_sizes(N, M, d)
    programs = triton.cdiv(N, block_n) * B
    if B > 65535:
        raise ValueError(f"{OP}: the kernels take B <= 65535 images per call (grid y), got B={B}")
    splits = splits or _key_splits(programs, M, block_m, _num_sms(p_hat.device))
    keys_per_split = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    splits = triton.cdiv(M, keys_per_split)
    bounds = _block_bounds(crow, block_n) if has_excl else crow
    words = exclusion_words(pos_index, crow, ccol, M, grid_width, radius) if has_excl else crow
    pos_logit = torch.empty((B, N), dtype=torch.float32, device=p_hat.device)
    lse = torch.empty((B, splits, N) if splits > 1 else (B, N), dtype=torch.float32, device=p_hat.device)
    n_kept = torch.empty((B, splits, N), dtype=torch.int32, device=p_hat.device) if splits > 1 else lse
    with _on_device(p_hat):
        _info_nce_fwd_kernel[(triton.cdiv(N, block_n), B, splits)](
            p_hat, k_hat, pos_index, words, bounds, lse, n_kept, pos_logit,
            N, M, d, max(grid_width, 1), radius, words.shape[-1], float(scale), keys_per_split,
            HAS_EXCLUSION=has_excl, SPLITS=splits,
            BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, EVEN_D=d == block_d,
            DOT_PRECISION=_dot_precision(p_hat.dtype), DOT_FP32=_dot_fp32(p_hat.dtype),
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
    if splits > 1:
        lse = torch.logsumexp(lse, dim=1)
        pos_logit = torch.where(n_kept.amin(1) > 0, lse, pos_logit)
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
    need_dp: bool = True,
    need_dk: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients wrt the raw inputs, (dpred (B, N, d), dkeys (B, M, d)) in p_hat's dtype; a
    gradient not asked for (need_dp / need_dk False) is not computed and comes back empty (0, d).

    p_norm (B, N), k_norm (B, M): fp32 norms of the raw vectors clamped at NORM_EPS (the
    normalisation's backward is fused into the kernels' epilogues); grad: (B, N) fp32, the
    upstream gradient of the per-anchor loss; lse from ``info_nce_fwd``.
    """
    B, N, d = p_hat.shape
    M = k_hat.shape[1]
    has_excl, crow, ccol, radius = _launch_setup(pos_index, crow, ccol, radius, M, grid_width)
    grad = grad.float().contiguous()
    dp = torch.empty_like(p_hat) if need_dp else p_hat.new_empty((0, d))
    dk = torch.empty_like(k_hat) if need_dk else k_hat.new_empty((0, d))
    block_n, block_m, block_d, warps, stages = _bwd_block_sizes(N, M, d, p_hat.dtype)
    bounds = _block_bounds(crow, block_n) if has_excl else crow
    # Built once for both kernels (the forward built its own: recomputing costs one pass over the
    # few (anchor block, key block) pairs near a centre; keeping it would hold N·M/8 bytes per
    # image from the forward to the backward).
    words = exclusion_words(pos_index, crow, ccol, M, grid_width, radius) if has_excl else crow
    low = p_hat.dtype != torch.float32 and not interpreter_active()
    common = dict(
        HAS_EXCLUSION=has_excl,
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, EVEN_D=d == block_d,
        DOT_PRECISION=_dot_precision(p_hat.dtype), DOT_FP32=_dot_fp32(p_hat.dtype),
        GRAD_PRECISION=_grad_precision(p_hat.dtype), GRAD_BF16=low and p_hat.dtype == torch.bfloat16,
        SATURATE=p_hat.dtype == torch.float16, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    args = (N, M, d, max(grid_width, 1), radius, words.shape[-1], float(scale))
    with _on_device(p_hat):
        if need_dp:
            _info_nce_bwd_dp_kernel[(triton.cdiv(N, block_n), B)](
                p_hat, k_hat, pos_index, words, bounds, lse, grad, p_norm, dp, *args, **common
            )
        if need_dk:
            _info_nce_bwd_dk_kernel[(triton.cdiv(M, block_m), B)](
                p_hat, k_hat, pos_index, words, bounds, lse, grad, k_norm, dk, *args, **common
            )
    return dp, dk


def _cache_bytes() -> int:
    """Data-cache bytes one core can count on: its L2, or its share of the L3 if that is larger
    (Linux sysfs); 1 MiB when unknown. One tile of logits is sized to stay there."""
    sizes: dict[int, int] = {}
    for index in range(8):
        base = f"/sys/devices/system/cpu/cpu0/cache/index{index}"
        try:
            with open(f"{base}/type") as f:
                kind = f.read().strip()
            with open(f"{base}/level") as f:
                level = int(f.read())
            with open(f"{base}/size") as f:
                text = f.read().strip()
        except (OSError, ValueError):
            continue
        if kind in ("Data", "Unified") and text[:-1].isdigit():
            sizes[level] = int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
    share = max(sizes.get(2, 0), sizes.get(3, 0) // max(1, os.cpu_count() or 1))
    return share or (1 << 20)


_CACHE_BYTES = _cache_bytes()  # read once at import (torch.compile cannot trace file reads)


def _torch_tiles(
    B: int, N: int, M: int, chunk_size: int | None, device: torch.device | str | None = None
) -> tuple[int, int]:
    """(chunk_n, chunk_m). Default: whole key rows (no online LSE, one logsumexp per tile) and as
    many anchors as fit one fp32 tile in the per-core cache (_cache_bytes; at least
    TORCH_MIN_TILE_ELEMENTS so per-op overhead stays small next to the work); on a CUDA
    ``device``, as many as fit TORCH_GPU_TILE_ELEMENTS."""
    if chunk_size is not None:
        return min(N, chunk_size), min(M, chunk_size)
    if device is not None and torch.device(device).type == "cuda":
        budget = TORCH_GPU_TILE_ELEMENTS
    else:
        budget = max(_CACHE_BYTES // 4, TORCH_MIN_TILE_ELEMENTS)
    return max(1, min(N, budget // (B * M))), M


def _effective_radius(radius: int, M: int, grid_width: int) -> int:
    """The radius clamped to the grid: any radius >= max(H, W) removes the same keys as
    max(H, W) (every key is then within it), and the clamped value fits int32 arithmetic."""
    return min(radius, max(M // max(grid_width, 1), grid_width))


def _torch_excluded_keys(
    pos_index: torch.Tensor, crow: torch.Tensor, ccol: torch.Tensor, M: int, grid_width: int, radius: int
) -> torch.Tensor:
    """(B, N, E) int64: the keys each anchor removes, M where none (off the grid, or the positive,
    which is never removed), E = C·(2r_h−1)·(2r_w−1) with the radius clamped to the grid height
    r_h and width r_w. Listing the few removed keys costs far less than testing every key."""
    height = M // grid_width
    rh, rw = min(radius, height), min(radius, grid_width)
    span_r = torch.arange(-(rh - 1), rh, device=pos_index.device, dtype=torch.int32)
    span_c = torch.arange(-(rw - 1), rw, device=pos_index.device, dtype=torch.int32)
    rows = crow[..., None, None] + span_r[:, None]  # (B, N, C, 2rh-1, 1)
    cols = ccol[..., None, None] + span_c[None, :]  # (B, N, C, 1, 2rw-1)
    on_grid = ((rows >= 0) & (rows < height)) & ((cols >= 0) & (cols < grid_width))
    idx = torch.where(on_grid, rows * grid_width + cols, M).flatten(2).long()
    return idx.masked_fill_(idx == pos_index[..., None], M)


class _TileMask:
    """Removes excluded keys from (B, n, m) tiles of logits held in a flat buffer with one spare
    element at the end: one index_fill_ per tile, no host sync. Where the removed-key lists would
    be longer than a quarter of the keys, a dense test on the grid coordinates is used instead."""

    def __init__(self, pos_index, crow, ccol, M: int, grid_width: int, radius: int):
        self.active = crow is not None and radius > 0
        if not self.active:
            return
        radius = _effective_radius(radius, M, grid_width)
        height = M // grid_width
        listed = crow.shape[-1] * (2 * min(radius, height) - 1) * (2 * min(radius, grid_width) - 1)
        self.dense = 4 * listed > M
        self.M, self.grid_width, self.radius = M, grid_width, radius
        self.pos, self.crow, self.ccol = pos_index, crow, ccol
        if not self.dense:
            self.excluded = _torch_excluded_keys(pos_index, crow, ccol, M, grid_width, radius)

    def apply(self, buf: torch.Tensor, s: torch.Tensor, n0: int, m0: int) -> None:
        """Set the removed logits of tile s = buf[:-1] view, rows n0.., keys m0.., to -inf."""
        if not self.active:
            return
        B, n, m = s.shape
        if self.dense:
            j = torch.arange(m0, m0 + m, device=s.device, dtype=torch.int32)
            krow, kcol = j // self.grid_width, j % self.grid_width
            removed = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
            for c in range(self.crow.shape[-1]):
                near_r = (krow - self.crow[:, n0 : n0 + n, c, None]).abs_() < self.radius
                removed |= near_r & ((kcol - self.ccol[:, n0 : n0 + n, c, None]).abs_() < self.radius)
            removed &= j != self.pos[:, n0 : n0 + n, None]
            s.masked_fill_(removed, -math.inf)
            return
        local = self.excluded[:, n0 : n0 + n] - m0
        base = torch.arange(0, B * n * m, m, device=s.device).view(B, n, 1)
        spill = B * n * m  # the buffer's spare element
        # "None" entries (M) fall outside every tile, as do keys of other tiles: both go to spill.
        in_tile = (local < m) if m0 == 0 else (local >= 0) & (local < m)
        lin = torch.where(in_tile, local + base, spill)
        buf.index_fill_(0, lin.flatten(), -math.inf)


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
    """PyTorch twin of ``info_nce_fwd`` over (B, chunk_n, chunk_m) tiles of logits; several key
    tiles per anchor block are merged with logaddexp. Computes in p_hat's dtype (fp32, or fp64
    for gradcheck). Returns (lse, pos_logit), each (B, N)."""
    B, N, _ = p_hat.shape
    M = k_hat.shape[1]
    mask = _TileMask(pos_index, crow, ccol, M, grid_width, radius)
    p_s = p_hat * scale
    k_t = k_hat.transpose(1, 2)
    lse = torch.empty((B, N), dtype=p_hat.dtype, device=p_hat.device)
    pos_logit = torch.empty_like(lse)
    buf = torch.empty(B * chunk_n * chunk_m + 1, dtype=p_hat.dtype, device=p_hat.device)
    tile_lse = torch.empty((B, chunk_n), dtype=p_hat.dtype, device=p_hat.device)
    for n0 in range(0, N, chunk_n):
        n = min(N, n0 + chunk_n) - n0
        out, pos_out = lse[:, n0 : n0 + n], pos_logit[:, n0 : n0 + n]
        for m0 in range(0, M, chunk_m):
            m = min(M, m0 + chunk_m) - m0
            s = buf[: B * n * m].view(B, n, m)
            torch.bmm(p_s[:, n0 : n0 + n], k_t[:, :, m0 : m0 + m], out=s)
            # The positive logit is read from the tile (never removed), so with every negative
            # removed the loss is exactly logsumexp([v]) - v = 0.
            local = pos_index[:, n0 : n0 + n] - m0
            val = s.gather(-1, local.clamp(0, m - 1)[..., None])[..., 0]
            if m0 == 0 and m == M:
                pos_out.copy_(val)
            else:
                pos_out.copy_(torch.where((local >= 0) & (local < m), val, pos_out))
            mask.apply(buf, s, n0, m0)
            if m0 == 0:
                torch.logsumexp(s, -1, out=out)
            else:
                torch.logsumexp(s, -1, out=tile_lse[:, :n])
                torch.logaddexp(out, tile_lse[:, :n], out=out)
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
    """PyTorch twin of ``info_nce_bwd``: (dp̂ (B, N, d), dk̂ (B, M, d)) in p_hat's dtype.

    One pass accumulates both gradients from each recomputed tile of softmax · g."""
    B, N, d = p_hat.shape
    M = k_hat.shape[1]
    mask = _TileMask(pos_index, crow, ccol, M, grid_width, radius)
    g = grad.to(p_hat.dtype)
    p_s = p_hat * scale
    k_t = k_hat.transpose(1, 2)
    neg_lse = (-lse).unsqueeze(-1)
    # The one-hot at the positive: −g·scale on the positive logit.
    index = pos_index[..., None].expand(-1, -1, d)
    g_s = (g * scale)[..., None]
    dp_hat = torch.gather(k_hat, 1, index).mul_(-g_s)
    dk_hat = torch.zeros_like(k_hat).scatter_add_(1, index, -g[..., None] * p_s)
    buf = torch.empty(B * chunk_n * chunk_m + 1, dtype=p_hat.dtype, device=p_hat.device)
    for n0 in range(0, N, chunk_n):
        n = min(N, n0 + chunk_n) - n0
        p_blk, ps_blk, dp_blk = p_hat[:, n0 : n0 + n], p_s[:, n0 : n0 + n], dp_hat[:, n0 : n0 + n]
        for m0 in range(0, M, chunk_m):
            m = min(M, m0 + chunk_m) - m0
            s = buf[: B * n * m].view(B, n, m)
            torch.baddbmm(neg_lse[:, n0 : n0 + n], ps_blk, k_t[:, :, m0 : m0 + m], out=s)
            mask.apply(buf, s, n0, m0)
            prob_g = s.exp_().mul_(g_s[:, n0 : n0 + n])  # scale · g · softmax
            dp_blk.baddbmm_(prob_g, k_hat[:, m0 : m0 + m])
            dk_hat[:, m0 : m0 + m].baddbmm_(prob_g.transpose(1, 2), p_blk)
    return dp_hat, dk_hat


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
    need_dp: bool,
    need_dk: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return info_nce_bwd(
        p_hat, k_hat, pos_index, crow, ccol, lse, grad, p_norm, k_norm, scale, grid_width, radius,
        need_dp, need_dk,
    )  # fmt: skip


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
def _(p_hat, k_hat, pos_index, crow, ccol, lse, grad, p_norm, k_norm, scale, grid_width, radius, need_dp, need_dk):  # noqa: E501
    d = p_hat.shape[-1]
    return (
        torch.empty_like(p_hat) if need_dp else p_hat.new_empty((0, d)),
        torch.empty_like(k_hat) if need_dk else k_hat.new_empty((0, d)),
    )


@_chunked_bwd_op.register_fake
def _(p_hat, k_hat, pos_index, crow, ccol, lse, grad, scale, grid_width, radius, chunk_n, chunk_m):
    return torch.empty_like(p_hat), torch.empty_like(k_hat)


# --------------------------------------------------------------------------------------------
# autograd.Functions
# --------------------------------------------------------------------------------------------


def _graph_inputs(pred: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The inputs that get a gradient, saved only so that :func:`first_order_only` can tie that
    gradient to them (no copy); None for the others (e.g. a key queue updated in place after the
    loss, which autograd would otherwise refuse as "modified by an inplace operation")."""
    return (pred if pred.requires_grad else None), (keys if keys.requires_grad else None)


class InfoNCEFunction(torch.autograd.Function):
    """Triton path. Saves the normalised inputs (input dtype), their norms and the LSE (and
    references to the inputs that get a gradient: :func:`_graph_inputs`)."""

    @staticmethod
    def forward(ctx, pred, keys, pos_index, crow, ccol, scale, grid_width, radius):
        p_hat, p_norm = _normalize(pred)
        k_hat, k_norm = _normalize(keys)
        # The kernels read the normalised vectors in the input dtype (fp16/bf16 tensor-core dots),
        # rows zero-padded to the kernels' power-of-two width: full, aligned vector loads for any d.
        p_low, k_low = _pad_rows(p_hat.to(pred.dtype)), _pad_rows(k_hat.to(keys.dtype))
        p_norm, k_norm = p_norm[..., 0].contiguous(), k_norm[..., 0].contiguous()
        pos_index = pos_index.contiguous()
        lse, pos_logit = _triton_fwd_op(p_low, k_low, pos_index, crow, ccol, scale, grid_width, radius)
        graph_inputs = _graph_inputs(pred, keys)
        ctx.save_for_backward(p_low, k_low, p_norm, k_norm, pos_index, crow, ccol, lse, *graph_inputs)
        ctx.scale, ctx.grid_width, ctx.radius, ctx.d = scale, grid_width, radius, pred.shape[-1]
        return (lse - pos_logit).to(pred.dtype)

    @staticmethod
    @first_order_only(OP, _SECOND_ORDER_FIX, inputs=lambda ctx: ctx.saved_tensors[-2:])
    def backward(ctx, grad):
        p_low, k_low, p_norm, k_norm, pos_index, crow, ccol, lse, _, _ = ctx.saved_tensors
        need_dp, need_dk = ctx.needs_input_grad[:2]
        dpred, dkeys = _triton_bwd_op(
            p_low, k_low, pos_index, crow, ccol, lse, grad.float().contiguous(), p_norm, k_norm,
            ctx.scale, ctx.grid_width, ctx.radius, need_dp, need_dk,
        )  # fmt: skip
        d = ctx.d
        dpred = dpred[..., :d] if need_dp else None
        dkeys = dkeys[..., :d] if need_dk else None
        return dpred, dkeys, None, None, None, None, None, None


def _to_grad_dtype(grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast to the input dtype; fp16 saturates at its largest finite value (the 1/eps gradient
    into a zero vector would be inf), as the kernels do."""
    if dtype == torch.float16:
        grad = grad.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max)
    return grad.to(dtype)


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
        graph_inputs = _graph_inputs(pred, keys)
        ctx.save_for_backward(p_hat, k_hat, p_norm, k_norm, pos_index, crow, ccol, lse, *graph_inputs)
        ctx.args = (scale, grid_width, radius, chunk_n, chunk_m)
        return (lse - pos_logit).to(pred.dtype)

    @staticmethod
    @first_order_only(OP, _SECOND_ORDER_FIX, inputs=lambda ctx: ctx.saved_tensors[-2:])
    def backward(ctx, grad):
        p_hat, k_hat, p_norm, k_norm, pos_index, crow, ccol, lse, _, _ = ctx.saved_tensors
        in_dtype = grad.dtype
        dp_hat, dk_hat = _chunked_bwd_op(
            p_hat, k_hat, pos_index, crow, ccol, lse, grad.to(p_hat.dtype).contiguous(), *ctx.args
        )
        dpred = _to_grad_dtype(_normalize_backward(dp_hat, p_hat, p_norm), in_dtype)
        dkeys = _to_grad_dtype(_normalize_backward(dk_hat, k_hat, k_norm), in_dtype)
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
        scale: τ; logits are scale · cos(pred, key). Default 64 (docs/method.md §6).
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
    # d padded to a power of two (>= 16), as the kernels load it; plain Python so that no triton
    # function runs on the PyTorch path (triton may be absent).
    d_pad = max(16, 1 << (pred.shape[-1] - 1).bit_length())
    rows = max(pred.shape[1], keys.shape[1]) * d_pad
    if path == "triton" and rows >= 2**31:
        if backend == "triton":
            raise ValueError(
                f"{OP}: the Triton kernels index one image's rows with int32: max(N, M) * d' = {rows} "
                f"(d' = d padded to a power of two) must stay below 2**31; pass fewer anchors/keys per "
                "image or use backend='torch'"
            )
        path = "torch"
    if path == "triton" and pred.shape[0] > 65535:
        if backend == "triton":
            raise ValueError(f"{OP}: the Triton kernels take B <= 65535 images per call, got {pred.shape[0]}")
        path = "torch"
    # (A register-file limit of the compiled kernels: the interpreter runs any width, which keeps
    # the kernel code tested at d = 64 on CPU.)
    if path == "triton" and not interpreter_active() and pred.shape[-1] > MAX_KERNEL_DIM[pred.dtype]:
        if backend == "triton":
            raise ValueError(
                f"{OP}: the Triton kernels take d <= {MAX_KERNEL_DIM[pred.dtype]} for {pred.dtype}, got "
                f"d={pred.shape[-1]}; use bfloat16 inputs (up to 512) or backend='torch'"
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
        chunk_n, chunk_m = _torch_tiles(pred.shape[0], pred.shape[1], keys.shape[1], chunk_size, pred.device)
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
    has_exclusion = _validate(pred, keys, pos_index, scale, grid_width, exclude_centers, exclude_radius,
                              reduction, backend)
    p = torch.nn.functional.normalize(pred, dim=-1, eps=NORM_EPS)
    k = torch.nn.functional.normalize(keys, dim=-1, eps=NORM_EPS)
    logits = scale * torch.bmm(p, k.transpose(1, 2))  # (B, N, M)
    if has_exclusion:
        M = keys.shape[1]
        # int64 throughout: an int32 compared with a radius >= 2**31 is False everywhere.
        j = torch.arange(M, device=pred.device, dtype=torch.int64)
        rows, cols = j // grid_width, j % grid_width
        removed = torch.zeros(logits.shape, dtype=torch.bool, device=pred.device)
        for c in range(exclude_centers.shape[-1]):  # one (B, N, M) mask per centre, not (B, N, C, M)
            centre = exclude_centers[..., c, None]
            near_row = (rows - centre // grid_width).abs_() < exclude_radius
            removed |= near_row & ((cols - centre % grid_width).abs_() < exclude_radius)
        removed &= j != pos_index[..., None]
        logits = logits.masked_fill(removed, float("-inf"))
    loss = torch.logsumexp(logits, dim=-1) - torch.gather(logits, 2, pos_index[..., None])[..., 0]
    return _reduce(loss, reduction)
