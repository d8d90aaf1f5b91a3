"""Fused Triton kernels for SPSR: gradient map and InfoNCE.

Without triton (it is Linux-only and optional) everything still imports and runs the PyTorch
paths; ``HAS_TRITON`` says which case this is.
"""

from ._triton import HAS_TRITON
from ._utils import interpreter_active
from .gradient_map import GradientMap, gradient_map, gradient_map_ref
from .info_nce import InfoNCELoss, info_nce, info_nce_ref

__all__ = [
    "HAS_TRITON",
    "GradientMap",
    "InfoNCELoss",
    "gradient_map",
    "gradient_map_ref",
    "info_nce",
    "info_nce_ref",
    "interpreter_active",
]
