"""Fused Triton kernels for SPSR: gradient map and InfoNCE."""

from .gradient_map import GradientMap, gradient_map, gradient_map_ref
from .info_nce import InfoNCELoss, info_nce, info_nce_ref

__all__ = ["GradientMap", "InfoNCELoss", "gradient_map", "gradient_map_ref", "info_nce", "info_nce_ref"]
