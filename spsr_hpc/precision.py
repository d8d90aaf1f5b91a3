"""Mixed precision (``train.bf16``, ``--precision bf16``): where bf16 runs, and the autocast context.

The mechanism (docs/training.md, "Precision"): weights, gradients, optimizer states, BatchNorm
buffers, EMA and exports stay fp32 in fp32 DeepSpeed engines; the forward passes run under
``torch.autocast(dtype=torch.bfloat16)``, so convolutions and matrix products compute in bf16
with fp32 accumulation, and every loss takes ``.float()`` inputs at its boundary.

bf16 is used only where the hardware runs it natively: CUDA devices that report bf16 support,
and CPUs with native bf16 instructions (oneDNN's check: AVX512-BF16 / AMX). Anywhere else it is
refused with the reason (emulated bf16 is slower than fp32 and would only lose accuracy).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def cpu_bf16_native() -> bool:
    """True when this CPU computes bf16 natively (oneDNN: avx512_bf16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_unsupported(device: str | torch.device) -> str | None:
    """Why bf16 cannot run on ``device`` ("cpu", "cuda", "cuda:1", "auto"), or None when it can.

    "auto" means CUDA when a CUDA device is visible, else the CPU. For "cuda" without a visible
    device (a login node validating a GPU config) the answer is None: the run itself checks again.
    """
    if str(device) == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        kind = torch.device(device).type
    if kind == "cuda":
        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            return (f"the CUDA device {torch.cuda.get_device_name()} has no native bf16 "
                    "(needs compute capability >= 8.0)")
        return None
    if kind == "cpu":
        if not cpu_bf16_native():
            return ("this CPU has no native bf16 (oneDNN reports no avx512_bf16/AMX; emulated bf16 "
                    "is slower than fp32)")
        return None
    return f"bf16 is not supported on device type {kind!r}"


def check_bf16(device: str | torch.device, key: str = "train.bf16") -> None:
    """Raise ValueError naming ``key`` and the reason when bf16 cannot run on ``device``."""
    reason = bf16_unsupported(device)
    if reason is not None:
        raise ValueError(f"{key}=true: {reason}; set {key}=false")


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """``torch.autocast(device.type, bfloat16)`` when enabled, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def cast_frozen_weights_(module: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Store the weights of a *frozen* network's convolutions and linear layers in ``dtype``.

    Autocast re-casts a weight that does not require grad at every call (its cast cache holds
    only trainable leaves); for a frozen feature extractor (VGG19, NSE) that is a full copy of its
    weights per forward. Casting once gives the same numbers (autocast would round the same fp32
    weight to the same bf16). BatchNorm parameters and buffers stay fp32. Returns ``module``.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            for p in m.parameters(recurse=False):
                if p.requires_grad:
                    raise ValueError(f"cast_frozen_weights_: {type(m).__name__} has a trainable parameter")
                p.data = p.data.to(dtype)
    return module


__all__ = ["autocast", "bf16_unsupported", "cast_frozen_weights_", "check_bf16", "cpu_bf16_native"]
