"""NSE pretraining geometry against brute-force pixel-space receptive-field boxes."""

from __future__ import annotations

import itertools

import pytest
import torch

from spsr_hpc.nse.sampling import (
    JIGSAW_PERMUTATIONS,
    context_offsets,
    count_anchors,
    enumerate_anchors,
    overlap_radius,
    sample_anchors,
    sample_jigsaw,
)


def _boxes_overlap(p: tuple[int, int], q: tuple[int, int], rf: int, stride: int) -> bool:
    """Do the R×R pixel boxes of grid positions p and q (top-left at position·stride) intersect?"""
    return all(max(a * stride, b * stride) < min(a * stride, b * stride) + rf for a, b in zip(p, q))


@pytest.mark.parametrize("rf,stride", [(1, 1), (3, 1), (29, 4), (32, 4), (33, 4), (45, 4), (7, 8), (20, 3)])
def test_overlap_radius_is_smallest_non_overlapping_distance(rf, stride):
    radius = overlap_radius(rf, stride)
    for d in range(0, radius + 3):
        assert _boxes_overlap((0, 0), (d, d), rf, stride) == (d < radius), (rf, stride, d)
        assert _boxes_overlap((0, 0), (0, d), rf, stride) == (d < radius), (rf, stride, d)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_overlap_radius_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="positive int"):
        overlap_radius(bad, 4)


@pytest.mark.parametrize("strategy,n_ctx", [("h", 2), ("v", 2), ("c", 4)])
@pytest.mark.parametrize("rf,stride", [(29, 4), (45, 4), (12, 3)])
def test_context_offsets_never_overlap_target_or_each_other(strategy, n_ctx, rf, stride):
    radius = overlap_radius(rf, stride)
    offsets = context_offsets(strategy, radius, radius)
    assert offsets.shape == (n_ctx, 2) and offsets.dtype == torch.int64
    points = [(0, 0)] + [tuple(o) for o in offsets.tolist()]
    for p, q in itertools.combinations(points, 2):
        assert not _boxes_overlap(p, q, rf, stride), (strategy, p, q)
    # One step closer and the contexts overlap the target: the radius is tight.
    closer = context_offsets(strategy, radius - 1) if radius > 1 else None
    if closer is not None:
        assert all(_boxes_overlap((0, 0), tuple(o), rf, stride) for o in closer.tolist())
        with pytest.raises(ValueError, match=f"context_distance >= {radius}"):
            context_offsets(strategy, radius - 1, radius)


def test_strategy_directions():
    assert sorted(map(tuple, context_offsets("h", 3).tolist())) == [(0, -3), (0, 3)]
    assert sorted(map(tuple, context_offsets("v", 3).tolist())) == [(-3, 0), (3, 0)]
    assert sorted(map(tuple, context_offsets("c", 3).tolist())) == [(-3, 0), (0, -3), (0, 3), (3, 0)]
    with pytest.raises(ValueError, match="unknown context strategy 'x'"):
        context_offsets("x", 3)


@pytest.mark.parametrize("strategy", ["h", "v", "c"])
@pytest.mark.parametrize("h,w,dist", [(13, 17, 3), (8, 8, 2), (25, 25, 8), (5, 9, 2)])
def test_all_anchor_enumeration_matches_brute_force(strategy, h, w, dist):
    offsets = context_offsets(strategy, dist)
    expected = []
    for r in range(h):
        for c in range(w):
            ctx = [(r + dr, c + dc) for dr, dc in offsets.tolist()]
            if all(0 <= y < h and 0 <= x < w for y, x in ctx):
                expected.append((r * w + c, [y * w + x for y, x in ctx]))
    closed_form = {"h": h * (w - 2 * dist), "v": (h - 2 * dist) * w, "c": (h - 2 * dist) * (w - 2 * dist)}
    assert len(expected) == count_anchors(h, w, offsets) == max(0, closed_form[strategy])
    targets, contexts = enumerate_anchors(h, w, offsets)
    assert targets.tolist() == [t for t, _ in expected]
    assert contexts.tolist() == [c for _, c in expected]


def test_no_valid_anchor_raises():
    with pytest.raises(ValueError, match="no valid anchor"):
        enumerate_anchors(6, 6, context_offsets("c", 3))


def test_capped_anchors_are_distinct_valid_subsets():
    offsets = context_offsets("c", 2)
    all_t, all_c = enumerate_anchors(9, 11, offsets)
    lookup = {t: c for t, c in zip(all_t.tolist(), all_c.tolist())}
    g = torch.Generator().manual_seed(3)
    targets, contexts = sample_anchors(4, 9, 11, offsets, 10, g)
    assert targets.shape == (4, 10) and contexts.shape == (4, 10, 4)
    for b in range(4):
        assert len(set(targets[b].tolist())) == 10
        for t, c in zip(targets[b].tolist(), contexts[b].tolist()):
            assert lookup[t] == c
    assert not torch.equal(targets[0], targets[1])
    full_t, _ = sample_anchors(2, 9, 11, offsets, None)
    assert torch.equal(full_t[1], all_t)


def test_jigsaw_tiles_permutation_semantics_and_no_overlap():
    rf, stride = 29, 4
    spacing = overlap_radius(rf, stride)
    h, w = 12, 14
    g = torch.Generator().manual_seed(0)
    tiles, labels = sample_jigsaw(3, h, w, spacing, None, g)
    assert tiles.shape == (3, (h - spacing) * (w - spacing), 4)
    assert labels.min() >= 0 and labels.max() < 24 and len(JIGSAW_PERMUTATIONS) == 24
    assert len(set(JIGSAW_PERMUTATIONS)) == 24
    for b in range(3):
        for n in range(0, tiles.shape[1], 7):
            perm = JIGSAW_PERMUTATIONS[labels[b, n]]
            # Undo the shuffle: tile k of the canonical order sits at the slot holding k.
            canon = [0] * 4
            for slot, piece in enumerate(perm):
                canon[piece] = tiles[b, n, slot].item()
            r0, c0 = divmod(canon[0], w)
            assert canon == [r0 * w + c0, r0 * w + c0 + spacing, (r0 + spacing) * w + c0,
                             (r0 + spacing) * w + c0 + spacing]
            pts = [divmod(i, w) for i in canon]
            for p, q in itertools.combinations(pts, 2):
                assert not _boxes_overlap(p, q, rf, stride)
    capped, capped_labels = sample_jigsaw(2, h, w, spacing, 5, g)
    assert capped.shape == (2, 5, 4) and capped_labels.shape == (2, 5)
    with pytest.raises(ValueError, match="cannot hold a 2x2 jigsaw grid"):
        sample_jigsaw(1, 5, 5, 5, None)
