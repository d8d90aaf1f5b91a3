"""Perceptual loss (docs/method.md §4): L1 of VGG19 conv5_4 features (before ReLU), ImageNet norm.

The paper's backbone is torchvision's VGG19 ``features[:35]``. ``backbone="vgg16"`` is our
documented substitute for machines without torchvision's VGG19 file: VGG16 ``features[:29]``
(conv5_3, the last conv of the same block, before ReLU) with the same normalisation, from
torchvision's file or the weights converted by ``python -m spsr_hpc.weights fetch``. One is never
swapped for the other silently: a missing VGG19 is an error that names the file and the
substitute. Weights are found offline by :mod:`spsr_hpc.weights`; nothing is downloaded. Tests
may build the loss with random weights, which is logged loudly because it is then meaningless.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from spsr_hpc.weights import freeze_with_imagenet_norm_, load_backbone_part

log = logging.getLogger(__name__)

# features[:35] ends at conv5_4, before its ReLU (ESRGAN/SPSR "VGG19-54").
CONV5_4_END = 35
# backbone -> (torchvision VGG config, default layer: the last conv of block 5, before its ReLU)
BACKBONES = {"vgg19": ("E", "conv5_4"), "vgg16": ("D", "conv5_3")}


def conv_layer_end(backbone: str, layer: str) -> int:
    """Number of VGG ``features`` modules up to and including conv `layer` ("conv5_4"), before
    its ReLU: conv_layer_end("vgg19", "conv5_4") == 35, conv_layer_end("vgg16", "conv5_3") == 29."""
    cfg = cfgs[BACKBONES[backbone][0]]
    block, k, pos, names = 1, 0, 0, []
    for v in cfg:
        if v == "M":
            block, k, pos = block + 1, 0, pos + 1
            continue
        k += 1
        names.append(f"conv{block}_{k}")
        if names[-1] == layer:
            return pos + 1
        pos += 2  # conv + ReLU
    raise ValueError(f"PerceptualLoss: {backbone} has no layer {layer!r}; its convolutions are {names}")


class PerceptualLoss(nn.Module):
    """criterion(VGG(norm(SR)), VGG(norm(HR))), features frozen and in eval mode.

    Args:
        weights_path: the backbone's state dict (torchvision's vgg19-dcbb9e9d.pth /
            vgg16-397923af.pth, or the converted vgg16.safetensors); None = spsr_hpc.weights'
            lookup. Absent weights raise spsr_hpc.weights.MissingWeightsError naming the file.
        random_weights: tests only: skip loading and keep random features (warns loudly).
        criterion: "l1" (the paper) or "l2".
        end: number of VGG `features` modules to run (overrides `layer`).
        backbone: "vgg19" (the paper) or "vgg16" (substitute).
        layer: the conv whose output (before ReLU) is compared; default conv5_4 for VGG19 (the
            paper), conv5_3 for VGG16.

    forward(sr, hr): (B, 3, H, W) float in [0, 1] each -> 0-dim fp32 loss; gradients flow into
    sr only.
    """

    def __init__(
        self,
        weights_path: str | os.PathLike | None = None,
        *,
        random_weights: bool = False,
        criterion: str = "l1",
        end: int | None = None,
        backbone: str = "vgg19",
        layer: str | None = None,
    ) -> None:
        super().__init__()
        if criterion not in ("l1", "l2"):
            raise ValueError(f"PerceptualLoss: criterion={criterion!r} is not 'l1' or 'l2'")
        if backbone not in BACKBONES:
            raise ValueError(f"PerceptualLoss: backbone={backbone!r} is not one of {sorted(BACKBONES)}")
        cfg_name, default_layer = BACKBONES[backbone]
        self.layer = layer or default_layer
        if end is None:
            end = conv_layer_end(backbone, self.layer)
        layers = make_layers(cfgs[cfg_name], batch_norm=False)
        if not 1 <= end <= len(layers):
            raise ValueError(f"PerceptualLoss: end={end} must be in [1, {len(layers)}]")
        self.features = nn.Sequential(*list(layers)[:end])
        self.criterion = criterion
        self.backbone = backbone
        self.random_weights = random_weights
        if random_weights:
            msg = (f"PerceptualLoss uses RANDOM {backbone.upper()} weights (tests only): the perceptual "
                   "term is meaningless")
            warnings.warn(msg, stacklevel=2)
            log.warning(msg)
            self.source = f"{backbone}: RANDOM weights (tests only)"
        else:
            self.source = load_backbone_part(self.features, backbone, weights_path, prefix="features.",
                                             what="PerceptualLoss")
        freeze_with_imagenet_norm_(self)

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Stays in eval mode: the backbone is a fixed feature extractor."""
        return super().train(False)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) float in [0, 1] -> conv5 features (B, 512, H/16, W/16)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"PerceptualLoss: expected (B, 3, H, W) images, got {tuple(x.shape)}")
        return self.features((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        if sr.shape != hr.shape:
            raise ValueError(f"PerceptualLoss: SR {tuple(sr.shape)} and HR {tuple(hr.shape)} differ")
        fake = self.extract(sr).float()
        with torch.no_grad():
            real = self.extract(hr).float()
        return F.l1_loss(fake, real) if self.criterion == "l1" else F.mse_loss(fake, real)
