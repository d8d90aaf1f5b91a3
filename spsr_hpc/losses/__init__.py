"""Losses: pixel, perceptual, RaGAN/vanilla GAN, gradient-space, structure, and the composite objective."""

from spsr_hpc.losses.gan import GAN_LOSSES, ragan_d_loss, ragan_g_loss, vanilla_d_loss, vanilla_g_loss
from spsr_hpc.losses.gradient import branch_pixel_loss, gradient_pixel_loss, padded_gradient, same_gradient
from spsr_hpc.losses.objective import METHODS, TERMS, DInputs, LossConfig, SRObjective
from spsr_hpc.losses.perceptual import PerceptualLoss
from spsr_hpc.losses.pixel import pixel_loss
from spsr_hpc.losses.structure import freeze_, structure_distance, structure_features, structure_pixel_loss

__all__ = [
    "GAN_LOSSES",
    "METHODS",
    "TERMS",
    "DInputs",
    "LossConfig",
    "PerceptualLoss",
    "SRObjective",
    "branch_pixel_loss",
    "freeze_",
    "gradient_pixel_loss",
    "padded_gradient",
    "pixel_loss",
    "ragan_d_loss",
    "ragan_g_loss",
    "same_gradient",
    "structure_distance",
    "structure_features",
    "structure_pixel_loss",
    "vanilla_d_loss",
    "vanilla_g_loss",
]
