"""Held-out accuracies of a frozen NSE with a fitted head (docs/method.md §6, "NSE evaluation").

- Contrastive top-1: for a random anchor, the prediction from its contexts (computed by the
  call training makes, `ContrastiveObjective.predict`: raw NSE vectors in) must have a higher
  cosine with the target vector than with each of `num_negatives` vectors drawn uniformly
  (without replacement) from the anchor's valid negatives: positions of the same map whose
  receptive fields overlap neither the target nor any context. Ties count as failures.
- Jigsaw accuracy: the classifier's arg-max equals the permutation applied to a random tile grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spsr_hpc.nse.contrastive import ContrastiveObjective, feature_keys
from spsr_hpc.nse.jigsaw import JigsawObjective
from spsr_hpc.nse.sampling import exclusion_centers


def valid_negative_mask(
    exclude_centers: torch.Tensor, num_keys: int, grid_width: int, radius: int
) -> torch.Tensor:
    """(B, N, C) int64 centres -> (B, N, M) bool: True where a key overlaps no centre."""
    j = torch.arange(num_keys, device=exclude_centers.device)
    rows, cols = j // grid_width, j % grid_width
    crow, ccol = exclude_centers // grid_width, exclude_centers % grid_width
    near = ((rows - crow[..., None]).abs() < radius) & ((cols - ccol[..., None]).abs() < radius)
    return ~near.any(dim=2)


def prediction_cosines(
    objective: ContrastiveObjective, keys: torch.Tensor, contexts: torch.Tensor, strategy: str
) -> torch.Tensor:
    """cos(p_n, z_j) of every anchor's prediction with every key of its map, as training scores it.

    The prediction comes from `ContrastiveObjective.predict`, the same call `loss_inputs` makes
    for `info_nce` (raw context vectors in, no normalisation before the predictor); training's
    logits are ``objective.scale`` times these cosines.

    Args:
        keys: (B, M, d) float, raw NSE vectors (`feature_keys(nse(x))`).
        contexts: (B, N, C) int64 flat indices.

    Returns:
        (B, N, M) float32.
    """
    pred = F.normalize(objective.predict(keys, contexts, strategy).float(), dim=-1)
    return torch.einsum("bnd,bmd->bnm", pred, F.normalize(keys.float(), dim=-1))


@torch.no_grad()
def contrastive_top1(
    objective: ContrastiveObjective,
    hr: torch.Tensor,
    strategy: str,
    *,
    num_negatives: int,
    anchors_per_image: int,
    generator: torch.Generator,
) -> tuple[int, int]:
    """Top-1 hits on one batch of held-out images.

    Args:
        objective: frozen NSE + fitted predictors (its geometry and strategies are used).
        hr: (B, 3, P, P) float in [0, 1].
        num_negatives: negatives drawn per anchor from its valid ones (ValueError when an
            anchor has fewer: use larger crops or fewer negatives).
        anchors_per_image: random anchors per image (all valid ones when larger).

    Returns:
        (correct, total) anchor counts.
    """
    z = objective.nse(hr)
    b, _, height, width = z.shape
    keys = feature_keys(z)
    targets, contexts = objective.anchors(
        b, height, width, strategy, anchors_per_image, generator, keys.device
    )
    cos = prediction_cosines(objective, keys, contexts, strategy)  # (B, N, M)
    valid = valid_negative_mask(exclusion_centers(targets, contexts), keys.shape[1], width, objective.radius)
    fewest = int(valid.sum(-1).min())
    if fewest < num_negatives:
        raise ValueError(
            f"num_negatives={num_negatives} but an anchor of a {height}x{width} map has only {fewest} "
            "valid negatives: use larger evaluation patches or fewer negatives"
        )
    n = targets.shape[1]
    # Uniform sample without replacement among the valid keys: the smallest random keys win.
    noise = torch.rand(valid.shape, generator=generator).to(keys.device)
    neg = torch.topk(noise.masked_fill(~valid, 2.0), num_negatives, dim=-1, largest=False).indices
    pos_sim = cos.gather(2, targets.unsqueeze(-1)).squeeze(-1)  # (B, N)
    neg_sim = cos.gather(2, neg)  # (B, N, K)
    correct = (pos_sim > neg_sim.amax(-1)).sum()
    return int(correct), b * n


@torch.no_grad()
def jigsaw_accuracy(
    objective: JigsawObjective, hr: torch.Tensor, *, tiles_per_image: int, generator: torch.Generator
) -> tuple[int, int]:
    """Permutation hits on one batch: hr (B, 3, P, P) float in [0, 1] -> (correct, total)."""
    z = objective.nse(hr)
    _, _, height, width = z.shape
    saved = objective.max_anchors_per_image
    objective.max_anchors_per_image = tiles_per_image
    try:
        x, labels, _ = objective.tile_inputs(feature_keys(z), height, width, generator)
    finally:
        objective.max_anchors_per_image = saved
    correct = (objective.classifier(x).argmax(-1) == labels).sum()
    return int(correct), labels.numel()
