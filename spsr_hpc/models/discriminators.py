"""Discriminators: the VGG-style image/gradient D (docs/method.md §3) and the structure D (ours).

Both output one logit per sample, (B, 1). Their final feature map must be exactly the size the
classifier was built for; any other input size raises ValueError naming the sizes that work.

BatchNorm statistics: ``sync_bn=False`` (the default) keeps per-rank statistics, which is what
the public code's DataParallel does (statistics per GPU); with ``sync_bn=True`` the batch
statistics in training are those of the global batch, every rank of a data-parallel run together
(:class:`GlobalBatchNorm2d`), so N ranks x b samples train exactly like one process with N·b.
"""

from __future__ import annotations

import torch
from torch import nn

from spsr_hpc import distributed as sdist
from spsr_hpc.models.blocks import check_image_input, count_parameters, kaiming_init_


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are over all ranks (a SyncBatchNorm that runs on CPU).

    ``torch.nn.SyncBatchNorm`` refuses CPU tensors (torch 2.14); this one works on any device and
    backend (gloo, nccl): one all-reduce of the per-channel sum, sum of squares and count forward,
    one of their gradients backward (autograd through :func:`spsr_hpc.distributed.all_reduce_sum`).
    Without a process group, with one rank, or in eval mode it is exactly ``nn.BatchNorm2d``.
    The running statistics are updated from the global batch, so they stay equal on every rank.
    The state-dict keys are those of ``nn.BatchNorm2d``: checkpoints load either way.
    Collective in training: every rank must call it the same number of times, in the same order.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) float -> same shape and dtype."""
        if not (self.training and sdist.is_initialized() and sdist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        xf = x.float()
        local = torch.cat(
            [
                xf.sum(dim=(0, 2, 3)),
                (xf * xf).sum(dim=(0, 2, 3)),
                torch.full((1,), float(x.numel() // max(c, 1)), device=x.device),
            ]
        )
        total = sdist.all_reduce_sum(local)
        n = total[2 * c]  # >= 2 with two ranks holding a sample each; no host sync here
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                unbiased = var.detach() * (n / (n - 1))
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale = scale * self.weight.float()
            shift = shift * self.weight.float() + self.bias.float()
        return (xf * scale[None, :, None, None] + shift[None, :, None, None]).to(x.dtype)


def _conv_bn_lrelu(in_ch: int, out_ch: int, k: int, s: int, bn: bool, sync_bn: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, k, s, 1)]
    if bn:
        layers.append(GlobalBatchNorm2d(out_ch) if sync_bn else nn.BatchNorm2d(out_ch))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return layers


def _out_size(size: int, stages: int) -> int:
    """Spatial size after `stages` pairs of (3×3 s1 p1, 4×4 s2 p1) convs."""
    for _ in range(stages):
        size = (size + 2 - 4) // 2 + 1
    return size


class _PairedConvDiscriminator(nn.Module):
    """features: pairs of [3×3 s1, 4×4 s2] conv blocks (BN except the first), then an MLP head."""

    def __init__(
        self, in_ch: int, channels: list[int], input_size: int, hidden: int, name: str, sync_bn: bool = False
    ) -> None:
        super().__init__()
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
            raise ValueError(f"{name}: input_size must be a positive int, got {input_size!r}")
        self._name = name
        self.in_ch, self.input_size = in_ch, input_size
        self.stages = len(channels)
        self.final_size = _out_size(input_size, self.stages)
        if self.final_size < 1:
            raise ValueError(
                f"{name}: input_size={input_size} is too small for {self.stages} stride-2 stages"
            )
        layers: list[nn.Module] = []
        prev = in_ch
        for i, ch in enumerate(channels):
            layers += _conv_bn_lrelu(prev, ch, 3, 1, bn=i > 0, sync_bn=sync_bn)
            layers += _conv_bn_lrelu(ch, ch, 4, 2, bn=True, sync_bn=sync_bn)
            prev = ch
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(prev * self.final_size**2, hidden),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(hidden, 1),
        )
        kaiming_init_(self, scale=1.0)

    def accepted_sizes(self) -> list[int]:
        """Every input size that gives the same final feature size as `input_size`."""
        lo = self.input_size
        while lo > 1 and _out_size(lo - 1, self.stages) == self.final_size:
            lo -= 1
        hi = self.input_size
        while _out_size(hi + 1, self.stages) == self.final_size:
            hi += 1
        return list(range(lo, hi + 1))

    def summary(self) -> str:
        return (
            f"{self._name}: {count_parameters(self):,} trainable params, input {self.in_ch}×"
            f"{self.input_size}×{self.input_size} -> {self.final_size}×{self.final_size} features"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_ch, S, S) float, S one of `accepted_sizes()` -> (B, 1) logits."""
        check_image_input(self._name, x, self.in_ch)
        h, w = x.shape[-2:]
        if _out_size(h, self.stages) != self.final_size or _out_size(w, self.stages) != self.final_size:
            sizes = self.accepted_sizes()
            raise ValueError(
                f"{self._name}: input {h}×{w} gives a "
                f"{_out_size(h, self.stages)}×{_out_size(w, self.stages)} "
                f"final feature map but the classifier expects {self.final_size}×{self.final_size}; "
                f"use inputs of size {sizes[0]}..{sizes[-1]} or build it with input_size={h}"
            )
        return self.classifier(self.features(x).flatten(1))


class VGGDiscriminator(_PairedConvDiscriminator):
    """VGG-style D of ESRGAN/SPSR (`Discriminator_VGG_128`): image D and gradient D.

    Ten convs alternating 3×3 s1 and 4×4 s2, channels nf·(1,1,2,2,4,4,8,8,8,8), BatchNorm
    except the first, LeakyReLU 0.2; Linear(8nf·4·4 → 100), LeakyReLU, Linear(100 → 1).
    14,502,281 parameters at nf=64 for 128 inputs; 130×130 gradient maps also reach 4×4
    (130→65→32→16→8→4), so one net serves both.

    Args:
        in_ch: input channels (3). nf: base width (64). input_size: 128 (or 130; any size whose
        final map is the same works). sync_bn: BatchNorm statistics over all ranks (see the module
        docstring); False (default) = per rank, as the public code.
    """

    def __init__(self, in_ch: int = 3, nf: int = 64, input_size: int = 128, sync_bn: bool = False) -> None:
        super().__init__(
            in_ch, [nf, 2 * nf, 4 * nf, 8 * nf, 8 * nf], input_size, 100, "VGGDiscriminator", sync_bn
        )


def structure_stages(input_size: int) -> int:
    """Stride-2 stages that bring a structure-feature map to 4×4 (32 → 3, 16 → 2, 8 → 1), within [1, 3]."""
    stages = 0
    while stages < 3 and input_size >= 8:
        input_size //= 2
        stages += 1
    return max(stages, 1)


class StructureDiscriminator(_PairedConvDiscriminator):
    """Structure D on structure-extractor feature maps (docs/method.md §3, ours in detail).

    Input: (B, 32, 32, 32) NSE features of a 128 patch (stride 4), or (B, 512, 8, 8) VGG conv5 /
    (B, 256, 8, 8) ResNet18 layer3 features (stride 16, SPSR-VGG / SPSR-ResNet). The same VGG recipe
    as the image D with as many stride-2 stages as bring the map to 4×4 like the image D's final map
    (``structure_stages``: three for the NSE's 32×32 instead of the image D's five, one for 8×8):
    channels nf, 2nf, 4nf for stages 1..3 (BN except the first conv), then
    Linear(C·4·4 → 100), LeakyReLU, Linear(100 → 1). NSE default: 32→16→8→4, 2,175,689 parameters.

    Args:
        in_ch: feature channels (32 for the NSE). nf: base width (64). input_size: feature-map size
        (32). sync_bn: as for VGGDiscriminator. stages: stride-2 stages; None = structure_stages(input_size).
    """

    def __init__(
        self, in_ch: int = 32, nf: int = 64, input_size: int = 32, sync_bn: bool = False,
        stages: int | None = None,
    ) -> None:
        if stages is None:
            stages = structure_stages(input_size)
        if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= 3:
            raise ValueError(f"StructureDiscriminator: stages must be 1, 2 or 3, got {stages!r}")
        channels = [nf, 2 * nf, 4 * nf][:stages]
        super().__init__(in_ch, channels, input_size, 100, "StructureDiscriminator", sync_bn)
