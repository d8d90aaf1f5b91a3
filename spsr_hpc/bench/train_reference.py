"""A plain eager SPSR-G training step with the public SPSR code's structure (the baseline).

Written for this repository (nothing of the authors' code is copied) to mirror how their
``SPSRModel.optimize_parameters`` runs one step, so that ``launch/bench_train.py
--vs-reference`` measures what our trainer adds or saves around the same maths:

* gradient maps as the public code computes them: per channel, two ``F.conv2d`` with fixed
  1×1×3×3 stencils, then ``sqrt(v² + h² + 1e-6)`` and a concat (padding 1 on LR and HR for the
  branch, padding 2 on SR and HR for the gradient losses; the "ref" maps computed again, as
  there);
* the generator step with both discriminators frozen (``requires_grad = False``), D(fake) and
  D(real).detach() as separate forwards, one backward; then each D with its real and fake
  forwards and one backward, the gradient D on the padded SR maps of the G step;
* ``torch.optim.Adam`` with its defaults (no fused kernel), no DeepSpeed, no compile,
  default memory format; a host sync per logged loss (``.item()``), as there.

The modules are deep copies of a :class:`~spsr_hpc.train.trainer.Trainer`'s networks (same
architecture, same initial weights), with the generator's fused LR gradient map replaced by the
per-channel convolutions. Its losses and parameters after a few steps equal the trainer's within
fp32 tolerance (``tests/test_train_speed.py``), which is also the independent check of our step.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spsr_hpc.models.spsr import GRADIENT_KERNEL_H, GRADIENT_KERNEL_V


class PerChannelGradient(nn.Module):
    """Gradient map (docs/method.md §1) the way the public code computes it: per channel, conv2d.

    x: (B, C, H, W) -> (B, C, H, W) (padding 1) or (B, C, H+2, W+2) (padding 2).
    """

    def __init__(self, padding: int) -> None:
        super().__init__()
        if padding not in (1, 2):
            raise ValueError(f"PerChannelGradient: padding must be 1 or 2, got {padding!r}")
        self.padding = padding
        self.register_buffer("weight_v", GRADIENT_KERNEL_V.clone(), persistent=False)
        self.register_buffer("weight_h", GRADIENT_KERNEL_H.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = []
        for c in range(x.shape[1]):
            xc = x[:, c].unsqueeze(1)
            v = F.conv2d(xc, self.weight_v.to(x.dtype), padding=self.padding)
            h = F.conv2d(xc, self.weight_h.to(x.dtype), padding=self.padding)
            maps.append(torch.sqrt(torch.pow(v, 2) + torch.pow(h, 2) + 1e-6))
        return torch.cat(maps, dim=1)


def _bce(logits: torch.Tensor, target: bool) -> torch.Tensor:
    """The public GANLoss for "vanilla" (what it uses under RaGAN): BCE-with-logits."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(target)))


class ReferenceSPSRStep:
    """One SPSR-G step with the public code's structure on copies of a trainer's networks.

    Args:
        generator: an SPSRGenerator (copied; its ``get_g_nopadding`` becomes per-channel convs).
        d_image, d_gradient: the two VGG discriminators (copied).
        vgg_features: the perceptual VGG19 ``features[:35]`` (copied, frozen).
        weights: loss weights {"pixel", "perceptual", "image_gan", "gradient_pixel",
            "gradient_gan", "branch_pixel"}.
        lr_g, lr_d, betas, eps: Adam settings (torch defaults otherwise).
    """

    def __init__(
        self,
        generator: nn.Module,
        d_image: nn.Module,
        d_gradient: nn.Module,
        vgg_features: nn.Module,
        weights: dict[str, float],
        *,
        lr_g: float = 1e-4,
        lr_d: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        expected = {"pixel", "perceptual", "image_gan", "gradient_pixel", "gradient_gan", "branch_pixel"}
        if set(weights) != expected:
            raise ValueError(
                f"ReferenceSPSRStep: weights must have exactly the SPSR-G terms {sorted(expected)}, "
                f"got {sorted(weights)}"
            )
        self.w = dict(weights)
        self.net_g = copy.deepcopy(generator)
        self.net_g.get_g_nopadding = PerChannelGradient(padding=1)
        self.net_d = copy.deepcopy(d_image)
        self.net_d_grad = copy.deepcopy(d_gradient)
        self.net_f = copy.deepcopy(vgg_features).eval()
        for p in self.net_f.parameters():
            p.requires_grad = False
        device = next(self.net_g.parameters()).device
        self.mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
        for net in (self.net_g, self.net_d, self.net_d_grad):
            net.train()
            for p in net.parameters():
                p.requires_grad = True
        self.get_grad = PerChannelGradient(padding=2).to(device)
        self.get_grad_nopadding = PerChannelGradient(padding=1).to(device)
        self.opt_g = torch.optim.Adam(self.net_g.parameters(), lr=lr_g, betas=betas, eps=eps)
        self.opt_d = torch.optim.Adam(self.net_d.parameters(), lr=lr_d, betas=betas, eps=eps)
        self.opt_d_grad = torch.optim.Adam(self.net_d_grad.parameters(), lr=lr_d, betas=betas, eps=eps)

    @classmethod
    def from_trainer(cls, trainer: Any) -> ReferenceSPSRStep:
        """Copies of an SPSR-G trainer's networks and settings (call before it trains)."""
        cfg = trainer.cfg
        if set(trainer.d_engines) != {"image", "gradient"} or cfg.loss.method != "spsr_g":
            raise ValueError(
                "ReferenceSPSRStep mirrors the public SPSR-G step: it needs loss.method=spsr_g with an "
                f"image and a gradient discriminator, got method {cfg.loss.method!r} with "
                f"{sorted(trainer.d_engines)}"
            )
        weights = dict(trainer.objective.weights)
        o = cfg.optim
        return cls(
            trainer.g_engine.module,
            trainer.d_engines["image"].module,
            trainer.d_engines["gradient"].module,
            trainer.objective.perceptual.features,
            weights,
            lr_g=o.lr_g,
            lr_d=o.lr_d,
            betas=tuple(o.betas),
            eps=o.eps,
        )

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net_f((x - self.mean) / self.std)

    def step(self, lr: torch.Tensor, hr: torch.Tensor) -> dict[str, float]:
        """One G step then one step of each D on a batch; returns the logged losses."""
        w = self.w
        for p in self.net_d.parameters():
            p.requires_grad = False
        for p in self.net_d_grad.parameters():
            p.requires_grad = False
        self.opt_g.zero_grad()
        out = self.net_g(lr)  # ours is (sr, grad_sr, grad_lr); the public net returns (branch, sr, grad_lr)
        fake, fake_branch = out.sr, out.grad_sr
        fake_grad = self.get_grad(fake)
        hr_grad = self.get_grad(hr)
        ref_grad = self.get_grad(hr)  # the public code's separate "ref" input (here the HR)
        hr_grad_nopadding = self.get_grad_nopadding(hr)

        l_pix = w["pixel"] * F.l1_loss(fake, hr)
        real_fea = self._features(hr).detach()
        l_fea = w["perceptual"] * F.l1_loss(self._features(fake), real_fea)
        l_pix_grad = w["gradient_pixel"] * F.mse_loss(fake_grad, hr_grad)
        l_branch = w["branch_pixel"] * F.l1_loss(fake_branch, hr_grad_nopadding)
        pred_g_fake = self.net_d(fake)
        pred_d_real = self.net_d(hr).detach()
        l_gan = w["image_gan"] * (
            _bce(pred_d_real - torch.mean(pred_g_fake), False)
            + _bce(pred_g_fake - torch.mean(pred_d_real), True)
        ) / 2
        pred_g_fake_grad = self.net_d_grad(fake_grad)
        pred_d_real_grad = self.net_d_grad(ref_grad).detach()
        l_gan_grad = w["gradient_gan"] * (
            _bce(pred_d_real_grad - torch.mean(pred_g_fake_grad), False)
            + _bce(pred_g_fake_grad - torch.mean(pred_d_real_grad), True)
        ) / 2
        l_g_total = l_pix + l_fea + l_pix_grad + l_branch + l_gan + l_gan_grad
        l_g_total.backward()
        self.opt_g.step()

        d_losses = {}
        for name, net, opt, real_in, fake_in in (
            ("image", self.net_d, self.opt_d, hr, fake),
            ("gradient", self.net_d_grad, self.opt_d_grad, ref_grad, fake_grad),
        ):
            for p in net.parameters():
                p.requires_grad = True
            opt.zero_grad()
            pred_real = net(real_in)
            pred_fake = net(fake_in.detach())
            l_real = _bce(pred_real - torch.mean(pred_fake), True)
            l_fake = _bce(pred_fake - torch.mean(pred_real), False)
            l_d = (l_real + l_fake) / 2
            l_d.backward()
            opt.step()
            d_losses[name] = l_d
        out = {
            "g/pixel": l_pix.item(),
            "g/perceptual": l_fea.item(),
            "g/image_gan": l_gan.item(),
            "g/gradient_pixel": l_pix_grad.item(),
            "g/gradient_gan": l_gan_grad.item(),
            "g/branch_pixel": l_branch.item(),
            "g_total": l_g_total.item(),
        }
        out.update({f"d_{n}/d_loss": v.item() for n, v in d_losses.items()})
        return out


__all__ = ["PerChannelGradient", "ReferenceSPSRStep"]
