"""Locating pretrained backbone weights without downloading anything.

LPIPS (AlexNet) and the perceptual loss (VGG19) need ImageNet backbone weights. We never
download at run time: a file is taken from an explicit path, else from the torch hub cache
(``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch/hub/checkpoints``), and when absent
the error names the file and where to put it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# torchvision's ImageNet checkpoints, by backbone.
BACKBONE_FILES = {
    "vgg19": "vgg19-dcbb9e9d.pth",
    "alexnet": "alexnet-owt-7be5be79.pth",
}


class MissingWeightsError(FileNotFoundError):
    """Raised when a backbone checkpoint is not on disk; the message says where to put it."""


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_backbone_weights(backbone: str, path: str | os.PathLike | None = None) -> Path:
    """Return the path of the ImageNet checkpoint for `backbone` ("vgg19" or "alexnet").

    `path`, when given, must exist. Otherwise the torch hub cache is searched.
    """
    if backbone not in BACKBONE_FILES:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {sorted(BACKBONE_FILES)}")
    filename = BACKBONE_FILES[backbone]
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise MissingWeightsError(
                f"{backbone} weights not found at the configured path {p}. Point it at a copy of "
                f"torchvision's {filename}."
            )
        return p
    candidate = hub_checkpoint_dir() / filename
    if candidate.is_file():
        return candidate
    raise MissingWeightsError(
        f"{backbone} ImageNet weights are not on this machine: expected {candidate}. "
        f"Copy torchvision's {filename} there (or set TORCH_HOME), or pass its path explicitly. "
        "Nothing is downloaded at run time."
    )


def load_backbone_state_dict(backbone: str, path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Load the backbone's state dict safely (weights_only=True)."""
    p = resolve_backbone_weights(backbone, path)
    return torch.load(p, map_location="cpu", weights_only=True)
