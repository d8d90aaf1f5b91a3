"""Fused Triton kernels for SPSR: gradient map and InfoNCE."""
