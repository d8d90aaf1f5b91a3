"""The SPSR-G generator (docs/method.md §2), laid out so its state dict is the official one."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import spsr_kernels
from spsr_hpc.models.blocks import (
    RRDB,
    ShortcutBlock,
    SROutput,
    check_image_input,
    conv3x3,
    count_parameters,
    kaiming_init_,
    upconv_layers,
)

# The official code's fixed difference stencils (conv2d is a cross-correlation):
# v[i,j] = x[i+1,j] - x[i-1,j], h[i,j] = x[i,j+1] - x[i,j-1].
GRADIENT_KERNEL_V = torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
GRADIENT_KERNEL_H = torch.tensor([[0.0, 0.0, 0.0], [-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]).view(1, 1, 3, 3)


class GradientMapNoPadding(nn.Module):
    """Same-size gradient map (docs/method.md §1, padding 1) through ``spsr_kernels.gradient_map``.

    Holds the two fixed 3×3 stencils as persistent buffers only so that the state dict carries
    ``get_g_nopadding.weight_{h,v}`` like the official checkpoint; they are not trainable and
    the forward does not read them (the fused kernel hard-codes the same stencils).
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight_h", GRADIENT_KERNEL_H.clone())
        self.register_buffer("weight_v", GRADIENT_KERNEL_V.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) float -> (B, C, H, W), same dtype."""
        return spsr_kernels.gradient_map(x, padding=1)


class SPSRGenerator(nn.Module):
    """SPSR-G: ESRGAN RRDB trunk + gradient branch + fusion (docs/method.md §2, public code layout).

    Args:
        in_ch, out_ch: image channels (3).
        nf: trunk feature width (64). The branch and fusion RRDBs run at 2·nf.
        nb: RRDBs in the trunk (23).
        gc: growth channels of every dense block (32).
        scale: 2, 3, 4 or 8 (nearest + conv upsamplers, ×3 as one stage).
        taps: trunk RRDB indices (0-based, strictly increasing, < nb) whose outputs feed the
            branch stages; one branch stage per tap, named b_block_1..k / b_concat_1..k.

    State-dict keys are the official ones: ``model.0`` (conv_first), ``model.1.sub.{0..nb-1}``
    (RRDBs), ``model.1.sub.{nb}`` (LR conv), upsampler convs at ``model.3``/``model.6`` (×4),
    HR conv ``model.8`` == ``HR_conv0_new.0`` (one module saved under both names),
    ``HR_conv1_new.0``, ``get_g_nopadding.weight_{h,v}`` (fixed buffers), ``b_*``, ``conv_w.0``,
    ``f_*``. Default size: 24,796,230 trainable parameters.
    """

    def __init__(
        self,
        in_ch: int = 3,
        out_ch: int = 3,
        nf: int = 64,
        nb: int = 23,
        gc: int = 32,
        scale: int = 4,
        taps: Sequence[int] = (4, 9, 14, 19),
        init_scale: float = 0.1,
    ) -> None:
        super().__init__()
        for name, value in (("in_ch", in_ch), ("out_ch", out_ch), ("nf", nf), ("nb", nb), ("gc", gc)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SPSRGenerator: {name} must be a positive int, got {value!r}")
        taps = tuple(int(t) for t in taps)
        if not taps or list(taps) != sorted(set(taps)) or taps[0] < 0 or taps[-1] >= nb:
            raise ValueError(
                f"SPSRGenerator: taps={taps} must be non-empty, strictly increasing RRDB indices in "
                f"[0, {nb - 1}] (nb={nb}); the default is (4, 9, 14, 19) for nb=23"
            )
        self.in_ch, self.out_ch, self.nf, self.nb, self.gc = in_ch, out_ch, nf, nb, gc
        self.scale, self.taps = scale, taps

        # --- SR trunk (keys model.*, HR_conv*_new) ---
        self.HR_conv0_new = conv3x3(nf, nf, act=True)
        self.HR_conv1_new = conv3x3(nf, nf)
        trunk_body = nn.Sequential(*[RRDB(nf, gc) for _ in range(nb)], nn.Conv2d(nf, nf, 3, 1, 1))
        self.model = nn.Sequential(
            nn.Conv2d(in_ch, nf, 3, 1, 1),
            ShortcutBlock(trunk_body),
            *upconv_layers(nf, scale),
            *self.HR_conv0_new,  # the same conv/LReLU objects: model.<k> aliases HR_conv0_new.0
        )
        self.get_g_nopadding = GradientMapNoPadding()

        # --- gradient branch (keys b_*, conv_w) ---
        self.b_fea_conv = conv3x3(in_ch, nf)
        for i in range(1, len(taps) + 1):
            setattr(self, f"b_block_{i}", RRDB(2 * nf, gc))
            setattr(self, f"b_concat_{i}", conv3x3(2 * nf, nf))
        self.b_LR_conv = conv3x3(nf, nf)
        self.b_module = nn.Sequential(*upconv_layers(nf, scale), *conv3x3(nf, nf, act=True), *conv3x3(nf, nf))
        self.conv_w = nn.Sequential(nn.Conv2d(nf, out_ch, 1, 1, 0))

        # --- fusion (keys f_*) ---
        self.f_block = RRDB(2 * nf, gc)
        self.f_concat = conv3x3(2 * nf, nf)
        self.f_HR_conv0 = conv3x3(nf, nf, act=True)
        self.f_HR_conv1 = conv3x3(nf, out_ch)

        kaiming_init_(self, scale=init_scale)

    # -- parameter groups ----------------------------------------------------------------
    @staticmethod
    def part_of(name: str) -> str:
        """'trunk', 'branch' or 'fusion' for a parameter/state-dict key."""
        if name.startswith("f_"):
            return "fusion"
        if name.startswith(("b_", "conv_w")):
            return "branch"
        return "trunk"

    def parameter_split(self) -> dict[str, int]:
        """Trainable parameter counts per part: {'trunk', 'branch', 'fusion'}."""
        counts = {"trunk": 0, "branch": 0, "fusion": 0}
        for name, p in self.named_parameters():
            if p.requires_grad:
                counts[self.part_of(name)] += p.numel()
        return counts

    @torch.no_grad()
    def init_fusion_passthrough(self, rgb_weight: torch.Tensor, rgb_bias: torch.Tensor) -> None:
        """Start the fusion as a pass-through of the trunk (ours; the paper starts it fresh).

        rgb_weight (out_ch, nf, 3, 3), rgb_bias (out_ch,): the final nf→RGB conv of the PSNR RRDB
        whose trunk this model loaded (``model.10`` at ×4). Afterwards the model's SR equals that
        RRDB's output exactly: HR_conv1_new is an identity conv; every RDB of f_block ends in a
        zero conv (f_block then multiplies by 1.2); f_concat applies the RGB conv to the trunk
        half (÷1.2) into channels g and -g and ignores the branch half; f_HR_conv0 passes them
        through its LeakyReLU and f_HR_conv1 recombines them as (lrelu(g) - lrelu(-g)) / 1.2 = g.
        Every fusion weight still trains (the branch half of f_concat from zero), so the GAN
        stage starts at the PSNR model instead of at noise. Needs nf >= 2 * out_ch.
        """
        nf, c = self.nf, self.out_ch
        if tuple(rgb_weight.shape) != (c, nf, 3, 3) or tuple(rgb_bias.shape) != (c,):
            raise ValueError(
                f"init_fusion_passthrough: expected an RGB conv ({c}, {nf}, 3, 3) + ({c},), "
                f"got {tuple(rgb_weight.shape)} + {tuple(rgb_bias.shape)}"
            )
        if nf < 2 * c:
            raise ValueError(f"init_fusion_passthrough needs nf >= {2 * c}, got nf={nf}")
        for conv in (self.HR_conv1_new[0], self.f_concat[0], self.f_HR_conv0[0], self.f_HR_conv1[0]):
            conv.weight.zero_()
            conv.bias.zero_()
        eye = torch.arange(nf)
        self.HR_conv1_new[0].weight[eye, eye, 1, 1] = 1.0
        for rdb in (self.f_block.RDB1, self.f_block.RDB2, self.f_block.RDB3):
            rdb.conv5[0].weight.zero_()
            rdb.conv5[0].bias.zero_()
        concat = self.f_concat[0]  # input: 1.2 * cat(branch, trunk); RRDB is out * 0.2 + x
        concat.weight[:c, nf:] = rgb_weight / 1.2
        concat.weight[c : 2 * c, nf:] = -rgb_weight / 1.2
        concat.bias[:c], concat.bias[c : 2 * c] = rgb_bias, -rgb_bias
        two = torch.arange(2 * c)
        self.f_HR_conv0[0].weight[two, two, 1, 1] = 1.0
        rgb = torch.arange(c)
        self.f_HR_conv1[0].weight[rgb, rgb, 1, 1] = 1 / 1.2  # lrelu(g) - lrelu(-g) = 1.2 g
        self.f_HR_conv1[0].weight[rgb, c + rgb, 1, 1] = -1 / 1.2

    def fusion_parameters(self) -> list[nn.Parameter]:
        """The parameters that train alone during the public code's warm-up (names with `f_`)."""
        return [p for n, p in self.named_parameters() if self.part_of(n) == "fusion"]

    def summary(self) -> str:
        s = self.parameter_split()
        return (
            f"SPSRGenerator x{self.scale}: {count_parameters(self):,} trainable params "
            f"(trunk {s['trunk']:,}, "
            f"branch {s['branch']:,}, fusion {s['fusion']:,}); nf={self.nf} nb={self.nb} gc={self.gc} "
            f"taps={self.taps}"
        )

    # -- forward -----------------------------------------------------------------------
    def forward(self, lr: torch.Tensor) -> SROutput:
        """lr: (B, in_ch, h, w) float in [0, 1] -> SROutput(sr, grad_sr, grad_lr).

        sr and grad_sr: (B, out_ch, s·h, s·w); grad_lr: (B, in_ch, h, w). Any h, w ≥ 1.
        """
        check_image_input("SPSRGenerator", lr, self.in_ch)
        grad_lr = self.get_g_nopadding(lr)

        x = self.model[0](lr)
        body = self.model[1].sub
        x_ori = x
        tap_feats = []
        for i in range(self.nb):
            x = body[i](x)
            if i in self.taps:
                tap_feats.append(x)
        x = x_ori + body[self.nb](x)  # LR conv, long skip
        x = self.model[2:](x)  # upsamplers + HR_conv0_new
        x = self.HR_conv1_new(x)  # 64-channel HR trunk features, not RGB

        b_fea = self.b_fea_conv(grad_lr)
        b = b_fea
        for i, feat in enumerate(tap_feats, start=1):
            b = getattr(self, f"b_block_{i}")(torch.cat([b, feat], dim=1))
            b = getattr(self, f"b_concat_{i}")(b)
        b = self.b_LR_conv(b) + b_fea
        b = self.b_module(b)
        grad_sr = self.conv_w(b)

        f = self.f_block(torch.cat([b, x], dim=1))
        f = self.f_concat(f)
        f = self.f_HR_conv0(f)
        sr = self.f_HR_conv1(f)
        return SROutput(sr=sr, grad_sr=grad_sr, grad_lr=grad_lr)
