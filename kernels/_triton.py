"""``triton`` and ``triton.language``, or stand-ins when triton is not installed.

triton is Linux-only and optional: without it the kernel modules still import (their
``@triton.jit`` functions are kept but never launched) and every op runs its PyTorch path;
``_utils.resolve_backend`` refuses ``backend="triton"`` with :data:`TRITON_MISSING`.
"""

from __future__ import annotations

TRITON_MISSING = (
    "triton is not installed, so the fused kernels are unavailable; the PyTorch path runs instead "
    "(backend='auto' or 'torch'). Install triton (Linux: pip install triton) for backend='triton'"
)

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

    class _NoTriton:
        """``jit`` keeps the function; any other attribute is only reached on a Triton path."""

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

        def __getattr__(self, name: str):
            raise ModuleNotFoundError(TRITON_MISSING)

    triton = tl = _NoTriton()

__all__ = ["HAS_TRITON", "TRITON_MISSING", "tl", "triton"]
