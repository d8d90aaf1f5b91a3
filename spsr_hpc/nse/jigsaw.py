"""Jigsaw objective of NSE pretraining (NSE-J, docs/method.md §6).

Four NSE vectors on a 2×2 grid whose neighbours are `spacing` ≥ ceil(R/stride) grid steps
apart (so no two receptive fields overlap and the task cannot be solved from shared pixels)
are shuffled by one of the 24 permutations, concatenated, and classified into the
permutation index by a three-layer classifier trained with cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spsr_hpc.nse.contrastive import feature_keys, gather_positions, nse_geometry
from spsr_hpc.nse.sampling import sample_jigsaw


class JigsawObjective(nn.Module):
    """NSE + permutation classifier; ``forward(hr)`` returns the cross-entropy loss.

    Args:
        nse: the network being pretrained (see ContrastiveObjective).
        classifier: maps (..., 4·d) concatenated tiles to (..., 24) logits.
        spacing: grid steps between neighbouring tiles; None uses the overlap radius.
            Smaller than the radius raises ValueError (tiles would overlap).
        max_anchors_per_image: None uses every placement of the grid in the map; an int caps
            it with a random subset per image and step.
    """

    def __init__(
        self,
        nse: nn.Module,
        classifier: nn.Module,
        *,
        spacing: int | None = None,
        max_anchors_per_image: int | None = None,
    ) -> None:
        super().__init__()
        self.nse = nse
        self.classifier = classifier
        self.receptive_field, self.stride, self.radius = nse_geometry(nse)
        if spacing is not None and spacing < self.radius:
            raise ValueError(
                f"jigsaw spacing {spacing} lets tiles overlap: receptive fields overlap below "
                f"ceil(R/stride) = {self.radius} grid steps; use spacing >= {self.radius} (or null)"
            )
        self.spacing = self.radius if spacing is None else spacing
        self.max_anchors_per_image = max_anchors_per_image

    def tile_inputs(
        self, keys: torch.Tensor, height: int, width: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """keys (B, H*W, d) -> (classifier input (B, N, 4d), labels (B, N), tiles (B, N, 4))."""
        tiles, labels = sample_jigsaw(
            keys.shape[0], height, width, self.spacing, self.max_anchors_per_image, generator
        )
        tiles, labels = tiles.to(keys.device), labels.to(keys.device)
        return gather_positions(keys, tiles).flatten(-2), labels, tiles

    def forward(
        self, hr: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """hr: (B, 3, P, P) float in [0, 1] -> (loss scalar, {"accuracy"}, anchors used)."""
        z = self.nse(hr)
        _, _, height, width = z.shape
        x, labels, _ = self.tile_inputs(feature_keys(z), height, width, generator)
        logits = self.classifier(x)
        # Low-precision logits are upcast: the softmax of 24 classes is cheap in fp32.
        flat = logits.flatten(0, -2)
        loss = F.cross_entropy(flat.to(torch.promote_types(flat.dtype, torch.float32)), labels.reshape(-1))
        acc = (logits.argmax(-1) == labels).float().mean()
        return loss, {"accuracy": acc.detach()}, labels.numel()
