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

# The oldest versions the kernels are tested with (pyproject.toml declares the same): triton 3.6 is
# what the lent GPU machines have (with torch 2.11); tests/test_kernels_aot.py compiles every
# kernel for sm_90 under the installed triton and under triton 3.6.
TRITON_MIN = (3, 6)
TORCH_MIN = (2, 11)


def version_tuple(version: str) -> tuple[int, ...]:
    """``"3.6.0+git1"`` -> (3, 6, 0): the leading dot-separated integers."""
    out = []
    for part in version.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    if version_tuple(triton.__version__) < TRITON_MIN:
        # Kept importable (the @triton.jit functions decorate fine); every op takes its PyTorch path.
        HAS_TRITON = False
        TRITON_MISSING = (
            f"triton {triton.__version__} is older than {'.'.join(map(str, TRITON_MIN))}, the oldest the "
            "fused kernels are tested with; the PyTorch path runs instead (backend='auto' or 'torch'). "
            f"Install triton>={'.'.join(map(str, TRITON_MIN))} for backend='triton'"
        )
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

__all__ = ["HAS_TRITON", "TORCH_MIN", "TRITON_MIN", "TRITON_MISSING", "tl", "triton", "version_tuple"]
