"""Device description shared by the benchmarks and the evaluation reports (no benchmark imports)."""

from __future__ import annotations

import os
import platform

import torch


def device_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` for CUDA, else ``CPU (<processor>, <n> cores)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


__all__ = ["device_name"]
