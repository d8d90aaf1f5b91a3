"""Structure extractors: the feature maps the structure losses compare (docs/method.md §4, §11).

``model.structure_extractor`` picks what feeds the structure pixel loss and the structure D:

=========  =====================================================  ========  ======  ==============
name       layer                                                  channels  stride  paper row
=========  =====================================================  ========  ======  ==============
nse        our NSE (models/nse.py), pretrained or random (SPSR-R)  32        4       SPSR-P/-J/-R
vgg19      VGG19 conv5_4 before ReLU (``features[:35]``)          512       16      SPSR-VGG
vgg16      VGG16 conv5_3 before ReLU (``features[:29]``)          512       16      substitute
resnet18   ResNet18 "Conv4_2" = ``layer3[1]`` (its output)        256       16      SPSR-ResNet
=========  =====================================================  ========  ======  ==============

VGG19 conv5_4 is the layer the paper names ("the 4th convolution after the 4th max-pooling", as
ESRGAN); VGG16 conv5_3 (the last conv of the same block) is the documented offline substitute, as
for the perceptual loss. ResNet18's "Conv4_2" is the second BasicBlock of the conv4_x stage of
He et al.'s naming (conv2_x..conv5_x = torchvision's layer1..layer4), i.e. ``layer3[1]``; its
output has stride 16 like VGG19 conv5_4: a 128 patch gives 8×8 maps from both, which is how the
paper chose the layer (tests/test_extractors.py measures it on the modules).

The ImageNet extractors are frozen, stay in eval mode (ResNet's BatchNorm uses its running
statistics), normalise inputs in [0, 1] with the ImageNet mean/std, and read torchvision's
weights through :mod:`spsr_hpc.weights` (torch hub cache first; nothing is downloaded). A missing
file raises :class:`spsr_hpc.weights.MissingWeightsError` naming it; ``random_weights=True`` is for
tests only and warns loudly.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from spsr_hpc.weights import freeze_with_imagenet_norm_, load_backbone_part

log = logging.getLogger(__name__)

EXTRACTORS = ("nse", "vgg19", "vgg16", "resnet18")


@dataclass(frozen=True)
class ExtractorSpec:
    """What an ImageNet structure extractor is: backbone, layer, output channels and stride."""

    backbone: str
    layer: str
    channels: int
    stride: int
    end: int | None = None
    """VGG only: number of torchvision ``features`` modules kept (up to the conv, before its ReLU)."""


IMAGENET_EXTRACTORS = {
    "vgg19": ExtractorSpec("vgg19", "conv5_4", 512, 16, end=35),
    "vgg16": ExtractorSpec("vgg16", "conv5_3", 512, 16, end=29),
    "resnet18": ExtractorSpec("resnet18", "layer3[1] (Conv4_2)", 256, 16),
}


def _halve(size: int, times: int, *, ceil: bool) -> int:
    for _ in range(times):
        size = (size + 1) // 2 if ceil else size // 2
    return size


def feature_shape(name: str, height: int, width: int, *, nse_out_dim: int = 32) -> tuple[int, int, int]:
    """(channels, h, w) of extractor `name`'s features for an (height, width) image, computed from
    the layers' arithmetic: NSE two 4×4/s2/p1 convs (⌊·/2⌋ twice), VGG four 2×2 max-pools (⌊·/2⌋
    four times), ResNet18 up to layer3 four stride-2 steps of ⌈·/2⌉ (conv1 7×7/s2/p3, max-pool
    3×3/s2/p1, layer2 and layer3's 3×3/s2/p1). Equal (8×8 for 128) when the size is a multiple of 16.
    """
    if name == "nse":
        return nse_out_dim, _halve(height, 2, ceil=False), _halve(width, 2, ceil=False)
    if name not in IMAGENET_EXTRACTORS:
        raise ValueError(f"model.structure_extractor={name!r} is not one of {EXTRACTORS}")
    spec = IMAGENET_EXTRACTORS[name]
    ceil = spec.backbone == "resnet18"
    return spec.channels, _halve(height, 4, ceil=ceil), _halve(width, 4, ceil=ceil)


class _ResNet18ToLayer3(nn.Module):
    """torchvision resnet18 up to and including layer3 (its two BasicBlocks), module names kept so
    torchvision's state-dict keys (``conv1.weight``, ``layer3.1.bn2.running_var``, ...) load as they are."""

    def __init__(self) -> None:
        super().__init__()
        full = torchvision.models.resnet18(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = full.conv1, full.bn1, full.relu, full.maxpool
        self.layer1, self.layer2, self.layer3 = full.layer1, full.layer2, full.layer3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


class ImageNetExtractor(nn.Module):
    """Frozen ImageNet features for the structure losses: (B, 3, H, W) in [0, 1] -> (B, C, H/16, W/16).

    Args:
        name: "vgg19", "vgg16" or "resnet18" (see the module docstring for the layers).
        weights_path: torchvision's state dict of the backbone; None = :mod:`spsr_hpc.weights`'
            lookup (torch hub cache, then for VGG16 the converted file). Missing: MissingWeightsError.
        random_weights: tests only: keep torchvision's random initialisation (warns loudly).
    """

    def __init__(
        self, name: str, weights_path: str | os.PathLike | None = None, *, random_weights: bool = False
    ) -> None:
        super().__init__()
        if name not in IMAGENET_EXTRACTORS:
            raise ValueError(f"ImageNetExtractor: name={name!r} is not one of {sorted(IMAGENET_EXTRACTORS)}")
        self.spec = spec = IMAGENET_EXTRACTORS[name]
        self.name, self.out_channels, self.stride = name, spec.channels, spec.stride
        if spec.backbone == "resnet18":
            self.body: nn.Module = _ResNet18ToLayer3()
            prefix = ""
        else:
            # torchvision's `features` (same layers and indices), without building the 120M-parameter
            # classifier that vgg19(weights=None) would initialise only to be dropped.
            layers = make_layers(cfgs["E" if spec.backbone == "vgg19" else "D"], batch_norm=False)
            self.body = nn.Sequential(*list(layers)[: spec.end])
            prefix = "features."
        if random_weights:
            msg = (f"structure extractor {name} uses RANDOM weights (tests only): the structure losses "
                   "then compare meaningless features")
            warnings.warn(msg, stacklevel=2)
            log.warning(msg)
            self.source = f"{name}: RANDOM weights (tests only)"
        else:
            self.source = load_backbone_part(self.body, spec.backbone, weights_path, prefix=prefix,
                                             what=f"structure extractor {name} ({spec.layer})")
        freeze_with_imagenet_norm_(self)

    def train(self, mode: bool = True) -> ImageNetExtractor:
        """Stays in eval mode: a fixed feature extractor (ResNet's BatchNorm keeps its statistics)."""
        return super().train(False)

    def summary(self) -> str:
        return (f"{self.name} structure extractor: {self.spec.layer}, {self.out_channels} channels at "
                f"stride {self.stride} ({self.source})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"structure extractor {self.name}: expected (B, 3, H, W) images, got {tuple(x.shape)}"
            )
        return self.body((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


__all__ = ["EXTRACTORS", "IMAGENET_EXTRACTORS", "ExtractorSpec", "ImageNetExtractor", "feature_shape"]
