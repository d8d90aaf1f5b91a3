"""LPIPS (AlexNet, linear weights v0.1) without any download (docs/method.md §8).

The ``lpips`` package ships its linear layers (``weights/v0.1/alex.pth``) but fetches the
AlexNet backbone from the internet through torchvision. We build ``lpips.LPIPS`` with a random
trunk (``pnet_rand=True``: nothing is downloaded) and then load the ImageNet AlexNet
``features`` from a file found by :mod:`spsr_hpc.weights`: an explicit path, torchvision's file in
the torch hub cache, or the weights converted by ``python -m spsr_hpc.weights fetch`` (which
scripts/setup_env.sh runs; see docs/weights.md). A missing file is an error that names it and
the fix; ``random_backbone=True`` keeps the random trunk, for tests only.
"""

from __future__ import annotations

import logging
import os
import warnings

import lpips
import numpy as np
import torch
import torch.nn as nn

from spsr_hpc.weights import load_backbone_state_dict, resolve_backbone_weights

log = logging.getLogger(__name__)


def _load_alexnet_features(trunk: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy torchvision ``alexnet`` ``features.N.*`` tensors into lpips' sliced wrapper.

    lpips' ``pretrained_networks.alexnet`` splits ``features`` into slice1..slice5 but keeps the
    original child indices as module names (slice1.0, slice2.3, slice3.6, slice4.8, slice5.10),
    so ``features.N.weight`` lives at ``sliceK.N.weight`` for the slice K that holds child N.
    """
    index_to_slice = {}
    for k in range(1, trunk.N_slices + 1):
        for name, _ in getattr(trunk, f"slice{k}").named_children():
            index_to_slice[name] = f"slice{k}"
    mapped = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] != "features":
            continue  # the classifier is not part of LPIPS
        if parts[1] not in index_to_slice:
            raise ValueError(f"AlexNet checkpoint key {key!r} has no place in lpips' trunk")
        mapped[".".join([index_to_slice[parts[1]], *parts[1:]])] = value
    expected = set(trunk.state_dict())
    if set(mapped) != expected:
        raise ValueError(
            "AlexNet checkpoint does not match lpips' trunk: missing "
            f"{sorted(expected - set(mapped))}, unexpected {sorted(set(mapped) - expected)}"
        )
    trunk.load_state_dict(mapped, strict=True)


class LPIPSMetric(nn.Module):
    """LPIPS distance on RGB images; lower is more similar.

    Args:
        weights_path: AlexNet weights (torchvision's ``alexnet-owt-7be5be79.pth`` or the converted
            ``alexnet.safetensors``); None = spsr_hpc.weights' lookup.
        random_backbone: keep a randomly initialised AlexNet (tests only; logged as a warning);
            initialised from seed 0, so every instance holds the same weights.
        device: where the network runs.

    Raises :class:`spsr_hpc.weights.MissingWeightsError` (naming the file) when the backbone
    weights are not on disk and ``random_backbone`` is False.
    """

    def __init__(
        self,
        weights_path: str | os.PathLike | None = None,
        *,
        random_backbone: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        # Resolve first so that a missing file fails before building anything.
        self.backbone_file = (
            None if random_backbone else str(resolve_backbone_weights("alexnet", weights_path))
        )
        # A fixed seed makes the random trunk (tests only) the same in every instance, so two
        # evaluations with random_backbone=True are comparable with each other.
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            # lpips calls torchvision's deprecated `alexnet(pretrained=False)`; nothing to act on.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.models\._utils")
            self.net = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
        if random_backbone:
            log.warning(
                "LPIPS uses a RANDOM AlexNet backbone (random_backbone=True): its values are NOT "
                "comparable with published LPIPS numbers; use this for tests only"
            )
        else:
            _load_alexnet_features(self.net.net, load_backbone_state_dict("alexnet", self.backbone_file))
        self.random_backbone = random_backbone
        self.net.eval().requires_grad_(False)
        self.to(device)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b: (B, 3, H, W) float RGB in [0, 1]. Returns (B,) float32 LPIPS distances.

        The images are scaled to [-1, 1] as LPIPS expects; no crop (docs/method.md §8).
        """
        if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 3:
            raise ValueError(f"LPIPS needs two (B, 3, H, W) tensors of equal shape, got {tuple(a.shape)} "
                             f"and {tuple(b.shape)}")
        dev = self.device
        a = a.to(dev, torch.float32) * 2 - 1
        b = b.to(dev, torch.float32) * 2 - 1
        return self.net(a, b).flatten().float()

    def from_uint8(self, a: np.ndarray, b: np.ndarray) -> float:
        """LPIPS of one pair of (H, W, 3) uint8 RGB images."""
        for name, img in (("a", a), ("b", b)):
            if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise TypeError(f"{name} must be a (H, W, 3) uint8 array, got "
                                f"{getattr(img, 'shape', None)} {getattr(img, 'dtype', type(img).__name__)}")
        ta = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None].float() / 255
        tb = torch.from_numpy(np.ascontiguousarray(b.transpose(2, 0, 1)))[None].float() / 255
        return float(self(ta, tb)[0])
