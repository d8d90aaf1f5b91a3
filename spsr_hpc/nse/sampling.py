"""Sampling geometry of NSE pretraining: overlap radius, context offsets, anchors, jigsaw tiles.

Everything here works in feature-grid units of an NSE map of shape (H, W), flattened row-major
(index = row * W + col), the layout `spsr_kernels.info_nce` expects with ``grid_width=W``.

Two feature positions overlap when their receptive fields intersect (docs/method.md §6). A
position's field is an R×R pixel box that moves by `stride` pixels per grid step, so positions
at Chebyshev grid distance d overlap iff d·stride < R, i.e. iff d < ceil(R / stride).
That threshold is the exclusion radius of the InfoNCE kernel and the minimum spacing of any
two positions that must not overlap (contexts and target, jigsaw tiles).
"""

from __future__ import annotations

import itertools
import math

import torch

# Unit directions (d_row, d_col) of the context positions around a target, per strategy:
# h = two horizontal neighbours, v = two vertical, c = the four ends of a cross.
STRATEGY_DIRECTIONS: dict[str, tuple[tuple[int, int], ...]] = {
    "h": ((0, -1), (0, 1)),
    "v": ((-1, 0), (1, 0)),
    "c": ((-1, 0), (0, -1), (0, 1), (1, 0)),
}

# The 24 orderings of the 2×2 jigsaw tiles; the class label is the index in this tuple.
JIGSAW_PERMUTATIONS: tuple[tuple[int, ...], ...] = tuple(itertools.permutations(range(4)))


def overlap_radius(receptive_field: int, stride: int) -> int:
    """ceil(R / stride): grid positions closer than this (Chebyshev) have overlapping fields."""
    if not isinstance(receptive_field, int) or receptive_field < 1:
        raise ValueError(f"receptive_field must be a positive int (pixels), got {receptive_field!r}")
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int (pixels per grid step), got {stride!r}")
    return math.ceil(receptive_field / stride)


def num_contexts(strategy: str) -> int:
    """Number of context positions of a strategy ("h": 2, "v": 2, "c": 4)."""
    return len(STRATEGY_DIRECTIONS[check_strategy(strategy)])


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGY_DIRECTIONS:
        raise ValueError(
            f"unknown context strategy {strategy!r}; expected one of {sorted(STRATEGY_DIRECTIONS)} "
            "(h: two horizontal neighbours, v: two vertical, c: four ends of a cross)"
        )
    return strategy


def context_offsets(strategy: str, distance: int, radius: int | None = None) -> torch.Tensor:
    """Grid offsets of the context positions relative to the target.

    Args:
        strategy: "h", "v" or "c".
        distance: grid steps between the target and each context.
        radius: the overlap radius; when given, `distance` must be at least this so that no
            context overlaps the target (a ValueError names the minimum otherwise).

    Returns:
        (C, 2) int64 (d_row, d_col), C = 2 for "h"/"v", 4 for "c".
    """
    check_strategy(strategy)
    if not isinstance(distance, int) or distance < 1:
        raise ValueError(f"context distance must be a positive int (grid steps), got {distance!r}")
    if radius is not None and distance < radius:
        raise ValueError(
            f"context distance {distance} makes contexts overlap the target: receptive fields "
            f"overlap below ceil(R/stride) = {radius} grid steps; use context_distance >= {radius} "
            "(or null for the minimum)"
        )
    return torch.tensor(STRATEGY_DIRECTIONS[strategy], dtype=torch.int64) * distance


def _span(offsets: torch.Tensor) -> tuple[int, int, int, int]:
    """Margins (top, bottom, left, right) a target needs so that every offset lands in the map."""
    top = max(0, -int(offsets[:, 0].min()))
    bottom = max(0, int(offsets[:, 0].max()))
    left = max(0, -int(offsets[:, 1].min()))
    right = max(0, int(offsets[:, 1].max()))
    return top, bottom, left, right


def count_anchors(height: int, width: int, offsets: torch.Tensor) -> int:
    """Number of valid anchors: targets whose every context lies inside the (height, width) map."""
    top, bottom, left, right = _span(offsets)
    return max(0, height - top - bottom) * max(0, width - left - right)


def enumerate_anchors(height: int, width: int, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All valid anchors of one (height, width) map, row-major by target.

    Args:
        offsets: (C, 2) int64 context offsets from `context_offsets`.

    Returns:
        targets: (N,) int64 flat indices; contexts: (N, C) int64 flat indices, with
        N = count_anchors(height, width, offsets). Raises ValueError when N = 0.
    """
    top, bottom, left, right = _span(offsets)
    rows = torch.arange(top, height - bottom, dtype=torch.int64)
    cols = torch.arange(left, width - right, dtype=torch.int64)
    if rows.numel() == 0 or cols.numel() == 0:
        raise ValueError(
            f"a {height}x{width} feature map has no valid anchor for context offsets "
            f"{offsets.tolist()}: use larger patches or a smaller context_distance"
        )
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    rr, cc = rr.reshape(-1), cc.reshape(-1)
    targets = rr * width + cc
    contexts = (rr[:, None] + offsets[None, :, 0]) * width + (cc[:, None] + offsets[None, :, 1])
    return targets, contexts


def sample_anchors(
    batch: int,
    height: int,
    width: int,
    offsets: torch.Tensor,
    max_anchors: int | None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors for a batch of maps: all valid ones, or `max_anchors` random ones per image.

    Returns:
        targets: (B, N) int64, contexts: (B, N, C) int64 flat indices (N the same for every
        image so the batch stays rectangular). With all anchors the rows are expanded views.
    """
    targets, contexts = enumerate_anchors(height, width, offsets)
    n_all = targets.numel()
    if max_anchors is None or max_anchors >= n_all:
        return targets.expand(batch, -1), contexts.expand(batch, -1, -1)
    if max_anchors < 1:
        raise ValueError(f"max_anchors_per_image must be >= 1 or null (all anchors), got {max_anchors}")
    idx = torch.argsort(torch.rand(batch, n_all, generator=generator), dim=1)[:, :max_anchors]
    return targets[idx], contexts[idx]


def exclusion_centers(targets: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
    """(B, N) targets and (B, N, C) contexts -> (B, N, 1 + C) int64 centres [t, contexts...]."""
    return torch.cat([targets.unsqueeze(-1), contexts], dim=-1).contiguous()


def jigsaw_tiles(height: int, width: int, spacing: int) -> torch.Tensor:
    """All placements of a 2×2 jigsaw grid with `spacing` grid steps between neighbours.

    Tile order is row-major: (top-left, top-right, bottom-left, bottom-right).

    Returns:
        (N, 4) int64 flat indices, N = (height - spacing) * (width - spacing).
    """
    if height <= spacing or width <= spacing:
        raise ValueError(
            f"a {height}x{width} feature map cannot hold a 2x2 jigsaw grid with spacing {spacing}: "
            "use larger patches or a smaller jigsaw spacing"
        )
    rr, cc = torch.meshgrid(
        torch.arange(height - spacing, dtype=torch.int64), torch.arange(width - spacing, dtype=torch.int64),
        indexing="ij",
    )
    base = (rr * width + cc).reshape(-1, 1)
    return base + torch.tensor([0, spacing, spacing * width, spacing * width + spacing], dtype=torch.int64)


def sample_jigsaw(
    batch: int,
    height: int,
    width: int,
    spacing: int,
    max_tiles: int | None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Jigsaw grids and permutation labels for a batch.

    Returns:
        tiles: (B, N, 4) int64 flat indices, in the *shuffled* order the classifier sees;
        labels: (B, N) int64 in [0, 24), the index of the permutation applied, i.e.
        tiles[b, n, k] = grid[b, n, JIGSAW_PERMUTATIONS[labels[b, n]][k]].
    """
    grid = jigsaw_tiles(height, width, spacing)
    n_all = grid.shape[0]
    if max_tiles is None or max_tiles >= n_all:
        grid = grid.expand(batch, -1, -1)
    else:
        if max_tiles < 1:
            raise ValueError(f"max_anchors_per_image must be >= 1 or null (all), got {max_tiles}")
        idx = torch.argsort(torch.rand(batch, n_all, generator=generator), dim=1)[:, :max_tiles]
        grid = grid[idx]
    labels = torch.randint(len(JIGSAW_PERMUTATIONS), grid.shape[:2], generator=generator)
    perms = torch.tensor(JIGSAW_PERMUTATIONS, dtype=torch.int64)[labels]  # (B, N, 4)
    return torch.gather(grid, 2, perms), labels
