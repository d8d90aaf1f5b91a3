"""The composite training objective of every method and ablation (docs/method.md §4).

    obj = SRObjective(LossConfig(method="spsr_g"), perceptual=PerceptualLoss(...), nse=None)
    total, terms = obj.generator_loss(out, hr, {"image": d_img, "gradient": d_grad})
    total, terms = obj.discriminator_loss("image", out, hr, d_img)

Terms per method (before ablations; a term whose weight is 0 is dropped as well):

    psnr     pixel (weight 1)
    esrgan   pixel, perceptual, image_gan                                       D: image
    spsr_g   pixel, perceptual, image_gan, gradient_pixel, gradient_gan,
             branch_pixel                                                       D: image, gradient
    spsr_p/j pixel, perceptual, branch_pixel, structure_pixel, structure_gan   D: structure
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import nn

from spsr_hpc.losses.gan import GAN_LOSSES
from spsr_hpc.losses.gradient import branch_pixel_loss, padded_gradient
from spsr_hpc.losses.perceptual import PerceptualLoss
from spsr_hpc.losses.pixel import CRITERIA, pixel_loss
from spsr_hpc.losses.structure import DISTANCES, freeze_, structure_distance
from spsr_hpc.models.blocks import SROutput

METHODS = ("psnr", "esrgan", "spsr_g", "spsr_p", "spsr_j")
TERMS = (
    "pixel",
    "perceptual",
    "image_gan",
    "gradient_pixel",
    "gradient_gan",
    "branch_pixel",
    "structure_pixel",
    "structure_gan",
)
_METHOD_TERMS = {
    "psnr": ("pixel",),
    "esrgan": ("pixel", "perceptual", "image_gan"),
    "spsr_g": ("pixel", "perceptual", "image_gan", "gradient_pixel", "gradient_gan", "branch_pixel"),
    "spsr_p": ("pixel", "perceptual", "branch_pixel", "structure_pixel", "structure_gan"),
    "spsr_j": ("pixel", "perceptual", "branch_pixel", "structure_pixel", "structure_gan"),
}
# Ablation switch -> (methods it applies to, terms it removes).
_ABLATIONS = {
    "no_gradient_branch": (("spsr_g", "spsr_p", "spsr_j"), ("branch_pixel",)),
    "no_gradient_loss": (("spsr_g",), ("gradient_pixel", "gradient_gan")),
    "no_gradient_gan": (("spsr_g",), ("gradient_gan",)),
    "no_gradient_pixel": (("spsr_g",), ("gradient_pixel",)),
    "no_structure_loss": (("spsr_p", "spsr_j"), ("structure_pixel", "structure_gan")),
    "no_structure_gan": (("spsr_p", "spsr_j"), ("structure_gan",)),
    "no_structure_pixel": (("spsr_p", "spsr_j"), ("structure_pixel",)),
}
# Which discriminator a GAN term needs.
_GAN_TERM_D = {"image_gan": "image", "gradient_gan": "gradient", "structure_gan": "structure"}


@dataclass
class LossConfig:
    """Loss section (`loss` in a run config). Weights default to docs/method.md §4."""

    method: str = "spsr_g"
    """"psnr" (PSNR-oriented RRDB), "esrgan", "spsr_g", "spsr_p" or "spsr_j"."""
    pixel_criterion: str = "l1"
    """Image pixel loss: "l1" (the paper) or "l2"."""
    gan_type: str = "ragan"
    """"ragan" (relativistic average, what the public code runs) or "vanilla"."""
    structure_distance: str = "l1"
    """Structure pixel distance between NSE(SR) and NSE(HR): "l1", "l2" or "cosine" (ours)."""
    pixel_weight: float | None = None
    """Image pixel weight; None = 1.0 for psnr, 1e-2 otherwise."""
    perceptual_weight: float = 1.0
    """VGG19 conv5_4 L1 weight."""
    image_gan_weight: float = 5e-3
    """Image RaGAN weight."""
    gradient_pixel_weight: float = 1e-2
    """MSE between padded gradient maps of SR and HR."""
    gradient_gan_weight: float = 5e-3
    """RaGAN on the gradient D (padded maps)."""
    branch_pixel_weight: float = 0.5
    """L1 between the branch output and the same-size gradient map of HR."""
    structure_pixel_weight: float = 1e-2
    """Structure distance weight (SPSR-P/-J, ours)."""
    structure_gan_weight: float = 5e-3
    """RaGAN on the structure D (SPSR-P/-J, ours)."""
    no_gradient_branch: bool = False
    """Ablation: generator without gradient branch (no branch pixel loss; use a backbone generator)."""
    no_gradient_loss: bool = False
    """Ablation (spsr_g): neither gradient pixel nor gradient GAN."""
    no_gradient_gan: bool = False
    """Ablation (spsr_g): no gradient GAN (and no gradient D)."""
    no_gradient_pixel: bool = False
    """Ablation (spsr_g): no gradient pixel loss."""
    no_structure_loss: bool = False
    """Ablation (spsr_p/j): neither structure pixel nor structure GAN."""
    no_structure_gan: bool = False
    """Ablation (spsr_p/j): no structure GAN (and no structure D)."""
    no_structure_pixel: bool = False
    """Ablation (spsr_p/j): no structure pixel loss."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"loss.method={self.method!r} is not one of {METHODS}")
        if self.pixel_criterion not in CRITERIA:
            raise ValueError(f"loss.pixel_criterion={self.pixel_criterion!r} is not one of {CRITERIA}")
        if self.gan_type not in GAN_LOSSES:
            raise ValueError(f"loss.gan_type={self.gan_type!r} is not one of {tuple(GAN_LOSSES)}")
        if self.structure_distance not in DISTANCES:
            raise ValueError(f"loss.structure_distance={self.structure_distance!r} is not one of {DISTANCES}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_weight"):
                if value is None and f.name == "pixel_weight":
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise ValueError(f"loss.{f.name} must be a number >= 0, got {value!r}")
            elif f.name.startswith("no_"):
                if not isinstance(value, bool):
                    raise ValueError(f"loss.{f.name} must be true or false, got {value!r}")
                methods = _ABLATIONS[f.name][0]
                if value and self.method not in methods:
                    raise ValueError(
                        f"loss.{f.name}=true does not apply to method {self.method!r}; it is an ablation of "
                        f"{' / '.join(methods)}"
                    )

    def weight(self, term: str) -> float:
        """The weight of `term` for this method (pixel: 1 for psnr, 1e-2 otherwise unless set)."""
        if term not in TERMS:
            raise ValueError(f"unknown loss term {term!r}; expected one of {TERMS}")
        if term == "pixel" and self.pixel_weight is None:
            return 1.0 if self.method == "psnr" else 1e-2
        return float(getattr(self, f"{term}_weight"))

    def active_terms(self) -> tuple[str, ...]:
        """The generator terms this method/ablation computes, in TERMS order."""
        terms = list(_METHOD_TERMS[self.method])
        for switch, (_, removes) in _ABLATIONS.items():
            if getattr(self, switch):
                terms = [t for t in terms if t not in removes]
        return tuple(t for t in TERMS if t in terms and self.weight(t) > 0)

    def discriminator_names(self) -> tuple[str, ...]:
        """Discriminators the method trains, e.g. ("image", "gradient") for spsr_g."""
        return tuple(_GAN_TERM_D[t] for t in self.active_terms() if t in _GAN_TERM_D)

    def needs_perceptual(self) -> bool:
        return "perceptual" in self.active_terms()

    def needs_nse(self) -> bool:
        return any(t.startswith("structure") for t in self.active_terms())

    def needs_gradient_branch(self) -> bool:
        return "branch_pixel" in self.active_terms()


DiscriminatorFn = Callable[[torch.Tensor], torch.Tensor]


class DInputs(NamedTuple):
    """What ``generator_loss(d_inputs=...)`` records per discriminator for ``discriminator_loss``.

    real, fake: the D inputs (no graph; fake detached from G).
    real_logits: D(real) with its graph into D's parameters when ``generator_loss`` computed it
        with a trainable D (``d_real``), else None (``discriminator_loss`` runs D(real) itself).
    fake_logits: D(fake) likewise, when ``generator_loss`` computed it with a trainable D
        (``d_fake``) on a detached copy of the fake input, else None.
    """

    real: torch.Tensor
    fake: torch.Tensor
    real_logits: torch.Tensor | None = None
    fake_logits: torch.Tensor | None = None


class SRObjective(nn.Module):
    """Generator and discriminator losses for one method/ablation (see module docstring).

    Args:
        cfg: the LossConfig.
        perceptual: a PerceptualLoss, required when the perceptual term is active.
        nse: the structure extractor, required for the structure terms: a pretrained (or SPSR-R
            random) NSE, or an ImageNet VGG/ResNet extractor (``model.structure_extractor``,
            spsr_hpc.models.extractors); frozen here (requires_grad False, eval mode, kept in
            eval by `train()`).

    The returned `terms` dicts hold detached 0-dim fp32 tensors; generator terms are the
    *weighted* values, so they sum to the total.
    """

    def __init__(
        self, cfg: LossConfig, perceptual: PerceptualLoss | None = None, nse: nn.Module | None = None
    ):
        super().__init__()
        if not isinstance(cfg, LossConfig):
            raise TypeError(f"SRObjective: cfg must be a LossConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.terms = cfg.active_terms()
        self.weights = {t: cfg.weight(t) for t in self.terms}
        if cfg.needs_perceptual() and perceptual is None:
            raise ValueError(
                f"SRObjective: method {cfg.method!r} uses the perceptual loss; "
                "pass perceptual=PerceptualLoss(...) "
                "or set loss.perceptual_weight=0"
            )
        if cfg.needs_nse() and nse is None:
            raise ValueError(
                f"SRObjective: method {cfg.method!r} uses structure losses; pass nse=<pretrained NSE> "
                "(model.nse.pretrained) or set loss.no_structure_loss=true"
            )
        self.perceptual = perceptual if cfg.needs_perceptual() else None
        self.nse = freeze_(nse) if (nse is not None and cfg.needs_nse()) else None
        self._d_loss, self._g_loss = GAN_LOSSES[cfg.gan_type]

    @property
    def discriminator_names(self) -> tuple[str, ...]:
        return self.cfg.discriminator_names()

    def train(self, mode: bool = True) -> SRObjective:
        super().train(mode)
        for frozen in (self.perceptual, self.nse):
            if frozen is not None:
                frozen.eval()
        return self

    # -- helpers -------------------------------------------------------------------------
    def _d_inputs(self, name: str, sr: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(real input, fake input) of discriminator `name`; the real one without a graph."""
        with torch.no_grad():
            if name == "image":
                real = hr
            elif name == "gradient":
                real = padded_gradient(hr)
            else:
                real = self.nse(hr)
        if name == "image":
            fake = sr
        elif name == "gradient":
            fake = padded_gradient(sr)
        else:
            fake = self.nse(sr)
        return real, fake

    def _gan_g(
        self,
        d: DiscriminatorFn,
        real_in: torch.Tensor,
        fake_in: torch.Tensor,
        weight: float,
        d_real: DiscriminatorFn | None = None,
        d_fake: DiscriminatorFn | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(weighted G adversarial term for the total, its detached value, D(real) and D(fake)
        with their graphs into D or None).

        RaGAN reads D(real) as a constant. With ``d_real`` (the same D, trainable) it is computed
        once with its graph, for the D step to reuse; without, by the frozen D under no_grad.
        Either way after D(fake), the order the public code runs the two forwards in.

        With ``d_fake`` (the same D, trainable), D(fake) runs once too, on a detached leaf copy of
        ``fake_in``, with its graph into D for the D step. G's gradient through it is taken right
        away (``torch.autograd.grad`` to the leaf only: D's data-gradient chain, what G's backward
        through the frozen D computes) and handed to G's graph by a surrogate whose value is 0
        and whose gradient with respect to ``fake_in`` is that gradient; the term's value is the
        loss's own.
        """
        leaf = None
        if d_fake is not None:
            leaf = fake_in.detach().requires_grad_(True)
            fake = fake_graph = d_fake(leaf)
        else:
            fake, fake_graph = d(fake_in), None
        real_graph = None
        if self.cfg.gan_type != "ragan":
            real = None
        elif d_real is not None:
            real_graph = d_real(real_in)
            real = real_graph.detach()
        else:
            with torch.no_grad():
                real = d(real_in)
        term = weight * self._g_loss(real, fake)
        if leaf is None:
            return term, term.detach(), real_graph, fake_graph
        # G's backward runs outside autocast; so does this part of it.
        with torch.autocast(leaf.device.type, enabled=False):
            (grad,) = torch.autograd.grad(term, leaf, retain_graph=True)
        # fp32 products: the gradient of the sum is exactly ``grad`` (times G's loss scale).
        surrogate = (fake_in.float() * grad.float()).sum()
        value = term.detach()
        return value + (surrogate - surrogate.detach()), value, real_graph, fake_graph

    @staticmethod
    def _check_pair(out: SROutput, hr: torch.Tensor) -> None:
        if not isinstance(out, SROutput):
            raise TypeError(f"SRObjective: out must be an SROutput, got {type(out).__name__}")
        if out.sr.shape != hr.shape:
            raise ValueError(f"SRObjective: SR {tuple(out.sr.shape)} and HR {tuple(hr.shape)} differ")

    # -- losses --------------------------------------------------------------------------
    def generator_loss(
        self,
        out: SROutput,
        hr: torch.Tensor,
        discriminators: Mapping[str, DiscriminatorFn] | None = None,
        *,
        d_inputs: dict[str, DInputs] | None = None,
        d_real: Mapping[str, DiscriminatorFn] | None = None,
        d_fake: Mapping[str, DiscriminatorFn] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted sum of the active generator terms.

        out: the generator's SROutput (sr (B, 3, H, W); grad_sr needed for branch_pixel).
        hr: (B, 3, H, W) float in [0, 1].
        discriminators: name -> callable returning logits, for every name in
            `discriminator_names` (frozen: the caller sets requires_grad_(False)).
        d_inputs: optional dict, filled with name -> DInputs (real input, detached fake input) of
            every discriminator evaluated here (e.g. the padded gradient maps), for
            ``discriminator_loss(..., inputs=d_inputs[name])`` to reuse instead of recomputing.
        d_real: optional name -> the same discriminator with trainable parameters (needs
            d_inputs). With RaGAN, D(real) is then computed once, with its graph into D, and
            kept in ``d_inputs[name].real_logits`` for the D step: one D forward per
            discriminator and step fewer. The values are those of two separate forwards (D's
            parameters do not change in between; BatchNorm normalises with the batch's own
            statistics in training mode); the caller owns what else the second forward changed
            (the BatchNorm running averages, see ``spsr_hpc.train.trainer``).
        d_fake: optional name -> the same discriminator with trainable parameters (needs
            d_inputs). D(fake) is then computed once, on a detached copy of the fake input, with
            its graph into D, and kept in ``d_inputs[name].fake_logits`` for the D step; G's
            gradient through it is taken here (see ``_gan_g``). Another D forward fewer per
            discriminator and step; the total's value and its gradient into G are those of
            the frozen forward, the BatchNorm running averages again the caller's.
        Returns (total 0-dim fp32 tensor with graph, {term: detached weighted value}).
        """
        self._check_pair(out, hr)
        discriminators = dict(discriminators or {})
        d_real, d_fake = dict(d_real or {}), dict(d_fake or {})
        for arg, given in (("d_real", d_real), ("d_fake", d_fake)):
            if given and d_inputs is None:
                raise ValueError(
                    f"SRObjective.generator_loss: {arg} needs d_inputs "
                    "(where its logits are kept for the D step)"
                )
        absent = [n for n in self.discriminator_names if n not in discriminators]
        if absent:
            raise ValueError(
                f"SRObjective.generator_loss: method {self.cfg.method!r} needs discriminators {absent}; "
                f"got {sorted(discriminators)}"
            )
        sr, w = out.sr, self.weights
        terms: dict[str, torch.Tensor] = {}
        totals: dict[str, torch.Tensor] = {}  # where a GAN term's graph differs from its value

        def gan(term: str, name: str, real_in: torch.Tensor, fake_in: torch.Tensor) -> None:
            totals[term], terms[term], real, fake = self._gan_g(
                discriminators[name], real_in, fake_in, w[term], d_real.get(name), d_fake.get(name)
            )
            if d_inputs is not None:
                d_inputs[name] = DInputs(real_in.detach(), fake_in.detach(), real, fake)

        if "pixel" in w:
            terms["pixel"] = w["pixel"] * pixel_loss(sr, hr, self.cfg.pixel_criterion)
        if "perceptual" in w:
            terms["perceptual"] = w["perceptual"] * self.perceptual(sr, hr)
        if "image_gan" in w:
            gan("image_gan", "image", hr, sr)
        if "gradient_pixel" in w or "gradient_gan" in w:
            sr_grad = padded_gradient(sr)
            with torch.no_grad():
                hr_grad = padded_gradient(hr)
            if "gradient_pixel" in w:
                terms["gradient_pixel"] = w["gradient_pixel"] * torch.nn.functional.mse_loss(
                    sr_grad.float(), hr_grad.float()
                )
            if "gradient_gan" in w:
                gan("gradient_gan", "gradient", hr_grad, sr_grad)
        if "branch_pixel" in w:
            if out.grad_sr is None:
                raise ValueError(
                    "SRObjective: the branch pixel loss needs a generator with a gradient branch "
                    "(SROutput.grad_sr "
                    "is None); use generator 'spsr' or set loss.no_gradient_branch=true"
                )
            terms["branch_pixel"] = w["branch_pixel"] * branch_pixel_loss(out.grad_sr, hr)
        if "structure_pixel" in w or "structure_gan" in w:
            sr_feat = self.nse(sr)
            with torch.no_grad():
                hr_feat = self.nse(hr)
            if "structure_pixel" in w:
                terms["structure_pixel"] = w["structure_pixel"] * structure_distance(
                    sr_feat, hr_feat, self.cfg.structure_distance
                )
            if "structure_gan" in w:
                gan("structure_gan", "structure", hr_feat, sr_feat)
        total = torch.stack([totals.get(k, t).float() for k, t in terms.items()]).sum()
        return total, {k: v.detach().float() for k, v in terms.items()}

    def discriminator_loss(
        self,
        name: str,
        out: SROutput,
        hr: torch.Tensor,
        d: DiscriminatorFn,
        *,
        inputs: DInputs | tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of discriminator `name` ("image", "gradient" or "structure") on detached SR.

        Real and fake terms are combined into one scalar (one backward per D per step).
        inputs: the DInputs (or a (real input, fake input) pair) that
        `generator_loss(d_inputs=...)` recorded for the same out and hr, D(real) and D(fake)
        included when they were computed there; None computes them from out.sr and hr.
        Returns (loss with graph into D only, {"d_loss", "d_real", "d_fake"}) where d_real /
        d_fake are the mean logits.
        """
        if name not in self.discriminator_names:
            raise ValueError(
                f"SRObjective.discriminator_loss: {name!r} is not trained by method {self.cfg.method!r} "
                f"with these switches; active discriminators: {self.discriminator_names}"
            )
        self._check_pair(out, hr)
        real = fake = None
        if inputs is not None:
            inputs = DInputs(*inputs)
            real_in, fake_in = inputs.real.detach(), inputs.fake.detach()
            real, fake = inputs.real_logits, inputs.fake_logits
        else:
            with torch.no_grad():
                real_in, fake_in = self._d_inputs(name, out.sr.detach(), hr)
        if real is None:
            real = d(real_in)
        if fake is None:
            fake = d(fake_in)
        loss = self._d_loss(real, fake)
        return loss, {
            "d_loss": loss.detach(),
            "d_real": real.detach().float().mean(),
            "d_fake": fake.detach().float().mean(),
        }
