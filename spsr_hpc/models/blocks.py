"""Building blocks shared by the generators: RRDB, upsamplers, initialisation, counting.

Attribute names follow the public ESRGAN/SPSR code (``RDB1.conv1.0``, ``sub``) because the
state-dict keys of the official checkpoints are made of them (docs/method.md §2).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn


class SROutput(NamedTuple):
    """What every generator returns.

    sr: (B, out_ch, s·h, s·w) float, the super-resolved image (nominally [0, 1], not clamped).
    grad_sr: (B, out_ch, s·h, s·w) the gradient branch's HR gradient map, or None for
        backbones without a gradient branch.
    grad_lr: (B, in_ch, h, w) the same-size gradient map of the LR input fed to the branch,
        or None.
    """

    sr: torch.Tensor
    grad_sr: torch.Tensor | None = None
    grad_lr: torch.Tensor | None = None


def conv3x3(in_ch: int, out_ch: int, *, act: bool = False) -> nn.Sequential:
    """3×3 same-padding conv (+ LeakyReLU 0.2), wrapped in a Sequential so its key is `<name>.0`."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 3, 1, 1)]
    if act:
        layers.append(nn.LeakyReLU(0.2, inplace=True))
    return nn.Sequential(*layers)


class ResidualDenseBlock5C(nn.Module):
    """Five densely connected 3×3 convs, residual scaled by 0.2 (ESRGAN). Keys: conv{1..5}.0."""

    def __init__(self, nc: int, gc: int = 32) -> None:
        super().__init__()
        self.conv1 = conv3x3(nc, gc, act=True)
        self.conv2 = conv3x3(nc + gc, gc, act=True)
        self.conv3 = conv3x3(nc + 2 * gc, gc, act=True)
        self.conv4 = conv3x3(nc + 3 * gc, gc, act=True)
        self.conv5 = conv3x3(nc + 4 * gc, nc, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.conv1(x)
        x2 = self.conv2(torch.cat((x, x1), 1))
        x3 = self.conv3(torch.cat((x, x1, x2), 1))
        x4 = self.conv4(torch.cat((x, x1, x2, x3), 1))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three RDBs, outer residual scaled by 0.2. Keys: RDB{1,2,3}."""

    def __init__(self, nc: int, gc: int = 32) -> None:
        super().__init__()
        self.RDB1 = ResidualDenseBlock5C(nc, gc)
        self.RDB2 = ResidualDenseBlock5C(nc, gc)
        self.RDB3 = ResidualDenseBlock5C(nc, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.RDB3(self.RDB2(self.RDB1(x)))
        return out * 0.2 + x


class ShortcutBlock(nn.Module):
    """x + sub(x); the attribute is called `sub` so the keys read `model.1.sub.N` as in ESRGAN."""

    def __init__(self, sub: nn.Module) -> None:
        super().__init__()
        self.sub = sub

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.sub(x)


def upsample_factors(scale: int) -> list[int]:
    """The ×2 / ×3 stages an upconv upsampler uses for `scale` (2→[2], 4→[2, 2], 3→[3], 8→[2, 2, 2])."""
    if isinstance(scale, bool) or not isinstance(scale, int):
        raise TypeError(f"scale must be an int, got {scale!r}")
    if scale == 3:
        return [3]
    if scale >= 2 and (scale & (scale - 1)) == 0:
        return [2] * int(math.log2(scale))
    raise ValueError(f"scale={scale} is not supported; use 2, 3, 4 or 8")


def upconv_layers(nf: int, scale: int) -> list[nn.Module]:
    """Nearest upsample + 3×3 conv + LeakyReLU per stage, flattened (ESRGAN's `upconv_blcok`)."""
    layers: list[nn.Module] = []
    for f in upsample_factors(scale):
        layers += [
            nn.Upsample(scale_factor=f, mode="nearest"),
            nn.Conv2d(nf, nf, 3, 1, 1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
    return layers


@torch.no_grad()
def kaiming_init_(module: nn.Module, scale: float = 1.0) -> None:
    """Kaiming-normal (fan_in, a=0) times `scale`, zero bias; BatchNorm to (1, 0). As the public code."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            m.weight.mul_(scale)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def count_parameters(module: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters, each shared tensor counted once."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def check_image_input(name: str, x: torch.Tensor, channels: int) -> None:
    """Raise a clear error unless x is a float (B, channels, H, W) tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name}: expected shape (B, {channels}, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a float tensor, got {x.dtype}; convert with .float()")
