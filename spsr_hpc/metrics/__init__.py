"""Evaluation metrics on the paper's protocol (docs/method.md §8): PSNR/SSIM on MATLAB's Y, LPIPS."""

from spsr_hpc.metrics.lpips_metric import LPIPSMetric
from spsr_hpc.metrics.psnr_ssim import psnr, psnr_ssim, rgb_to_y, ssim, ssim_downsample_factor

__all__ = ["LPIPSMetric", "psnr", "psnr_ssim", "rgb_to_y", "ssim", "ssim_downsample_factor"]
