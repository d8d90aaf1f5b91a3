"""NSE pretraining objectives against independent references.

- The exclusion used in training equals the geometric definition, checked against receptive
  fields measured in pixel space (gradient support of each output position), not against the
  grid formula the code uses.
- The contrastive and jigsaw losses (and their gradients) equal hand-written loops.
- A few optimiser steps on a fixed batch lower each loss (overfit check).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from spsr_hpc.models import NSE, ContextPredictor, JigsawClassifier
from spsr_hpc.nse.contrastive import ContrastiveObjective, feature_keys
from spsr_hpc.nse.jigsaw import JigsawObjective
from spsr_hpc.nse.sampling import JIGSAW_PERMUTATIONS, num_contexts

DIM = 8


def _tiny_nse() -> NSE:
    return NSE(width=12, out_dim=DIM)


def _contrastive(nse: NSE, strategies=("h", "v", "c"), **kw) -> ContrastiveObjective:
    preds = {s: ContextPredictor(DIM, num_contexts(s), hidden=32, layers=3) for s in strategies}
    return ContrastiveObjective(nse, preds, **kw)


@functools.lru_cache(maxsize=2)
def _measured_boxes(size: int) -> tuple[torch.Tensor, int, int]:
    """Pixel boxes (r0, r1, c0, c1), inclusive, of every output position of a size×size input.

    Measured as the support of d z[:, i, j] / d x on a copy with positive weights and biases,
    where every ReLU is active, so the support is the whole receptive field (clipped to the
    image), whatever the layer list is.
    """
    nse = _tiny_nse()
    probe = copy.deepcopy(nse)
    with torch.no_grad():
        for p in probe.parameters():
            p.copy_(p.abs() + 0.05)
    h = w = size // nse.stride
    boxes = torch.empty(h * w, 4, dtype=torch.int64)
    for start in range(0, h * w, 200):
        idx = torch.arange(start, min(h * w, start + 200))
        x = torch.full((idx.numel(), 3, size, size), 0.5, requires_grad=True)
        z = probe(x)
        assert z.shape[-2:] == (h, w)
        picked = z[torch.arange(idx.numel()), :, idx // w, idx % w].sum()
        (g,) = torch.autograd.grad(picked, x)
        support = g.abs().sum(1) > 0  # (n, size, size)
        rows, cols = support.any(2), support.any(1)
        for k in range(idx.numel()):
            r, c = rows[k].nonzero().flatten(), cols[k].nonzero().flatten()
            boxes[idx[k]] = torch.stack([r.min(), r.max(), c.min(), c.max()])
    return boxes, h, w


def _pixel_overlap(boxes: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Do the boxes of flat positions a (...,) and b (...,) intersect? (broadcasting)"""
    ba, bb = boxes[a], boxes[b]
    return (
        (torch.maximum(ba[..., 0], bb[..., 0]) <= torch.minimum(ba[..., 1], bb[..., 1]))
        & (torch.maximum(ba[..., 2], bb[..., 2]) <= torch.minimum(ba[..., 3], bb[..., 3]))
    )


@pytest.mark.parametrize("strategy", ["h", "v", "c"])
def test_training_exclusion_equals_pixel_space_overlap(strategy):
    """Loss with the arguments training hands to info_nce == a loss whose negatives are chosen by
    intersecting measured receptive-field boxes (target kept as positive, never as negative)."""
    nse = _tiny_nse()
    assert nse.receptive_field() == 28 and nse.stride == 4  # the documented default geometry
    size = 80
    boxes, h, w = _measured_boxes(size)
    # The full (unclipped) receptive field of an interior position is R pixels wide.
    centre = (h // 2) * w + w // 2
    assert int(boxes[centre, 1] - boxes[centre, 0] + 1) == nse.receptive_field()

    obj = _contrastive(nse, (strategy,), loss_backend="torch").double()
    hr = torch.rand(2, 3, size, size, dtype=torch.float64)
    keys = feature_keys(obj.nse(hr))
    kw = obj.loss_inputs(keys, h, w, strategy)
    targets, centres = kw["pos_index"], kw["exclude_centers"]
    # Contexts never overlap the target in pixel space.
    assert not _pixel_overlap(boxes, targets[..., None], centres[..., 1:]).any()

    from spsr_kernels import info_nce

    got = info_nce(
        kw["pred"], kw["keys"], targets, scale=kw["scale"], grid_width=kw["grid_width"],
        exclude_centers=centres, exclude_radius=kw["exclude_radius"], reduction="none", backend="torch",
    )  # fmt: skip

    m = h * w
    j = torch.arange(m)
    # (B, N, M): key j overlaps the target or any context in pixel space.
    overlaps = _pixel_overlap(boxes, centres[..., None], j.view(1, 1, 1, m)).any(2)
    is_pos = j.view(1, 1, m) == targets[..., None]
    kept = ~overlaps | is_pos
    assert kept.gather(2, targets[..., None]).all()
    assert (~kept).sum() > 0
    logits = kw["scale"] * torch.einsum(
        "bnd,bmd->bnm", F.normalize(kw["pred"], dim=-1), F.normalize(keys, dim=-1)
    )
    pos_logit = logits.gather(2, targets[..., None])[..., 0]
    want = torch.logsumexp(logits.masked_fill(~kept, float("-inf")), -1) - pos_logit
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def _loop_contrastive_loss(obj: ContrastiveObjective, hr: torch.Tensor) -> torch.Tensor:
    """Per-anchor loop: predictor on concatenated contexts, softmax over non-overlapping keys."""
    z = obj.nse(hr)
    b, _, h, w = z.shape
    r = obj.radius
    per_strategy = []
    for s, predictor in obj.predictors.items():
        offs = obj.offsets[s].tolist()
        losses = []
        for img in range(b):
            for y in range(h):
                for x in range(w):
                    ctx = [(y + dy, x + dx) for dy, dx in offs]
                    if not all(0 <= cy < h and 0 <= cx < w for cy, cx in ctx):
                        continue
                    p = predictor(torch.cat([z[img, :, cy, cx] for cy, cx in ctx]))
                    cos = F.cosine_similarity(p[:, None, None], z[img], dim=0)  # (h, w)
                    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
                    near = torch.zeros(h, w, dtype=torch.bool)
                    for cy, cx in [(y, x), *ctx]:
                        near |= ((yy - cy).abs() < r) & ((xx - cx).abs() < r)
                    near[y, x] = False
                    logit = obj.scale * cos
                    losses.append(torch.logsumexp(logit[~near], 0) - logit[y, x])
        per_strategy.append(torch.stack(losses).mean())
    return torch.stack(per_strategy).mean()


def test_contrastive_loss_and_gradients_match_loop():
    torch.manual_seed(1)
    obj = _contrastive(_tiny_nse(), loss_backend="torch", context_distance=8).double()
    hr = torch.rand(2, 3, 80, 72, dtype=torch.float64)
    loss, parts, anchors = obj(hr)
    assert anchors == 2 * (20 * 2 + 4 * 18 + 4 * 2)
    assert set(parts) == {"loss_h", "loss_v", "loss_c"}
    want = _loop_contrastive_loss(obj, hr)
    torch.testing.assert_close(loss, want, rtol=1e-8, atol=1e-8)
    params = list(obj.parameters())
    g_got = torch.autograd.grad(loss, params)
    g_want = torch.autograd.grad(_loop_contrastive_loss(obj, hr), params)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_contrastive_anchor_cap_and_naive_backend_agree():
    torch.manual_seed(2)
    obj = _contrastive(_tiny_nse(), ("c",), loss_backend="torch", max_anchors_per_image=7)
    hr = torch.rand(3, 3, 80, 80)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    loss, _, anchors = obj(hr, g1)
    assert anchors == 3 * 7
    obj.loss_backend = "naive"
    naive, _, _ = obj(hr, g2)
    torch.testing.assert_close(loss, naive, rtol=1e-5, atol=1e-5)


def test_contrastive_rejects_overlapping_contexts():
    with pytest.raises(ValueError, match="context_distance >= 7"):
        _contrastive(_tiny_nse(), ("h",), context_distance=6)


def test_jigsaw_loss_matches_loop():
    torch.manual_seed(3)
    nse = _tiny_nse()
    obj = JigsawObjective(nse, JigsawClassifier(DIM, hidden=32), max_anchors_per_image=9).double()
    hr = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    loss, stats, n = obj(hr, torch.Generator().manual_seed(4))
    assert n == 18 and 0.0 <= float(stats["accuracy"]) <= 1.0
    # Same draws again, then rebuild each classifier input from the canonical 2×2 grid.
    z = obj.nse(hr)
    _, labels, tiles = obj.tile_inputs(feature_keys(z), 16, 16, torch.Generator().manual_seed(4))
    s = obj.spacing
    losses = []
    for b in range(2):
        for k in range(9):
            perm = JIGSAW_PERMUTATIONS[labels[b, k]]
            canon = [0] * 4
            for slot, piece in enumerate(perm):
                canon[piece] = int(tiles[b, k, slot])
            y, x = divmod(canon[0], 16)
            grid = [(y, x), (y, x + s), (y + s, x), (y + s, x + s)]
            assert canon == [gy * 16 + gx for gy, gx in grid]
            inp = torch.cat([z[b, :, grid[perm[slot]][0], grid[perm[slot]][1]] for slot in range(4)])
            logits = obj.classifier(inp)
            losses.append(F.cross_entropy(logits[None], labels[b, k][None]))
    torch.testing.assert_close(loss, torch.stack(losses).mean(), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="spacing >= 7"):
        JigsawObjective(nse, JigsawClassifier(DIM), spacing=3)


def _fixed_batch() -> torch.Tensor:
    from skimage import data

    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float() / 255
    return torch.stack([img[:, 100:164, 180:244], img[:, 300:364, 250:314]])


@pytest.mark.parametrize("method", ["contrastive", "jigsaw"])
def test_overfit_fixed_batch(method):
    torch.manual_seed(0)
    nse = _tiny_nse()
    if method == "contrastive":
        obj = _contrastive(nse, ("c",), loss_backend="torch")
        lr = 1e-3
    else:
        obj = JigsawObjective(nse, JigsawClassifier(DIM, hidden=64))
        lr = 3e-3
    opt = torch.optim.Adam(obj.parameters(), lr=lr)
    hr = _fixed_batch()
    losses = []
    for _ in range(25):
        # Same images and same anchor/permutation draws every step: a truly fixed batch.
        loss, _, _ = obj(hr, torch.Generator().manual_seed(0))
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.9 * first, losses
