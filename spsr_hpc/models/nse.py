"""Neural structure extractor (NSE) and its pretraining heads (docs/method.md §6; layer list ours).

The NSE (default widths):

    conv1  3→32,  3×3 s1 p1, ReLU                       R  3, stride 1
    conv2 32→64,  4×4 s2 p1, ReLU                       R  6, stride 2
    conv3 64→64,  3×3 s1 p1, ReLU                       R 10, stride 2
    conv4 64→64,  3×3 s1 p1; + conv2 output (skip 1), ReLU   R 14, stride 2
    conv5 64→32,  4×4 s2 p1, ReLU                       R 20, stride 4
    conv6 32→32,  3×3 s1 p1; + conv5 output (skip 2)    R 28, stride 4

Six convs, two residual skips, 32 output channels at stride 4 (a 128 patch gives 32×32, a
400 patch 100×100). The output has no final ReLU so the features use the whole sphere under
cosine similarity. Skips add paths with smaller receptive fields, so R is that of the conv
chain: r += (k − 1)·j, j *= s, computed by `receptive_field()` from the layers themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spsr_hpc.models.blocks import check_image_input, count_parameters, kaiming_init_


class NSE(nn.Module):
    """Neural structure extractor: (B, in_ch, H, W) -> (B, out_dim, H/4, W/4) features.

    Args:
        in_ch: image channels (3).
        width: channels of the inner stride-2 stage (64).
        out_dim: feature dimension d (32).
    """

    def __init__(self, in_ch: int = 3, width: int = 64, out_dim: int = 32) -> None:
        super().__init__()
        for name, value in (("in_ch", in_ch), ("width", width), ("out_dim", out_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NSE: {name} must be a positive int, got {value!r}")
        self.in_ch, self.width, self.out_dim = in_ch, width, out_dim
        self.conv1 = nn.Conv2d(in_ch, out_dim, 3, 1, 1)
        self.conv2 = nn.Conv2d(out_dim, width, 4, 2, 1)
        self.conv3 = nn.Conv2d(width, width, 3, 1, 1)
        self.conv4 = nn.Conv2d(width, width, 3, 1, 1)
        self.conv5 = nn.Conv2d(width, out_dim, 4, 2, 1)
        self.conv6 = nn.Conv2d(out_dim, out_dim, 3, 1, 1)
        kaiming_init_(self, scale=1.0)

    def conv_chain(self) -> list[nn.Conv2d]:
        """The convs on the longest input→output path, in order (what R and the stride follow)."""
        return [self.conv1, self.conv2, self.conv3, self.conv4, self.conv5, self.conv6]

    def receptive_field(self) -> int:
        """Receptive field R in input pixels of one output position, computed from the layers."""
        r, j = 1, 1
        for conv in self.conv_chain():
            k, d, s = conv.kernel_size[0], conv.dilation[0], conv.stride[0]
            r += (k - 1) * d * j
            j *= s
        return r

    @property
    def stride(self) -> int:
        """Output stride in input pixels (product of the conv strides)."""
        j = 1
        for conv in self.conv_chain():
            j *= conv.stride[0]
        return j

    def summary(self) -> str:
        return (
            f"NSE: {count_parameters(self, trainable_only=False):,} params, {self.out_dim} channels at "
            f"stride {self.stride}, receptive field {self.receptive_field()} px"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_ch, H, W) float in [0, 1] -> (B, out_dim, ⌊H/4⌋, ⌊W/4⌋) (exact for multiples of 4)."""
        check_image_input("NSE", x, self.in_ch)
        x = F.relu(self.conv1(x))
        x2 = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x2))
        x = F.relu(self.conv4(x) + x2)
        x5 = F.relu(self.conv5(x))
        return self.conv6(x5) + x5


def _mlp(in_dim: int, hidden: int, out_dim: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
    for i in range(layers):
        mods.append(nn.Linear(dims[i], dims[i + 1]))
        if i < layers - 1:
            mods.append(nn.ReLU(inplace=True))
    return nn.Sequential(*mods)


def _flatten_parts(name: str, x: torch.Tensor, parts: int, dim: int) -> torch.Tensor:
    """Accept (..., parts, dim) or (..., parts·dim); return (..., parts·dim)."""
    if x.dim() >= 2 and x.shape[-2:] == (parts, dim):
        return x.flatten(-2)
    if x.shape[-1] == parts * dim:
        return x
    raise ValueError(
        f"{name}: expected input (..., {parts}, {dim}) or (..., {parts * dim}), got {tuple(x.shape)}"
    )


class ContextPredictor(nn.Module):
    """Autoregressive context predictor of NSE-P: concatenated context vectors -> prediction.

    Args:
        dim: NSE feature dimension d (32).
        num_context: context vectors per anchor (2 for the h/v strategies, 4 for c).
        hidden: width of the hidden layers (256).
        layers: number of Linear layers (≥ 1), ReLU between them, none after the last.

    forward: (..., num_context, dim) or (..., num_context·dim) -> (..., dim).
    """

    def __init__(self, dim: int = 32, num_context: int = 2, hidden: int = 256, layers: int = 3) -> None:
        super().__init__()
        for name, value in (
            ("dim", dim),
            ("num_context", num_context),
            ("hidden", hidden),
            ("layers", layers),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ContextPredictor: {name} must be a positive int, got {value!r}")
        self.dim, self.num_context = dim, num_context
        self.net = _mlp(num_context * dim, hidden, dim, layers)

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        return self.net(_flatten_parts("ContextPredictor", ctx, self.num_context, self.dim))


class JigsawClassifier(nn.Module):
    """NSE-J head: four concatenated tile vectors -> logits over the permutations (three FC layers).

    forward: (..., num_pieces, dim) or (..., num_pieces·dim) -> (..., num_classes) logits.
    """

    def __init__(self, dim: int = 32, hidden: int = 512, num_classes: int = 24, num_pieces: int = 4) -> None:
        super().__init__()
        for name, value in (
            ("dim", dim),
            ("hidden", hidden),
            ("num_classes", num_classes),
            ("num_pieces", num_pieces),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"JigsawClassifier: {name} must be a positive int, got {value!r}")
        self.dim, self.num_pieces, self.num_classes = dim, num_pieces, num_classes
        self.net = _mlp(num_pieces * dim, hidden, num_classes, 3)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.net(_flatten_parts("JigsawClassifier", tiles, self.num_pieces, self.dim))
