"""spsr_kernels.info_nce against the naive reference (loss and both gradients), both backends.

"triton" runs the kernels (in the interpreter on machines without CUDA); "torch" is the chunked
PyTorch path, run with a small chunk size so several anchor and key tiles are exercised.
The reference itself is checked against a loop-by-loop construction of the mask.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from spsr_kernels import InfoNCELoss, info_nce, info_nce_ref

nce = importlib.import_module("spsr_kernels.info_nce")  # the module (the package re-exports names)

BACKENDS = ["triton", "torch"]
TORCH_CHUNK = 7  # small and odd: anchors and keys both span several ragged tiles
# Where the Triton kernels run: compiled on a CUDA device, else the interpreter on CPU tensors.
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _on_kernel_device(x):
    return x.to(KERNEL_DEVICE) if isinstance(x, torch.Tensor) else x


def _run(backend: str, *args, **kwargs) -> torch.Tensor:
    """info_nce on CPU inputs; the triton backend runs on KERNEL_DEVICE (copies in and out are
    differentiable, so gradients reach the CPU leaves)."""
    if backend == "torch":
        kwargs.setdefault("chunk_size", TORCH_CHUNK)
        return info_nce(*args, backend=backend, **kwargs)
    args = [_on_kernel_device(a) for a in args]
    kwargs = {k: _on_kernel_device(v) for k, v in kwargs.items()}
    return info_nce(*args, backend=backend, **kwargs).cpu()


def _make(B, N, H, W, d, C=0, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    M = H * W
    pred = torch.randn(B, N, d, generator=g).to(device=device, dtype=dtype)
    keys = torch.randn(B, M, d, generator=g).to(device=device, dtype=dtype)
    pos = torch.randint(0, M, (B, N), generator=g).to(device)
    centers = torch.randint(0, M, (B, N, C), generator=g).to(device) if C else None
    return pred, keys, pos, centers


def _loss_and_grads(fn, pred, keys, pos, upstream=None, **kw):
    p = pred.detach().clone().requires_grad_()
    k = keys.detach().clone().requires_grad_()
    loss = fn(p, k, pos, **kw)
    if upstream is None:
        upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss)
    gp, gk = torch.autograd.grad(loss, (p, k), upstream)
    return loss, gp, gk


def _assert_close(name, got, want, atol, rtol):
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# (B, N, H, W, d, C, radius): awkward sizes, M not a multiple of the 64-key tile, N spanning two
# anchor blocks, every d in {8, 24, 32, 64}, radius 0..3 with 1..4 centres.
CASES = [
    pytest.param(2, 11, 5, 7, 8, 0, 0, id="B2-d8-noexcl"),
    pytest.param(1, 1, 1, 1, 32, 0, 0, id="N1-M1"),
    pytest.param(1, 1, 4, 5, 16, 2, 1, id="N1-r1"),
    pytest.param(2, 70, 9, 11, 24, 4, 3, id="M99-d24-r3-C4"),
    pytest.param(1, 20, 3, 30, 64, 1, 1, id="d64-r1-C1"),
    pytest.param(3, 33, 12, 12, 32, 3, 2, id="B3-d32-r2-C3"),
    pytest.param(1, 9, 6, 8, 32, 2, 0, id="r0-with-centres"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("B", "N", "H", "W", "d", "C", "radius"), CASES)
def test_matches_reference(backend, B, N, H, W, d, C, radius):
    pred, keys, pos, centers = _make(B, N, H, W, d, C)
    kw = dict(scale=64.0, grid_width=W, exclude_centers=centers, exclude_radius=radius, reduction="none")
    loss, gp, gk = _loss_and_grads(lambda *a, **k: _run(backend, *a, **k), pred, keys, pos, **kw)
    ref, rp, rk = _loss_and_grads(info_nce_ref, pred, keys, pos, **kw)
    assert loss.shape == (B, N) and loss.dtype == torch.float32
    _assert_close("loss", loss, ref, 1e-4, 1e-4)
    _assert_close("dpred", gp, rp, 1e-4, 1e-4)
    _assert_close("dkeys", gk, rk, 1e-4, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions(backend, reduction):
    pred, keys, pos, centers = _make(2, 10, 4, 6, 16, C=2)
    kw = dict(grid_width=6, exclude_centers=centers, exclude_radius=1, reduction=reduction)
    loss, gp, gk = _loss_and_grads(
        lambda *a, **k: _run(backend, *a, **k), pred, keys, pos, upstream=torch.tensor(1.0), **kw
    )
    _, rp, rk = _loss_and_grads(info_nce_ref, pred, keys, pos, upstream=torch.tensor(1.0), **kw)
    assert loss.dim() == 0
    per_anchor = info_nce_ref(pred, keys, pos, **{**kw, "reduction": "none"})
    expected = per_anchor.mean() if reduction == "mean" else per_anchor.sum()
    _assert_close("loss", loss, expected, 1e-4, 1e-5)
    _assert_close("dpred", gp, rp, 1e-5, 1e-4)
    _assert_close("dkeys", gk, rk, 1e-5, 1e-4)


def test_reference_against_loops():
    """The reference's mask and loss, rebuilt element by element from the contract's words."""
    B, N, H, W, d, radius = 2, 5, 4, 5, 8, 2
    pred, keys, pos, centers = _make(B, N, H, W, d, C=2, dtype=torch.float64)
    pos[0, 0] = centers[0, 0, 0]  # a positive at an exclusion centre must stay
    scale = 10.0
    got = info_nce_ref(pred, keys, pos, scale=scale, grid_width=W, exclude_centers=centers,
                       exclude_radius=radius, reduction="none")  # fmt: skip
    want = torch.empty(B, N, dtype=torch.float64)
    for b in range(B):
        for n in range(N):
            p = pred[b, n] / pred[b, n].norm()
            terms = []
            for j in range(H * W):
                removed = any(
                    max(abs(j // W - c // W), abs(j % W - c % W)) < radius for c in centers[b, n].tolist()
                )
                if removed and j != pos[b, n]:
                    continue
                terms.append(scale * float(p @ (keys[b, j] / keys[b, j].norm())))
            positive = scale * float(p @ (keys[b, pos[b, n]] / keys[b, pos[b, n]].norm()))
            want[b, n] = math.log(sum(math.exp(t) for t in terms)) - positive
    _assert_close("loss", got, want, 1e-10, 1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("centre_row", [5, 7, 8])
def test_exclusion_near_key_tile_boundary(backend, centre_row):
    """A 16×8 map is two 64-key tiles (rows 0-7, 8-15): zones that stop short of, touch, or
    straddle the tile boundary, so the kernel's tile-level skip test is exercised both ways."""
    B, N, H, W, d = 1, 12, 16, 8, 16
    pred, keys, pos, _ = _make(B, N, H, W, d)
    cols = torch.randint(0, W, (B, N, 2))
    centers = centre_row * W + cols
    kw = dict(grid_width=W, exclude_centers=centers, exclude_radius=2, reduction="none")
    loss, gp, gk = _loss_and_grads(lambda *a, **k: _run(backend, *a, **k), pred, keys, pos, **kw)
    ref, rp, rk = _loss_and_grads(info_nce_ref, pred, keys, pos, **kw)
    _assert_close("loss", loss, ref, 1e-4, 1e-4)
    _assert_close("dpred", gp, rp, 1e-4, 1e-4)
    _assert_close("dkeys", gk, rk, 1e-4, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_positive_inside_excluded_zone_is_kept(backend):
    B, N, H, W, d = 1, 6, 5, 5, 16
    pred, keys, pos, _ = _make(B, N, H, W, d)
    centers = pos[..., None].clone()  # every positive sits at its own exclusion centre
    kw = dict(grid_width=W, exclude_centers=centers, exclude_radius=2, reduction="none")
    loss = _run(backend, pred, keys, pos, **kw)
    _assert_close("loss", loss, info_nce_ref(pred, keys, pos, **kw), 1e-4, 1e-4)
    # With the positive kept the loss is log(1 + Σ negatives) > 0; had it been removed too,
    # the loss would not include exp(positive) and could go negative or infinite.
    assert torch.isfinite(loss).all() and (loss > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_negatives_excluded_gives_zero_loss(backend):
    B, N, H, W, d = 2, 4, 3, 3, 8
    pred, keys, pos, _ = _make(B, N, H, W, d)
    centers = torch.full((B, N, 1), 4, dtype=torch.int64)  # the middle of the 3×3 map
    kw = dict(grid_width=W, exclude_centers=centers, exclude_radius=3, reduction="none")
    loss, gp, gk = _loss_and_grads(lambda *a, **k: _run(backend, *a, **k), pred, keys, pos, **kw)
    assert torch.equal(loss, torch.zeros(B, N)), loss  # exactly 0, not a rounding residue
    assert torch.isfinite(gp).all() and torch.isfinite(gk).all()
    _assert_close("dpred", gp, torch.zeros_like(gp), 1e-5, 0)
    _assert_close("dkeys", gk, torch.zeros_like(gk), 1e-5, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_100_no_overflow(backend):
    # Nearly parallel vectors put logits near 100: exp(100) overflows fp32 without a running max.
    B, N, H, W, d = 1, 8, 4, 4, 32
    base = torch.randn(1, 1, d)
    pred = base + 0.01 * torch.randn(B, N, d)
    keys = base + 0.01 * torch.randn(B, H * W, d)
    pos = torch.randint(0, H * W, (B, N))
    loss, gp, gk = _loss_and_grads(
        lambda *a, **k: _run(backend, *a, **k), pred, keys, pos, scale=100.0, reduction="none"
    )
    ref, rp, rk = _loss_and_grads(
        info_nce_ref, pred.double(), keys.double(), pos, scale=100.0, reduction="none"
    )
    assert torch.isfinite(loss).all() and torch.isfinite(gp).all() and torch.isfinite(gk).all()
    _assert_close("loss", loss, ref.float(), 1e-3, 1e-4)
    _assert_close("dpred", gp, rp.float(), 1e-2, 1e-3)
    _assert_close("dkeys", gk, rk.float(), 1e-2, 1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """Keys as NSE code builds them, z.flatten(2).transpose(1, 2) (a strided view), a sliced
    pred and an expanded (stride-0) pos_index; gradients flow back to the underlying leaves."""
    B, d, H, W = 2, 16, 5, 6
    pos = torch.arange(H * W).expand(B, -1)
    centers = torch.stack([pos, (pos + 1) % (H * W)], dim=-1)
    kw = dict(grid_width=W, exclude_centers=centers, exclude_radius=2, reduction="sum")
    z0, base0 = torch.randn(B, d, H, W), torch.randn(B, 2 * H * W, d)
    results = []
    for fn in (lambda *a, **k: _run(backend, *a, **k), info_nce_ref):
        z, base = z0.clone().requires_grad_(), base0.clone().requires_grad_()
        keys, pred = z.flatten(2).transpose(1, 2), base[:, ::2]
        assert not keys.is_contiguous() and not pred.is_contiguous()
        loss = fn(pred, keys, pos, **kw)
        loss.backward()
        results.append((loss, base.grad, z.grad))
    for name, got, want in zip(("loss", "dpred", "dkeys"), *results):
        _assert_close(name, got, want, 1e-4, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_vectors_are_finite(backend):
    pred, keys, pos, _ = _make(1, 5, 3, 4, 16)
    pred[0, 1] = 0.0
    keys[0, 2] = 0.0
    pos[0, 3] = 2  # an anchor whose positive is a zero key
    loss, gp, gk = _loss_and_grads(lambda *a, **k: _run(backend, *a, **k), pred, keys, pos, reduction="none")
    ref, rp, rk = _loss_and_grads(info_nce_ref, pred, keys, pos, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(gp).all() and torch.isfinite(gk).all()
    _assert_close("loss", loss, ref, 1e-4, 1e-4)
    # Gradients into a zero vector are scaled by 1/eps: compare relative to their size.
    _assert_close("dpred", gp, rp, 1e-4, 1e-4)
    _assert_close("dkeys", gk, rk, 1e-4, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_pytorch_error(backend, dtype):
    """Distance to an fp32 reference at most ~2× PyTorch's own distance in that dtype."""
    pred, keys, pos, centers = _make(2, 40, 8, 10, 32, C=2)
    kw = dict(grid_width=10, exclude_centers=centers, exclude_radius=2, reduction="none")
    gold = _loss_and_grads(info_nce_ref, pred, keys, pos, **kw)
    low = _loss_and_grads(info_nce_ref, pred.to(dtype), keys.to(dtype), pos, **kw)
    got = _loss_and_grads(lambda *a, **k: _run(backend, *a, **k), pred.to(dtype), keys.to(dtype), pos, **kw)
    assert all(t.dtype == dtype for t in got)
    floor = 1e-2 if dtype == torch.bfloat16 else 1e-3  # absolute slack for near-zero PyTorch error
    for name, g, l, r in zip(("loss", "dpred", "dkeys"), got, low, gold):
        err_ours = (g.float() - r).abs().max().item()
        err_torch = (l.float() - r).abs().max().item()
        assert err_ours <= 2 * err_torch + floor, f"{name}: ours {err_ours:.3g} vs PyTorch {err_torch:.3g}"


def test_gradcheck_float64_torch_path():
    pred, keys, pos, centers = _make(1, 4, 3, 3, 5, C=2, dtype=torch.float64)
    pred.requires_grad_()
    keys.requires_grad_()

    def fn(p, k):
        return info_nce(p, k, pos, scale=3.0, grid_width=3, exclude_centers=centers, exclude_radius=1,
                        reduction="none", backend="torch", chunk_size=2)  # fmt: skip

    assert torch.autograd.gradcheck(fn, (pred, keys))


def test_float64_triton_is_rejected_and_auto_falls_back():
    pred, keys, pos, _ = _make(1, 3, 2, 2, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='torch'"):
        info_nce(*(t.to(KERNEL_DEVICE) for t in (pred, keys, pos)), backend="triton")
    got = info_nce(pred, keys, pos, backend="auto", reduction="none")
    assert got.dtype == torch.float64
    _assert_close("loss", got, info_nce_ref(pred, keys, pos, reduction="none"), 1e-12, 1e-12)


def test_module_and_training_loop():
    """Eager training: a linear predictor learns to map context vectors onto their targets."""
    torch.manual_seed(0)
    B, H, W, d = 2, 6, 6, 16
    M = H * W
    keys = torch.nn.functional.normalize(torch.randn(B, M, d), dim=-1)
    pos = torch.arange(M).repeat(B, 1)
    context = keys @ torch.linalg.qr(torch.randn(d, d))[0]  # a hidden rotation of the targets
    predictor = torch.nn.Linear(d, d)
    loss_fn = InfoNCELoss(scale=16.0, exclude_radius=1)
    opt = torch.optim.Adam(predictor.parameters(), lr=5e-2)
    centers = pos[..., None]
    losses = []
    for _ in range(15):
        loss = loss_fn(predictor(context), keys, pos, grid_width=W, exclude_centers=centers)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow  # the first torch.compile in a process pays several seconds of setup
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_traces_the_op(backend):
    """The launchers are torch.library custom ops: a model calling info_nce compiles in one graph."""
    pred, keys, pos, centers = _make(2, 10, 6, 6, 16, C=2)
    layer = torch.nn.Linear(16, 16)

    def step(x, k):
        return info_nce(
            layer(x), k, pos, grid_width=6, exclude_centers=centers, exclude_radius=2, backend=backend
        )

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss, _, gk = _loss_and_grads(
        lambda p, k, _pos: compiled(p, k), pred, keys, pos, upstream=torch.tensor(1.0)
    )
    want, _, rk = _loss_and_grads(lambda p, k, _pos: step(p, k), pred, keys, pos, upstream=torch.tensor(1.0))
    _assert_close("loss", loss, want, 1e-6, 1e-6)
    _assert_close("dkeys", gk, rk, 1e-6, 1e-6)


BAD = [
    (dict(pred=torch.randn(2, 3)), ValueError, "pred must be"),
    (dict(keys=torch.randn(2, 9, 7)), ValueError, "share batch"),
    (dict(keys=torch.randn(3, 9, 8)), ValueError, "share batch"),
    (dict(pos_index=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "int64"),
    (dict(pos_index=torch.zeros(2, 4, dtype=torch.int64)), ValueError, "pos_index must be"),
    (dict(pos_index=torch.full((2, 3), 9)), ValueError, r"\[0, M=9\)"),
    (dict(pos_index=torch.full((2, 3), -1)), ValueError, r"\[0, M=9\)"),
    (dict(pred=torch.zeros(2, 3, 8, dtype=torch.int32)), TypeError, "dtype"),
    (dict(keys=torch.randn(2, 9, 8).half()), TypeError, "cast both"),
    (
        dict(exclude_centers=torch.zeros(2, 3, 1, dtype=torch.int64), exclude_radius=1),
        ValueError,
        "grid_width",
    ),
    (
        dict(exclude_centers=torch.zeros(2, 3, 1, dtype=torch.int64), exclude_radius=-1, grid_width=3),
        ValueError,
        "exclude_radius",
    ),
    (dict(exclude_radius=2, grid_width=3), ValueError, "needs exclude_centers"),
    (
        dict(exclude_centers=torch.zeros(2, 3, 1, dtype=torch.int64), exclude_radius=1, grid_width=4),
        ValueError,
        "grid_width=4",
    ),
    (
        dict(exclude_centers=torch.full((2, 3, 1), 9), exclude_radius=1, grid_width=3),
        ValueError,
        "exclude_centers values",
    ),
    (
        dict(exclude_centers=torch.zeros(2, 3, dtype=torch.int64), exclude_radius=1, grid_width=3),
        ValueError,
        r"\(B, N, C\)",
    ),
    (dict(exclude_centers=torch.zeros(2, 3, 1), exclude_radius=1, grid_width=3), TypeError, "int64"),
    (dict(exclude_centers=[[[0]]] * 2, exclude_radius=1, grid_width=3), TypeError, "int64"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(scale=-1.0), ValueError, "scale"),
    (dict(scale=True), ValueError, "scale"),
    (dict(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize(("override", "exc", "match"), BAD)
def test_bad_inputs_raise_clear_errors(override, exc, match):
    args = dict(
        pred=torch.randn(2, 3, 8), keys=torch.randn(2, 9, 8), pos_index=torch.zeros(2, 3, dtype=torch.int64)
    )
    args.update(override)
    pred, keys, pos = args.pop("pred"), args.pop("keys"), args.pop("pos_index")
    for fn in (info_nce, info_nce_ref):
        with pytest.raises(exc, match=match):
            fn(pred, keys, pos, **args)


@pytest.mark.parametrize("backend", [*BACKENDS, "ref"])
@pytest.mark.parametrize("radius", [600, 2**31 - 1, 2**31, 2**40])
def test_radius_beyond_the_grid(backend, radius):
    """A radius past the map removes every negative: loss exactly 0. Near 2**31 it once wrapped
    int32 in the kernels (exclusion silently off, loss ~ 38); on the torch path the removed-key
    lists grew with radius² (600 on a 5×7 map: 650 MB) and are now bounded by the grid. The
    reference compared int32 distances with the radius: from 2**31 on it removed nothing."""
    B, N, H, W, d = 1, 6, 5, 7, 16
    pred, keys, pos, centers = _make(B, N, H, W, d, C=2)
    kw = dict(grid_width=W, exclude_centers=centers, exclude_radius=radius, reduction="none")
    fn = info_nce_ref if backend == "ref" else (lambda *a, **k: _run(backend, *a, **k))
    loss, gp, gk = _loss_and_grads(fn, pred, keys, pos, **kw)
    assert torch.equal(loss, torch.zeros(B, N)), loss
    if backend == "ref":
        return
    assert torch.isfinite(gp).all() and torch.isfinite(gk).all()
    _assert_close("dpred", gp, torch.zeros_like(gp), 1e-5, 0)
    crow, ccol = nce._centre_grid(centers, W)
    listed = nce._torch_excluded_keys(pos, crow, ccol, H * W, W, nce._effective_radius(radius, H * W, W))
    assert listed.shape[-1] <= 2 * (2 * H - 1) * (2 * W - 1)


def test_zero_exclusion_centres_exclude_nothing_in_every_implementation():
    """C = 0 centres with a radius and no grid_width: the validation reads it as no exclusion.
    Before: info_nce_ref still built the mask and failed with a TypeError (j // None)."""
    pred, keys, pos, _ = _make(2, 4, 3, 4, 8)
    none = torch.zeros(2, 4, 0, dtype=torch.int64)
    want = info_nce_ref(pred.double(), keys.double(), pos, reduction="none")
    for fn in (info_nce_ref, lambda *a, **k: _run("triton", *a, **k), lambda *a, **k: _run("torch", *a, **k)):
        got = fn(pred, keys, pos, exclude_centers=none, exclude_radius=2, reduction="none")
        _assert_close("loss", got.double(), want, 1e-5, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("magnitude", [1e20, 1e30])
def test_extreme_magnitudes_normalise_exactly(backend, magnitude):
    """cos is scale-free: inputs whose squares overflow fp32 (|x| >~ 1e19) give the loss of the
    unscaled inputs, and gradients scaled by 1/magnitude. (Tiny vectors are another matter: the
    contract divides those shorter than 1e-6 by 1e-6.)"""
    pred, keys, pos, centers = _make(2, 9, 4, 5, 16, C=2)
    kw = dict(grid_width=5, exclude_centers=centers, exclude_radius=1, reduction="none")
    want, wp, wk = _loss_and_grads(info_nce_ref, pred.double(), keys.double(), pos, **kw)
    loss, gp, gk = _loss_and_grads(
        lambda *a, **k: _run(backend, *a, **k), pred * magnitude, keys * magnitude, pos, **kw
    )
    _assert_close("loss", loss, want.float(), 1e-4, 1e-4)
    _assert_close("dpred", gp.double() * magnitude, wp, 1e-4, 1e-3)
    _assert_close("dkeys", gk.double() * magnitude, wk, 1e-4, 1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_zero_vectors_have_finite_gradients(backend):
    """The gradient into a zero vector is dx̂/eps (1e6 x an O(1) value): past fp16's range, so it
    saturates at ±65504 instead of becoming inf."""
    pred, keys, pos, _ = _make(1, 5, 3, 4, 16)
    pred[0, 1] = 0.0
    keys[0, 2] = 0.0
    pos[0, 3] = 2
    _, gp, gk = _loss_and_grads(
        lambda *a, **k: _run(backend, *a, **k), pred.half(), keys.half(), pos, reduction="sum",
        upstream=torch.tensor(1.0, dtype=torch.float16),
    )  # fmt: skip
    assert gp.dtype == torch.float16 and torch.isfinite(gp).all() and torch.isfinite(gk).all()
    assert gp[0, 1].abs().max() > 1000  # the large gradient is there, just clamped


@pytest.mark.parametrize("need", ["pred", "keys"])
def test_backward_runs_only_the_kernels_asked_for(need, monkeypatch):
    """needs_input_grad: a frozen key encoder costs no dK kernel, a frozen predictor no dP."""
    pred, keys, pos, centers = _make(2, 20, 5, 6, 16, C=2)
    kw = dict(grid_width=6, exclude_centers=centers, exclude_radius=2, reduction="sum")
    skipped = "_info_nce_bwd_dk_kernel" if need == "pred" else "_info_nce_bwd_dp_kernel"

    class Forbidden:
        def __getitem__(self, grid):
            raise AssertionError(f"{skipped} launched although its gradient was not asked for")

    monkeypatch.setattr(nce, skipped, Forbidden())
    leaf = (pred if need == "pred" else keys).clone().requires_grad_()
    args = (leaf, keys, pos) if need == "pred" else (pred, leaf, pos)
    (grad,) = torch.autograd.grad(_run("triton", *args, **kw), leaf)
    ref_leaf = leaf.detach().clone().requires_grad_()
    ref_args = (ref_leaf, keys, pos) if need == "pred" else (pred, ref_leaf, pos)
    (want,) = torch.autograd.grad(info_nce_ref(*ref_args, **kw), ref_leaf)
    _assert_close("grad", grad, want, 1e-4, 1e-4)


def test_split_key_forward_equals_plain():
    """Split-key forward (partial LSEs over key ranges merged, as in flash-decoding) against the
    one-pass forward, with exclusion and an anchor whose negatives are all removed."""
    B, N, H, W, d = 2, 10, 12, 16, 16
    pred, keys, pos, centers = _make(B, N, H, W, d, C=3)
    centers[0, 0] = pos[0, 0]
    pred, keys, pos, centers = (t.to(KERNEL_DEVICE) for t in (pred, keys, pos, centers))
    p_hat, k_hat = nce._normalize(pred)[0], nce._normalize(keys)[0]
    crow, ccol = nce._centre_grid(centers, W)
    plain = nce.info_nce_fwd(p_hat, k_hat, pos, crow, ccol, 64.0, W, 2, splits=1)
    split = nce.info_nce_fwd(p_hat, k_hat, pos, crow, ccol, 64.0, W, 2, splits=3)
    _assert_close("lse", split[0], plain[0], 1e-5, 1e-6)
    _assert_close("pos_logit", split[1], plain[1], 0, 0)
    every = nce.info_nce_fwd(p_hat, k_hat, pos, crow, ccol, 64.0, W, 10**6, splits=3)
    assert torch.equal(every[0], every[1])  # all negatives removed: lse == positive exactly


@pytest.mark.parametrize(("M", "dup"), [(128, 1), (128, 64), (128, 127), (192, 100), (192, 191),
                                        (256, 63), (256, 130), (256, 255)])
def test_split_key_forward_with_a_negative_as_strong_as_the_positive(M, dup):
    """Key ``dup`` duplicates the positive (key 0), every other key is orthogonal: the loss is
    log(2 + (M - 2) e^-64). Before: a split holding the duplicate and nothing else that counts
    flagged itself "only the positive" (its one dominant key scores as the positive does), and
    with every split so flagged the merged loss was 0 (the duplicate outside the first split)."""
    B, N, d = 1, 1, 16
    keys = torch.zeros(B, M, d, dtype=torch.float64)
    keys[..., 1] = 1.0
    keys[0, 0] = keys[0, dup] = torch.eye(d, dtype=torch.float64)[0]
    pred = torch.eye(d, dtype=torch.float64)[0].reshape(1, 1, d)
    pos = torch.zeros(B, N, dtype=torch.int64)
    want = info_nce_ref(pred, keys, pos, reduction="none")
    assert abs(want.item() - math.log(2 + (M - 2) * math.exp(-64.0))) < 1e-12  # the reference itself
    p_hat, k_hat = (nce._normalize(t.float().to(KERNEL_DEVICE))[0] for t in (pred, keys))
    block_m = nce._block_sizes(N, M, d)[1]
    ran = set()
    for asked in (1, 2, 3, 4):
        lse, pos_logit = nce.info_nce_fwd(p_hat, k_hat, pos.to(KERNEL_DEVICE), None, None, 64.0, 1, 0,
                                          splits=asked)
        _assert_close(f"loss, splits={asked}", (lse - pos_logit).cpu().double(), want, 1e-5, 1e-5)
        per_split = math.ceil(math.ceil(M / asked) / block_m) * block_m  # info_nce_fwd's key range
        ran.add(math.ceil(M / per_split))
    assert 1 in ran and max(ran) == min(4, math.ceil(M / block_m))  # up to every key tile its own split


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_second_order_gradients_raise_instead_of_being_zero(backend):
    """Neither autograd Function is twice differentiable. Before: a gradient penalty through
    info_nce, added to any other term, silently contributed a zero gradient (info_nce_ref's is
    not zero); now differentiating the gradient raises."""
    pred = torch.randn(1, 4, 8, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(1, 6, 8, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2, 3]])
    (g_ref,) = torch.autograd.grad(info_nce_ref(pred, keys, pos), pred, create_graph=True)
    (gg_ref,) = torch.autograd.grad(g_ref.pow(2).sum() + 0 * pred.sum(), pred)
    assert gg_ref.abs().max() > 1e-3  # the penalty's gradient the fused paths cannot give
    dev = KERNEL_DEVICE if backend == "triton" else "cpu"
    p = pred.detach().float().to(dev).requires_grad_()
    (g,) = torch.autograd.grad(info_nce(p, keys.float().to(dev), pos.to(dev), backend=backend), p,
                               create_graph=True)
    for penalty in (g.pow(2).sum() + 0 * p.sum(), g.pow(2).sum()):  # with another term, alone
        with pytest.raises(RuntimeError, match="info_nce: this backward is not twice differentiable"):
            torch.autograd.grad(penalty, p, retain_graph=True)
    (g1,) = torch.autograd.grad(info_nce(p, keys.float().to(dev), pos.to(dev), backend=backend), p)
    torch.testing.assert_close(g1.cpu().double(), g_ref.detach(), atol=1e-5, rtol=1e-4)  # first order


@pytest.mark.parametrize("backend", BACKENDS)
def test_keys_updated_in_place_after_the_loss(backend):
    """A key queue refreshed in place between the loss and backward (keys need no gradient): the
    Functions keep references only to inputs that get a gradient, so autograd has nothing to
    refuse ("modified by an inplace operation"), and the gradient is the one of the old keys."""
    pred = torch.randn(1, 4, 8, requires_grad=True)
    keys = torch.randn(1, 6, 8)
    pos = torch.tensor([[0, 1, 2, 3]])
    (want,) = torch.autograd.grad(info_nce_ref(pred.double(), keys.double(), pos), pred)
    loss = _run(backend, pred, keys, pos)
    keys.mul_(-1.0)  # the queue moves on
    loss.backward()
    _assert_close("dpred", pred.grad.double(), want.double(), 1e-5, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_order_gradient_under_create_graph_is_the_plain_one(backend):
    """create_graph=True (e.g. another term needs it) must not change the first-order gradient.
    Tying it to the input through 0 * input.sum() made it NaN as soon as that sum was not finite
    (here: fp16 inputs summing past 65504); the tie is now an empty sum."""
    pred = torch.full((1, 4, 64), 600.0, dtype=torch.float16)
    pred[0, :, :4] = torch.randn(4, 4, dtype=torch.float16) * 600  # sum 1.5e5: inf in fp16
    keys = torch.randn(1, 6, 64, dtype=torch.float16) * 600
    pos = torch.tensor([[0, 1, 2, 3]])
    grads = []
    for create_graph in (False, True):
        p = pred.clone().requires_grad_()
        (g,) = torch.autograd.grad(_run(backend, p, keys, pos), p, create_graph=create_graph)
        grads.append(g.detach())
    assert torch.isfinite(grads[0]).all()
    assert torch.equal(grads[1], grads[0])


def test_split_heuristic():
    # B=1, N=10^4: 79 anchor blocks on 132 SMs -> 4 splits; a full grid or few keys -> none.
    assert nce._key_splits(79, 10_000, 64, 132) == 4
    assert nce._key_splits(8, 1024, 64, 132) == 2  # 1024 keys: 16 tiles, >= 8 per split
    assert nce._key_splits(200, 10_000, 64, 132) == 1
    assert nce._key_splits(8, 256, 64, 132) == 1
    assert nce._key_splits(5, 10_000, 64, 0) == 1  # interpreter / CPU


def test_kernel_limits_raise_clear_errors():
    # max(N, M)·d' >= 2**31 would wrap the kernels' int32 row offsets.
    pred = torch.ones(1, 1, 1).expand(1, 2**26, 32)
    keys = torch.ones(1, 4, 32)
    pos = torch.zeros(1, 1, dtype=torch.int64).expand(1, 2**26)
    with pytest.raises(ValueError, match="2\\*\\*31"):
        info_nce(pred, keys, pos, backend="triton")
    many = torch.randn(65536, 1, 4)
    with pytest.raises(ValueError, match="65535"):
        info_nce(many, many, torch.zeros(65536, 1, dtype=torch.int64), backend="triton")


@pytest.mark.gpu
def test_cuda_graph_capture():
    """No host sync in a call (the range checks are device-side asserts): a CUDA graph captures
    forward and backward and replays them to the eager values."""
    pred, keys, pos, centers = _make(2, 300, 20, 20, 32, C=3, device="cuda")
    kw = dict(grid_width=20, exclude_centers=centers, exclude_radius=3)
    p = pred.clone().requires_grad_()
    info_nce(p, keys, pos, **kw).backward()  # warm-up: compiles the kernels
    want = p.grad.clone()
    p.grad = None
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        info_nce(p, keys, pos, **kw).backward()
    torch.cuda.current_stream().wait_stream(s)
    p.grad = None
    with torch.cuda.graph(graph):
        loss = info_nce(p, keys, pos, **kw)
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    _assert_close("dpred", p.grad, want, 1e-5, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_large_matches_chunked(dtype, reduction):
    """On a GPU: paper-like sizes (100×100 map, radius 4, 3 centres), kernel vs chunked fp32 path.
    The mean makes every upstream gradient ~1/(B·N), subnormal in fp16."""
    pred, keys, pos, centers = _make(2, 2000, 100, 100, 32, C=3, device="cuda")
    kw = dict(grid_width=100, exclude_centers=centers, exclude_radius=4, reduction=reduction)
    up = None if reduction == "none" else torch.tensor(1.0, device="cuda")

    def triton_fn(*a, **k):
        return info_nce(*a, backend="triton", **k)

    gold = _loss_and_grads(lambda *a, **k: info_nce(*a, backend="torch", **k), pred, keys, pos, up, **kw)
    low = _loss_and_grads(info_nce_ref, pred.to(dtype), keys.to(dtype), pos, up, **kw)
    got = _loss_and_grads(triton_fn, pred.to(dtype), keys.to(dtype), pos, up, **kw)
    for name, g, l, r in zip(("loss", "dpred", "dkeys"), got, low, gold):
        err_ours = (g.float() - r).abs().max().item()
        err_torch = (l.float() - r).abs().max().item()
        floor = 1e-3 * r.abs().max().item()
        assert err_ours <= 2 * err_torch + floor, f"{name}: ours {err_ours:.3g} vs PyTorch {err_torch:.3g}"


def _dense_removed(pos, centers, M, W, radius):
    """(B, N, M) bool built key by key from the contract: within Chebyshev distance < radius of a
    centre, the positive excepted."""
    j = torch.arange(M)
    krow, kcol = j // W, j % W
    crow, ccol = centers // W, centers % W  # (B, N, C)
    near = ((krow - crow[..., None]).abs() < radius) & ((kcol - ccol[..., None]).abs() < radius)
    return near.any(2) & (j != pos[..., None])


@pytest.mark.parametrize(
    ("N", "H", "W", "C", "radius"),
    [(70, 9, 11, 4, 3), (5, 3, 7, 6, 2), (33, 12, 12, 1, 1), (9, 5, 40, 2, 10**6), (3, 1, 1, 1, 1)],
    ids=["M99-C4", "M21-C6", "M144-r1", "M200-r-huge", "M1"],
)
def test_exclusion_bitmap_matches_dense_mask(N, H, W, C, radius):
    """The kernels' one-bit-per-logit pre-pass against the mask built key by key: every bit, the
    positive kept, more centres than the four held in registers, no bits past the last key."""
    B, M = 2, H * W
    _, _, pos, centers = _make(B, N, H, W, 8, C, seed=3)
    pos, centers = pos.to(KERNEL_DEVICE), centers.to(KERNEL_DEVICE)
    crow, ccol = nce._centre_grid(centers, W)
    words = nce.exclusion_words(pos, crow, ccol, M, W, nce._effective_radius(radius, M, W)).cpu()
    assert words.shape == (B, N, -(-M // 32)) and words.dtype == torch.int32
    bits = (words[..., None] >> torch.arange(32)) & 1  # (B, N, NW, 32)
    bits = bits.flatten(2).bool()
    want = _dense_removed(pos.cpu(), centers.cpu(), M, W, radius)
    assert torch.equal(bits[..., :M], want)
    assert not bits[..., M:].any()


@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_kernel_key_tiles_read_the_bitmap(block_m, monkeypatch):
    """Key tiles of 16, 32 and 64 keys (half a bitmap word, one, two) over a map whose exclusion
    zones cross tile and word boundaries: loss and both gradients against the reference."""
    B, N, H, W, d = 2, 24, 10, 13, 16
    pred, keys, pos, centers = _make(B, N, H, W, d, C=3, seed=5)
    sizes = nce._block_sizes
    monkeypatch.setattr(nce, "_block_sizes", lambda n, m, dd: (16, block_m, *sizes(n, m, dd)[2:]))
    kw = dict(grid_width=W, exclude_centers=centers, exclude_radius=3, reduction="none")
    loss, gp, gk = _loss_and_grads(lambda *a, **k: _run("triton", *a, **k), pred, keys, pos, **kw)
    ref, rp, rk = _loss_and_grads(info_nce_ref, pred, keys, pos, **kw)
    _assert_close("loss", loss, ref, 1e-4, 1e-4)
    _assert_close("dpred", gp, rp, 1e-4, 1e-4)
    _assert_close("dkeys", gk, rk, 1e-4, 1e-4)


def test_torch_tile_sizes():
    """The PyTorch path's default tiles: whole key rows, anchors by a CPU core's cache, or by
    TORCH_GPU_TILE_ELEMENTS on a CUDA device (B=48, N=M=10^4, the NSE batch: ~140 anchors per tile,
    not the 1-2 a CPU cache budget gives); an explicit chunk_size wins everywhere."""
    mod = importlib.import_module("spsr_kernels.info_nce")

    B, N, M = 48, 10_000, 10_000
    cpu_n, cpu_m = mod._torch_tiles(B, N, M, None, torch.device("cpu"))
    gpu_n, gpu_m = mod._torch_tiles(B, N, M, None, "cuda")
    assert cpu_m == gpu_m == M
    assert cpu_n == max(1, max(mod._CACHE_BYTES // 4, mod.TORCH_MIN_TILE_ELEMENTS) // (B * M))
    assert gpu_n == mod.TORCH_GPU_TILE_ELEMENTS // (B * M) == 139
    assert B * gpu_n * gpu_m <= mod.TORCH_GPU_TILE_ELEMENTS
    assert mod._torch_tiles(B, N, M, None) == (cpu_n, cpu_m)  # no device: the CPU rule
    assert mod._torch_tiles(2, 64, 64, None, "cuda") == (64, 64)  # small problems: one tile
    assert mod._torch_tiles(B, N, M, 256, "cuda") == mod._torch_tiles(B, N, M, 256, "cpu") == (256, 256)
