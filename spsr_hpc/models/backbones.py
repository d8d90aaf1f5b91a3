"""Generators without a gradient branch (docs/method.md §2 last bullet): RRDBNet, EDSR, SRResNet.

Each returns SROutput(sr, None, None), so the gradient and structure losses (computed on the SR
image) train them exactly like SPSR's trunk (EDSR-G/-P, SRResNet-G/-P in the paper's appendix).
"""

from __future__ import annotations

import torch
from torch import nn

from spsr_hpc.models.blocks import (
    RRDB,
    ShortcutBlock,
    SROutput,
    check_image_input,
    count_parameters,
    kaiming_init_,
    upconv_layers,
    upsample_factors,
)


def _check_positive(cls: str, **values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{cls}: {name} must be a positive int, got {value!r}")


class RRDBNet(nn.Module):
    """ESRGAN's RRDBNet in the original key layout (`model.0`, `model.1.sub.N`, `model.3/6/8/10` at ×4).

    conv 3→nf; nb RRDBs + LR conv under a long skip; nearest+conv+LReLU upsamplers; HR conv
    (3×3 + LReLU); 3×3 nf→out_ch. 16,697,987 parameters at nf=64, nb=23, gc=32, ×4. The keys are
    the old ESRGAN checkpoint's, so such checkpoints load unchanged and SPSR's trunk shares them.
    """

    def __init__(
        self,
        in_ch: int = 3,
        out_ch: int = 3,
        nf: int = 64,
        nb: int = 23,
        gc: int = 32,
        scale: int = 4,
        init_scale: float = 0.1,
    ) -> None:
        super().__init__()
        _check_positive("RRDBNet", in_ch=in_ch, out_ch=out_ch, nf=nf, nb=nb, gc=gc)
        self.in_ch, self.out_ch, self.nf, self.nb, self.gc, self.scale = in_ch, out_ch, nf, nb, gc, scale
        body = nn.Sequential(*[RRDB(nf, gc) for _ in range(nb)], nn.Conv2d(nf, nf, 3, 1, 1))
        self.model = nn.Sequential(
            nn.Conv2d(in_ch, nf, 3, 1, 1),
            ShortcutBlock(body),
            *upconv_layers(nf, scale),
            nn.Conv2d(nf, nf, 3, 1, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(nf, out_ch, 3, 1, 1),
        )
        kaiming_init_(self, scale=init_scale)

    def summary(self) -> str:
        n = count_parameters(self)
        return f"RRDBNet x{self.scale}: {n:,} trainable params; nf={self.nf} nb={self.nb} gc={self.gc}"

    def forward(self, lr: torch.Tensor) -> SROutput:
        """lr: (B, in_ch, h, w) float in [0, 1] -> SROutput(sr (B, out_ch, s·h, s·w), None, None)."""
        check_image_input("RRDBNet", lr, self.in_ch)
        return SROutput(self.model(lr))


# DIV2K RGB mean used by EDSR's MeanShift, for [0, 1] inputs.
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)


class _EDSRResBlock(nn.Module):
    def __init__(self, nf: int, res_scale: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(nf, nf, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(nf, nf, 3, 1, 1)
        )
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) * self.res_scale


def _pixelshuffle_layers(nf: int, scale: int, act: nn.Module | None = None) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for f in upsample_factors(scale):
        layers += [nn.Conv2d(nf, nf * f * f, 3, 1, 1), nn.PixelShuffle(f)]
        if act is not None:
            layers.append(act)
    return layers


class EDSR(nn.Module):
    """EDSR (Lim et al., 2017): no-BN residual blocks, pixel-shuffle upsampler, DIV2K mean shift.

    Published configurations: baseline nf=64, nb=16, res_scale=1 (1,517,571 params at ×4);
    large nf=256, nb=32, res_scale=0.1. Inputs are [0, 1] (rgb_range 1): the mean shift
    subtracts DIV2K_RGB_MEAN before the head and adds it back after the tail (std 1).
    """

    def __init__(
        self,
        in_ch: int = 3,
        out_ch: int = 3,
        nf: int = 64,
        nb: int = 16,
        scale: int = 4,
        res_scale: float = 1.0,
    ) -> None:
        super().__init__()
        _check_positive("EDSR", in_ch=in_ch, out_ch=out_ch, nf=nf, nb=nb)
        if not res_scale > 0:
            raise ValueError(f"EDSR: res_scale must be > 0, got {res_scale!r}")
        self.in_ch, self.out_ch, self.nf, self.nb, self.scale, self.res_scale = (
            in_ch,
            out_ch,
            nf,
            nb,
            scale,
            res_scale,
        )
        mean = torch.tensor(DIV2K_RGB_MEAN) if in_ch == 3 else torch.full((in_ch,), 0.5)
        self.register_buffer("mean_in", mean.view(1, in_ch, 1, 1), persistent=False)
        mean_out = torch.tensor(DIV2K_RGB_MEAN) if out_ch == 3 else torch.full((out_ch,), 0.5)
        self.register_buffer("mean_out", mean_out.view(1, out_ch, 1, 1), persistent=False)
        self.head = nn.Conv2d(in_ch, nf, 3, 1, 1)
        self.body = nn.Sequential(
            *[_EDSRResBlock(nf, res_scale) for _ in range(nb)], nn.Conv2d(nf, nf, 3, 1, 1)
        )
        self.tail = nn.Sequential(*_pixelshuffle_layers(nf, scale), nn.Conv2d(nf, out_ch, 3, 1, 1))

    def summary(self) -> str:
        return (
            f"EDSR x{self.scale}: {count_parameters(self):,} trainable params; nf={self.nf} nb={self.nb} "
            f"res_scale={self.res_scale}"
        )

    def forward(self, lr: torch.Tensor) -> SROutput:
        """lr: (B, in_ch, h, w) float in [0, 1] -> SROutput(sr (B, out_ch, s·h, s·w), None, None)."""
        check_image_input("EDSR", lr, self.in_ch)
        x = self.head(lr - self.mean_in.to(lr.dtype))
        x = x + self.body(x)
        return SROutput(self.tail(x) + self.mean_out.to(x.dtype))


class _SRResBlock(nn.Module):
    def __init__(self, nf: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(nf, nf, 3, 1, 1),
            nn.BatchNorm2d(nf),
            nn.PReLU(),
            nn.Conv2d(nf, nf, 3, 1, 1),
            nn.BatchNorm2d(nf),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SRResNet(nn.Module):
    """SRResNet as in SRGAN (Ledig et al., 2017): with BatchNorm, PReLU, pixel shuffle.

    conv 9×9 3→nf + PReLU; nb blocks [conv-BN-PReLU-conv-BN + skip]; conv-BN + long skip;
    per ×2 stage conv nf→4nf, PixelShuffle(2), PReLU; conv 9×9 nf→out_ch, linear output
    (no tanh: targets are [0, 1] images, like the other generators). nf=64, nb=16 default.
    We pick SRGAN's BN variant rather than MSRResNet because the paper's SRResNet-G/-P
    follow SRGAN; BatchNorm statistics are per rank (no SyncBN).
    """

    def __init__(self, in_ch: int = 3, out_ch: int = 3, nf: int = 64, nb: int = 16, scale: int = 4) -> None:
        super().__init__()
        _check_positive("SRResNet", in_ch=in_ch, out_ch=out_ch, nf=nf, nb=nb)
        self.in_ch, self.out_ch, self.nf, self.nb, self.scale = in_ch, out_ch, nf, nb, scale
        self.head = nn.Sequential(nn.Conv2d(in_ch, nf, 9, 1, 4), nn.PReLU())
        self.body = nn.Sequential(*[_SRResBlock(nf) for _ in range(nb)])
        self.body_tail = nn.Sequential(nn.Conv2d(nf, nf, 3, 1, 1), nn.BatchNorm2d(nf))
        ups: list[nn.Module] = []
        for f in upsample_factors(scale):
            ups += [nn.Conv2d(nf, nf * f * f, 3, 1, 1), nn.PixelShuffle(f), nn.PReLU()]
        self.upsampler = nn.Sequential(*ups)
        self.tail = nn.Conv2d(nf, out_ch, 9, 1, 4)

    def summary(self) -> str:
        n = count_parameters(self)
        return f"SRResNet x{self.scale}: {n:,} trainable params; nf={self.nf} nb={self.nb} (BN)"

    def forward(self, lr: torch.Tensor) -> SROutput:
        """lr: (B, in_ch, h, w) float in [0, 1] -> SROutput(sr (B, out_ch, s·h, s·w), None, None)."""
        check_image_input("SRResNet", lr, self.in_ch)
        x = self.head(lr)
        x = x + self.body_tail(self.body(x))
        return SROutput(self.tail(self.upsampler(x)))
