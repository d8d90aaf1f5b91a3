"""Typed config of NSE pretraining (configs/nse_*.yaml), loaded by spsr_hpc.config.load_config.

An NSE "epoch" is ``data.samples_per_epoch`` random crops over all ranks, by default as many
as there are training images (the source images behind the shards, from their manifest), so
that the paper's "decay every 20 epochs" counts passes over the 800 DIV2K images, not over the
~32k sub-images a 480/240 cropping makes (our reading; `resolve_epoch_length`).

Sections: ``nse`` (architecture and head sizes, spsr_hpc.models.NSEConfig), ``objective``
(method and sampling geometry), ``data`` (spsr_hpc.data DataConfig, HR-only crops), ``train``,
``optim``, ``deepspeed``, ``checkpoint``, ``logging`` (the last three shared with the SR
trainer). Defaults are the docs/method.md §6 values for contrastive prediction; configs/nse_jigsaw.yaml
sets the jigsaw ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from spsr_hpc.config import CheckpointConfig, ConfigError, DeepSpeedConfig, LoggingConfig
from spsr_hpc.data.config import DataConfig
from spsr_hpc.models import NSEConfig
from spsr_hpc.nse.sampling import STRATEGY_DIRECTIONS


@dataclass
class ObjectiveConfig:
    """What the NSE is pretrained on and how anchors are sampled."""

    method: Literal["contrastive", "jigsaw"] = "contrastive"
    """contrastive (NSE-P, InfoNCE over all positions) or jigsaw (NSE-J, 24-way permutation)."""
    strategies: list[str] = field(default_factory=lambda: ["h"])
    """Contrastive context strategy: h (two horizontal neighbours; the paper's SPSR-P NSE),
    v (two vertical) or c (four ends of a cross); the paper trains one NSE per strategy.
    Several (e.g. [h, v, c]) train one NSE with one predictor each and the losses averaged:
    an option of ours, not the paper's."""
    context_distance: int | None = None
    """Grid steps from the target to each context; null = ceil(R/stride), the closest placement
    that does not overlap the target. Smaller values are refused."""
    scale: float = 64.0
    """τ in the logits τ·cos(p, z) (paper: 64)."""
    max_anchors_per_image: int | None = None
    """null = every valid anchor of every image (contrastive: targets whose contexts lie in the
    map; jigsaw: every placement of the 2×2 grid); an int caps it with a random subset."""
    jigsaw_spacing: int | None = None
    """Grid steps between neighbouring jigsaw tiles; null = ceil(R/stride)."""
    loss_backend: Literal["auto", "triton", "torch", "naive"] = "auto"
    """InfoNCE path: auto (Triton on CUDA, chunked PyTorch on CPU), triton, torch, or naive
    (spsr_kernels.info_nce_ref, materialises the logits; for comparisons only)."""

    def validate(self) -> None:
        if not self.strategies or len(set(self.strategies)) != len(self.strategies):
            msg = f"must be a non-empty list without repeats, got {self.strategies}"
            raise ConfigError("strategies", msg)
        bad = [s for s in self.strategies if s not in STRATEGY_DIRECTIONS]
        if bad:
            raise ConfigError("strategies", f"unknown strategy {bad[0]!r}; use h, v and/or c")
        for name in ("context_distance", "max_anchors_per_image", "jigsaw_spacing"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(name, f"must be >= 1 or null, got {value}")
        if not self.scale > 0:
            raise ConfigError("scale", f"must be > 0, got {self.scale}")


@dataclass
class PretrainTrainConfig:
    """Length and batch structure of a pretraining run."""

    epochs: int = 60
    """Epochs of data.samples_per_epoch samples each (default: the number of training images;
    see resolve_epoch_length)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs; for smoke runs)."""
    global_batch: int | None = 48
    """Check: data.batch_size (per rank) × grad_accum × world size must equal it (paper: 48);
    null disables the check. On 8 GPUs use data.batch_size=6."""
    grad_accum: int = 1
    """Micro batches accumulated per optimizer step."""
    seed: int = 0
    """Seeds the initialisation and the anchor/permutation draws (per rank and step)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = False
    """Mixed precision: NSE, heads and the InfoNCE inputs under bf16 autocast (the fused
    InfoNCE accumulates its log-sum-exp in fp32), weights, gradients and the export fp32
    (docs/training.md, "Precision"). Needs a CUDA device with bf16 or a CPU with avx512_bf16/AMX."""
    collective_timeout_s: float = 600.0
    """Seconds a rank waits in one collective once training runs (as the SR trainer's
    train.collective_timeout_s; docs/cluster.md)."""
    init_timeout_s: float = 1800.0
    """Seconds for the start-up: rendezvous, engine, resume."""
    max_skip_rate: float | None = 0.01
    """Stop (exit status 6) when more than this fraction of the data samples read this session
    (all ranks) were skipped as unusable or lost in an unreadable shard, naming the shards; null:
    never stop (still logged as data/skipped/*). The SR trainer's rule."""
    skip_rate_min_samples: int = 1000
    """The skip rate is judged once this many HR crops were read (skipped + used, all ranks)."""

    def validate(self) -> None:
        if self.max_skip_rate is not None and not 0.0 <= self.max_skip_rate <= 1.0:
            raise ConfigError("max_skip_rate", f"must be in [0, 1] or null, got {self.max_skip_rate}")
        if self.skip_rate_min_samples < 0:
            raise ConfigError("skip_rate_min_samples", f"must be >= 0, got {self.skip_rate_min_samples}")
        for name in ("collective_timeout_s", "init_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"must be > 0 seconds, got {getattr(self, name)}")
        for name in ("epochs", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "global_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(name, f"must be >= 1 or null, got {value}")


@dataclass
class PretrainOptimConfig:
    """Adam with a step decay every `lr_step_epochs` epochs."""

    lr: float = 1e-3
    """paper: 1e-3 for contrastive prediction, 1e-4 for jigsaw."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    lr_step_epochs: int = 20
    """Multiply the lr by lr_gamma every this many epochs (paper: 20 contrastive, 30 jigsaw)."""
    lr_gamma: float = 0.2
    """paper: 0.2 for contrastive; the paper gives no factor for jigsaw (ours: 0.1)."""

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if self.lr_step_epochs < 1:
            raise ConfigError("lr_step_epochs", f"must be >= 1, got {self.lr_step_epochs}")
        if not 0.0 < self.lr_gamma <= 1.0:
            raise ConfigError("lr_gamma", f"must be in (0, 1], got {self.lr_gamma}")


def _default_data() -> DataConfig:
    return DataConfig(hr_only=True, hr_patch_size=400, batch_size=48)


def _default_logging() -> LoggingConfig:
    return LoggingConfig(run_dir="runs/nse_contrastive", log_every=10, image_every=0)


@dataclass
class NSEPretrainConfig:
    """Root of an NSE pretraining config (configs/nse_contrastive.yaml, configs/nse_jigsaw.yaml)."""

    nse: NSEConfig = field(default_factory=NSEConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=_default_data)
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)
    optim: PretrainOptimConfig = field(default_factory=PretrainOptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=_default_logging)

    def validate(self) -> None:
        if not self.data.hr_only:
            raise ConfigError("data.hr_only", "NSE pretraining reads HR crops only; set data.hr_only: true")
        if self.data.hr_patch % 4:
            raise ConfigError(
                "data.hr_patch_size", f"{self.data.hr_patch} is not a multiple of the NSE stride 4"
            )
        if self.train.bf16:
            from spsr_hpc.precision import bf16_unsupported

            reason = bf16_unsupported(self.train.device)
            if reason is not None:
                raise ConfigError("train.bf16", f"{reason}; set train.bf16=false")
        if self.nse.random_init:
            raise ConfigError(
                "nse.random_init",
                "is for SPSR-R training runs (a frozen random NSE); pretraining starts from a random "
                "NSE anyway (seeded by train.seed): set nse.random_init=false",
            )



def training_images(shards: str | list[str]) -> tuple[int, str] | None:
    """(number of source images, manifest path) behind make_shards output, or None when unknown.

    Known when ``shards`` is a make_shards output directory, or a list/pattern naming exactly
    the shards of one such directory: the manifest's ``num_files`` minus its skipped files.
    """
    from spsr_hpc.data.loader import resolve_shards
    from spsr_hpc.data.shards import MANIFEST_NAME, manifest_name, shard_manifests

    paths = [Path(p).resolve() for p in resolve_shards(shards)]
    parents = {p.parent for p in paths}
    if len(parents) != 1:
        return None
    folder = parents.pop()
    found = shard_manifests(folder).get(paths[0].name)
    if found is None:
        return None
    manifest = found[1]
    if {p.name for p in paths} != {s["name"] for s in manifest["shards"]}:
        return None  # a subset of the shards: the image count of the whole set does not apply
    own = folder / manifest_name(str((manifest.get("params") or {}).get("prefix", "shard")))
    path = own if own.is_file() else folder / MANIFEST_NAME  # an old-style manifest.json of this set
    return int(manifest["num_files"]) - int(manifest.get("skipped_count", 0)), str(path)


def resolve_epoch_length(cfg: NSEPretrainConfig) -> tuple[NSEPretrainConfig, str]:
    """cfg with data.samples_per_epoch filled in (unless batches_per_epoch is set), and a
    sentence saying where the epoch length came from (printed at the start of a run).

    Raises ValueError when neither is set and the number of training images is unknown.
    """
    d = cfg.data
    if d.batches_per_epoch is not None:
        return cfg, f"data.batches_per_epoch={d.batches_per_epoch} batches per rank"
    if d.samples_per_epoch is not None:
        return cfg, f"data.samples_per_epoch={d.samples_per_epoch} samples"
    found = training_images(d.shards)
    if found is None:
        raise ConfigError(
            "data.samples_per_epoch",
            f"null means 'the number of training images', but data.shards={d.shards!r} is not a "
            "complete make_shards output with a manifest: set data.samples_per_epoch (800 for DIV2K) "
            "or data.batches_per_epoch",
        )
    n, manifest = found
    resolved = dataclasses.replace(cfg, data=dataclasses.replace(d, samples_per_epoch=n))
    return resolved, (
        f"data.samples_per_epoch={n} samples: the number of training images in {manifest} "
        "(default; our reading of the paper's epoch)"
    )
