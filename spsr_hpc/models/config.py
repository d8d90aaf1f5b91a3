"""Typed config sections for the networks and the functions that build them.

Plain dataclasses (ints, floats, strs, bools, lists, Optional) so the run config can nest
them and load them from YAML; ``__post_init__`` validates and raises ValueError naming the
field. Defaults are docs/method.md values.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from spsr_hpc.distributed import is_main_process
from spsr_hpc.models.loading import load_pretrained
from spsr_hpc.models.nse import NSE, ContextPredictor, JigsawClassifier
from spsr_hpc.models.registry import DISCRIMINATORS, GENERATORS

log = logging.getLogger(__name__)


def _positive_int(section: str, name: str, value: object, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{section}.{name} must be a positive int, got {value!r}")


# Published defaults per generator when nf/nb are left None.
_GENERATOR_DEFAULTS = {"spsr": (64, 23), "rrdbnet": (64, 23), "edsr": (64, 16), "srresnet": (64, 16)}


@dataclass
class GeneratorConfig:
    """Generator section (`model.generator` in a run config)."""

    name: str = "spsr"
    """One of GENERATORS: "spsr" (SPSR-G), "rrdbnet" (ESRGAN/RRDB), "edsr", "srresnet"."""
    in_ch: int = 3
    """Input image channels."""
    out_ch: int = 3
    """Output image channels."""
    nf: int | None = None
    """Feature width; None = the published value (64 for all; EDSR-large uses 256)."""
    nb: int | None = None
    """Blocks; None = the published value (23 RRDBs for spsr/rrdbnet, 16 for edsr/srresnet)."""
    gc: int = 32
    """Dense-block growth channels (spsr, rrdbnet)."""
    scale: int = 4
    """Upscaling factor: 2, 3, 4 or 8."""
    taps: list[int] = field(default_factory=lambda: [4, 9, 14, 19])
    """spsr only: trunk RRDB indices feeding the gradient branch (strictly increasing, < nb)."""
    res_scale: float = 1.0
    """edsr only: residual scaling (1.0 baseline, 0.1 for the large 32×256 model)."""
    init_scale: float = 0.1
    """spsr, rrdbnet: fresh convs are kaiming-normal × init_scale. 0.1 is the public code's choice
    for 23-block nets (keeps the deep residual stack stable); tiny nets (nb ≤ 4) learn several
    times faster with 1.0."""
    pretrained: str | None = None
    """Checkpoint loaded by build_generator (SPSR, ESRGAN old/new, or our export); None = fresh."""
    fusion_init: str = "fresh"
    """spsr only: "fresh" (the paper: kaiming-normal × init_scale) or "passthrough" (ours, for short
    runs): with an RRDB `pretrained`, the fusion starts as a pass-through of the trunk ending in
    that RRDB's RGB conv, so SR starts at (nearly) the PSNR model's output
    (SPSRGenerator.init_fusion_passthrough)."""
    strict_load: bool = True
    """Refuse a checkpoint that leaves model keys unloaded (beyond SPSR's by-design fresh layers)."""

    def __post_init__(self) -> None:
        if self.name not in GENERATORS:
            raise ValueError(f"generator.name={self.name!r} is not one of {sorted(GENERATORS)}")
        for name in ("in_ch", "out_ch", "gc", "scale"):
            _positive_int("generator", name, getattr(self, name))
        for name in ("nf", "nb"):
            _positive_int("generator", name, getattr(self, name), optional=True)
        if not self.init_scale > 0:
            raise ValueError(f"generator.init_scale={self.init_scale} must be > 0")
        if self.scale not in (2, 3, 4, 8):
            raise ValueError(f"generator.scale={self.scale} is not supported; use 2, 3, 4 or 8")
        self.taps = list(self.taps)
        nb = self.resolved()[1]
        if self.name == "spsr" and (
            not self.taps or self.taps != sorted(set(self.taps)) or self.taps[0] < 0 or self.taps[-1] >= nb
        ):
            raise ValueError(
                f"generator.taps={self.taps} must be strictly increasing RRDB indices "
                f"in [0, {nb - 1}] for nb={nb}"
            )
        if self.fusion_init not in ("fresh", "passthrough"):
            raise ValueError(f"generator.fusion_init={self.fusion_init!r} is not 'fresh' or 'passthrough'")
        if self.fusion_init == "passthrough" and (self.name != "spsr" or not self.pretrained):
            raise ValueError(
                "generator.fusion_init=passthrough needs generator.name=spsr and generator.pretrained set to "
                f"a PSNR RRDB checkpoint (got name={self.name!r}, pretrained={self.pretrained!r})"
            )
        if not (isinstance(self.res_scale, (int, float)) and self.res_scale > 0):
            raise ValueError(f"generator.res_scale must be > 0, got {self.res_scale!r}")

    def resolved(self) -> tuple[int, int]:
        """(nf, nb) with None replaced by the generator's published default."""
        nf0, nb0 = _GENERATOR_DEFAULTS[self.name]
        return (self.nf if self.nf is not None else nf0, self.nb if self.nb is not None else nb0)


# How a run *starts* (initialisation, what it loads), not what a trained generator *is*: building a
# model from an export's metadata ignores them, so e.g. an SPSR trained from
# fusion_init=passthrough loads without its (long gone) `pretrained` file.
TRAINING_ONLY_FIELDS = ("pretrained", "fusion_init", "strict_load", "init_scale")


def generator_config_from_export(fields: dict) -> GeneratorConfig:
    """The architecture a trained export's ``generator`` metadata describes (a GeneratorConfig dict).

    TRAINING_ONLY_FIELDS are reset to their defaults (they decided the start, not the layout);
    keys this version does not know are dropped with a warning (a layout they changed then shows up
    as a checkpoint mismatch naming the keys). Raises ValueError for invalid architecture values.
    """
    if not isinstance(fields, dict):
        raise ValueError(f"expected a mapping of generator fields, got {type(fields).__name__}")
    known = {f.name for f in dataclasses.fields(GeneratorConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        log.warning("export metadata: ignoring generator fields this version does not know: %s", unknown)
    return GeneratorConfig(
        **{k: v for k, v in fields.items() if k in known and k not in TRAINING_ONLY_FIELDS}
    )


def build_generator(cfg: GeneratorConfig) -> nn.Module:
    """Instantiate the configured generator (and load `cfg.pretrained`, logging the report on rank 0)."""
    nf, nb = cfg.resolved()
    common = {"in_ch": cfg.in_ch, "out_ch": cfg.out_ch, "nf": nf, "nb": nb, "scale": cfg.scale}
    if cfg.name == "spsr":
        model = GENERATORS["spsr"](gc=cfg.gc, taps=tuple(cfg.taps), init_scale=cfg.init_scale, **common)
    elif cfg.name == "rrdbnet":
        model = GENERATORS["rrdbnet"](gc=cfg.gc, init_scale=cfg.init_scale, **common)
    elif cfg.name == "edsr":
        model = GENERATORS["edsr"](res_scale=float(cfg.res_scale), **common)
    else:
        model = GENERATORS[cfg.name](**common)
    if cfg.pretrained:
        report = load_pretrained(model, cfg.pretrained, strict=cfg.strict_load)
        if is_main_process():
            log.info("generator: %s", report)
        if cfg.fusion_init == "passthrough":
            _passthrough_from(model, cfg.pretrained, report)
    return model


def _passthrough_from(model: nn.Module, path: str, report: object) -> None:
    """Initialise `model`'s fusion from the RGB conv of the RRDB checkpoint at `path`."""
    from spsr_hpc.models.loading import esrgan_new_to_old, is_esrgan_new, read_state_dict

    sd = read_state_dict(path)[0]
    if is_esrgan_new(sd):
        sd = esrgan_new_to_old(sd)
    last = f"model.{len(model.model)}."  # the RRDB's nf→RGB conv (model.10 at ×4)
    if f"{last}weight" not in sd:
        raise ValueError(
            f"generator.fusion_init=passthrough: {path} has no RGB conv {last}weight; it must be a PSNR "
            f"RRDB checkpoint (ESRGAN format or an rrdbnet export), not {getattr(report, 'format', '?')}"
        )
    model.init_fusion_passthrough(sd[f"{last}weight"].float(), sd[f"{last}bias"].float())


@dataclass
class DiscriminatorConfig:
    """One discriminator section (image, gradient or structure D)."""

    name: str = "vgg128"
    """One of DISCRIMINATORS: "vgg128" (image and gradient D) or "structure" (on NSE features)."""
    in_ch: int | None = None
    """Input channels; None = 3 for vgg128, 32 (the NSE dimension) for structure."""
    nf: int = 64
    """Base width."""
    input_size: int | None = None
    """Spatial input size; None = 128 for vgg128 (130 gradient maps also fit), 32 for structure."""
    stages: int | None = None
    """structure only: stride-2 stages (1-3); None = as many as bring the map to 4×4 (32 → 3, 8 → 1)."""
    sync_bn: bool = False
    """true: BatchNorm statistics over the global batch (all data-parallel ranks; a no-op on one
    rank), so N ranks x b train like 1 x N·b. false (default): per-rank statistics, what the public
    code does (DataParallel: per GPU)."""

    def __post_init__(self) -> None:
        if not isinstance(self.sync_bn, bool):
            raise ValueError(f"discriminator.sync_bn must be true or false, got {self.sync_bn!r}")
        if self.name not in DISCRIMINATORS:
            raise ValueError(f"discriminator.name={self.name!r} is not one of {sorted(DISCRIMINATORS)}")
        _positive_int("discriminator", "in_ch", self.in_ch, optional=True)
        _positive_int("discriminator", "nf", self.nf)
        _positive_int("discriminator", "input_size", self.input_size, optional=True)
        if self.stages is not None and (self.name != "structure" or self.stages not in (1, 2, 3)):
            raise ValueError(
                f"discriminator.stages={self.stages!r}: only the structure D takes it, as 1, 2 or 3 "
                "(null: auto)"
            )


def build_discriminator(cfg: DiscriminatorConfig) -> nn.Module:
    """Instantiate the configured discriminator."""
    in_ch = cfg.in_ch if cfg.in_ch is not None else (3 if cfg.name == "vgg128" else 32)
    size = cfg.input_size if cfg.input_size is not None else (128 if cfg.name == "vgg128" else 32)
    extra = {"stages": cfg.stages} if cfg.name == "structure" else {}
    return DISCRIMINATORS[cfg.name](in_ch=in_ch, nf=cfg.nf, input_size=size, sync_bn=cfg.sync_bn, **extra)


@dataclass
class NSEConfig:
    """NSE section: the extractor and its pretraining heads."""

    in_ch: int = 3
    """Image channels."""
    width: int = 64
    """Channels of the stride-2 stage."""
    out_dim: int = 32
    """Feature dimension d (paper: 32)."""
    pretrained: str | None = None
    """NSE weights (our export) loaded by build_nse, strictly; SPSR-P/-J training needs them
    (or random_init)."""
    random_init: bool = False
    """SPSR-R (paper Table VI): no weights file; a randomly initialised NSE seeded by
    random_seed, then frozen like a pretrained one. Excludes `pretrained`."""
    random_seed: int = 0
    """Seed of the random_init NSE (independent of the global RNG; recorded in the run config)."""
    predictor_hidden: int = 256
    """ContextPredictor hidden width."""
    predictor_layers: int = 3
    """ContextPredictor Linear layers."""
    jigsaw_hidden: int = 512
    """JigsawClassifier hidden width."""
    jigsaw_classes: int = 24
    """Permutations of the 2×2 jigsaw."""

    def __post_init__(self) -> None:
        for name in (
            "in_ch",
            "width",
            "out_dim",
            "predictor_hidden",
            "predictor_layers",
            "jigsaw_hidden",
            "jigsaw_classes",
        ):
            _positive_int("nse", name, getattr(self, name))
        if self.random_init and self.pretrained:
            raise ValueError(
                f"nse.random_init=true (SPSR-R) and nse.pretrained={self.pretrained!r} exclude each other; "
                "set nse.pretrained=null for a random NSE or nse.random_init=false to load the file"
            )
        seed = self.random_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"nse.random_seed must be an int >= 0, got {self.random_seed!r}")


def build_nse(cfg: NSEConfig) -> NSE:
    """Instantiate the NSE (and load `cfg.pretrained` strictly, logging the report on rank 0).

    With cfg.random_init the weights are drawn from a generator seeded by cfg.random_seed
    alone (the global RNG is neither used nor advanced): every rank and every rerun gets the
    same random NSE.
    """
    if cfg.random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.random_seed)
            nse = NSE(in_ch=cfg.in_ch, width=cfg.width, out_dim=cfg.out_dim)
        if is_main_process():
            log.info("nse: random init (SPSR-R), seed %d", cfg.random_seed)
        return nse
    nse = NSE(in_ch=cfg.in_ch, width=cfg.width, out_dim=cfg.out_dim)
    if cfg.pretrained:
        report = load_pretrained(nse, cfg.pretrained, strict=True)
        if is_main_process():
            log.info("nse: %s", report)
    return nse


def build_structure_extractor(
    name: str, nse_cfg: NSEConfig, weights: str | None = None, *, random_weights: bool = False
) -> nn.Module:
    """The frozen-to-be feature extractor of the structure losses (``model.structure_extractor``).

    "nse": build_nse(nse_cfg) (pretrained or SPSR-R's random NSE); "vgg19" / "vgg16" / "resnet18":
    an ImageNetExtractor reading `weights` (None: spsr_hpc.weights' lookup; a missing file raises
    MissingWeightsError naming it), or random weights for tests when `random_weights`.
    """
    from spsr_hpc.models.extractors import EXTRACTORS, ImageNetExtractor

    if name not in EXTRACTORS:
        raise ValueError(f"model.structure_extractor={name!r} is not one of {EXTRACTORS}")
    if name == "nse":
        return build_nse(nse_cfg)
    extractor = ImageNetExtractor(name, weights, random_weights=random_weights)
    if is_main_process():
        log.info("%s", extractor.summary())
    return extractor


def build_context_predictor(cfg: NSEConfig, num_context: int) -> ContextPredictor:
    """A ContextPredictor for a strategy with `num_context` context vectors (2 for h/v, 4 for c)."""
    return ContextPredictor(
        dim=cfg.out_dim, num_context=num_context, hidden=cfg.predictor_hidden, layers=cfg.predictor_layers
    )


def build_jigsaw_classifier(cfg: NSEConfig) -> JigsawClassifier:
    return JigsawClassifier(dim=cfg.out_dim, hidden=cfg.jigsaw_hidden, num_classes=cfg.jigsaw_classes)
