"""Contrastive prediction objective of NSE pretraining (NSE-P, docs/method.md §6).

For every valid anchor of every image (or a capped random subset): the predictor of a strategy
maps the concatenated NSE vectors at the context positions to a prediction p; the positive is
the NSE vector at the target; the negatives are every position of the same map whose receptive
field overlaps neither the target's nor any context's. The loss is InfoNCE with logits
τ·cos(p, z), computed by the fused `spsr_kernels.info_nce` without materialising the
N×M logits (exclude_centers = [t, contexts...], exclude_radius = ceil(R/stride)).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from spsr_hpc.nse.sampling import (
    context_offsets,
    enumerate_anchors,
    exclusion_centers,
    num_contexts,
    overlap_radius,
    sample_anchors,
)
from spsr_kernels import info_nce, info_nce_ref


def feature_keys(z: torch.Tensor) -> torch.Tensor:
    """(B, d, H, W) NSE map -> (B, H*W, d) keys, flattened row-major (contiguous)."""
    return z.flatten(2).transpose(1, 2).contiguous()


def gather_positions(keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pick feature vectors by flat grid index.

    Args:
        keys: (B, M, d) float; index: (B, *S) int64 in [0, M).

    Returns:
        (B, *S, d), same dtype as keys; differentiable in keys.
    """
    b, _, d = keys.shape
    flat = index.reshape(b, -1)
    out = torch.gather(keys, 1, flat.unsqueeze(-1).expand(-1, -1, d))
    return out.reshape(*index.shape, d)


def nse_geometry(nse: nn.Module) -> tuple[int, int, int]:
    """(receptive field R in pixels, stride in pixels, overlap radius ceil(R/stride)) of an NSE."""
    rf = int(nse.receptive_field())
    stride = int(nse.stride)
    return rf, stride, overlap_radius(rf, stride)


class ContrastiveObjective(nn.Module):
    """NSE + one context predictor per strategy; ``forward(hr)`` returns the InfoNCE loss.

    Args:
        nse: the network being pretrained; ``nse(x)`` maps (B, 3, P, P) float in [0, 1] to
            (B, d, P/stride, P/stride); exposes ``receptive_field()`` and ``stride``.
        predictors: strategy name ("h", "v", "c") -> predictor mapping (..., C·d) -> (..., d),
            C = number of contexts of the strategy.
        context_distance: grid steps from target to each context; None uses the overlap
            radius (the closest non-overlapping placement). Smaller values raise ValueError.
        scale: τ of the logits τ·cos (paper: 64).
        max_anchors_per_image: None (default) uses every valid anchor; an int caps it with a
            fresh random subset per image and step.
        loss_backend: "auto" / "triton" / "torch" (the fused op's paths) or "naive"
            (`info_nce_ref`, materialises the logits: the baseline of the benchmark).
    """

    def __init__(
        self,
        nse: nn.Module,
        predictors: Mapping[str, nn.Module],
        *,
        context_distance: int | None = None,
        scale: float = 64.0,
        max_anchors_per_image: int | None = None,
        loss_backend: str = "auto",
    ) -> None:
        super().__init__()
        if not predictors:
            raise ValueError("ContrastiveObjective needs at least one strategy predictor")
        if loss_backend not in ("auto", "triton", "torch", "naive"):
            raise ValueError(f"loss_backend={loss_backend!r}; expected auto, triton, torch or naive")
        self.nse = nse
        self.predictors = nn.ModuleDict(dict(predictors))
        self.receptive_field, self.stride, self.radius = nse_geometry(nse)
        self.context_distance = self.radius if context_distance is None else context_distance
        self.offsets = {
            s: context_offsets(s, self.context_distance, self.radius) for s in self.predictors
        }
        self.scale = float(scale)
        self.max_anchors_per_image = max_anchors_per_image
        self.loss_backend = loss_backend
        self._anchor_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def anchors(
        self,
        batch: int,
        height: int,
        width: int,
        strategy: str,
        max_anchors: int | None,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets (B, N) and contexts (B, N, C) int64 flat indices on `device`.

        max_anchors None: every valid anchor (the same index set every call, cached on the
        device); an int: that many random anchors per image drawn with `generator`.
        """
        if max_anchors is None:
            cache_key = (strategy, height, width, torch.device(device))
            if cache_key not in self._anchor_cache:
                t, c = enumerate_anchors(height, width, self.offsets[strategy])
                self._anchor_cache[cache_key] = (t.to(device), c.to(device))
            t, c = self._anchor_cache[cache_key]
            return t.expand(batch, -1), c.expand(batch, -1, -1)
        targets, contexts = sample_anchors(
            batch, height, width, self.offsets[strategy], max_anchors, generator
        )
        return targets.to(device), contexts.to(device)

    def predict(self, keys: torch.Tensor, contexts: torch.Tensor, strategy: str) -> torch.Tensor:
        """The predictor's output for each anchor, fed exactly as training feeds it.

        Args:
            keys: (B, H*W, d) float, the NSE map flattened row-major, *not* normalised (the
                raw NSE vectors are what the predictor sees; cosines are taken afterwards).
            contexts: (B, N, C) int64 flat indices.

        Returns:
            (B, N, d) predictions p (unnormalised).
        """
        return self.predictors[strategy](gather_positions(keys, contexts).flatten(-2))

    def loss_inputs(
        self,
        keys: torch.Tensor,
        height: int,
        width: int,
        strategy: str,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor | int | float]:
        """Everything handed to `info_nce` for one strategy (exposed so tests can check it).

        Args:
            keys: (B, H*W, d) float, the NSE map flattened row-major.

        Returns:
            dict with pred (B, N, d), keys, pos_index (B, N), exclude_centers (B, N, 1 + C),
            exclude_radius, grid_width, scale.
        """
        targets, contexts = self.anchors(
            keys.shape[0], height, width, strategy, self.max_anchors_per_image, generator, keys.device
        )
        return {
            "pred": self.predict(keys, contexts, strategy),
            "keys": keys,
            "pos_index": targets.contiguous(),
            "exclude_centers": exclusion_centers(targets, contexts),
            "exclude_radius": self.radius,
            "grid_width": width,
            "scale": self.scale,
        }

    def forward(
        self, hr: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """hr: (B, 3, P, P) float in [0, 1] -> (loss scalar, per-strategy losses, anchors used)."""
        z = self.nse(hr)
        _, _, height, width = z.shape
        keys = feature_keys(z)
        losses: dict[str, torch.Tensor] = {}
        anchors = 0
        for strategy in self.predictors:
            kw = self.loss_inputs(keys, height, width, strategy, generator)
            anchors += kw["pos_index"].numel()
            pred, keys_, pos = kw.pop("pred"), kw.pop("keys"), kw.pop("pos_index")
            if pred.dtype != keys_.dtype:  # under autocast: the predictor's output is bf16
                pred, keys_ = pred.to(torch.bfloat16), keys_.to(torch.bfloat16)
            # Per-anchor losses (the fused InfoNCE's log-sum-exp is fp32 for any input dtype),
            # averaged in fp32 (fp64 stays fp64: gradcheck).
            wide = torch.promote_types(pred.dtype, torch.float32)
            if self.loss_backend == "naive":
                # The reference computes in its input dtype: widened inputs keep its LSE fp32.
                per_anchor = info_nce_ref(pred.to(wide), keys_.to(wide), pos, reduction="none", **kw)
            else:
                per_anchor = info_nce(pred, keys_, pos, backend=self.loss_backend, reduction="none", **kw)
            losses[strategy] = per_anchor.to(wide).mean()
        loss = torch.stack(list(losses.values())).mean()
        return loss, {f"loss_{s}": v.detach() for s, v in losses.items()}, anchors


def predictor_input_dim(strategy: str, dim: int) -> int:
    """Width of the concatenated context vectors a strategy's predictor receives."""
    return num_contexts(strategy) * dim
