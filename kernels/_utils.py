"""Dispatch and validation helpers shared by the spsr_kernels ops.

Backend rule (docs/kernels_*.md): CUDA tensors run the Triton kernels; CPU tensors run the
PyTorch path, except under ``TRITON_INTERPRET=1`` where CPU tensors go through the
Triton kernels in the interpreter (that is how CI tests the kernels without a GPU).
"""

from __future__ import annotations

import os

import torch

from ._triton import HAS_TRITON, TRITON_MISSING

BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def interpreter_active() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, *tensors: torch.Tensor, op: str) -> str:
    """Return "triton" or "torch" for these tensors, or raise a ValueError naming the fix."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {BACKENDS}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "torch":
        return "torch"
    if not HAS_TRITON:
        if backend == "triton":
            raise ValueError(f"{op}: backend='triton': {TRITON_MISSING}")
        return "torch"
    if backend == "triton":
        if not on_cuda and not interpreter_active():
            raise ValueError(
                f"{op}: backend='triton' needs CUDA tensors (got device {tensors[0].device}); "
                "set TRITON_INTERPRET=1 before importing spsr_kernels to run it on CPU, "
                "or use backend='torch'"
            )
        return "triton"
    return "triton" if (on_cuda or interpreter_active()) else "torch"


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"{op}: all inputs must be on one device, got {listed}")


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} has dtype {t.dtype}; expected one of float32, float16, bfloat16 "
            "(float64 for gradcheck); convert with .float()"
        )
