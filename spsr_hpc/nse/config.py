"""Typed config of NSE pretraining (configs/nse_*.yaml), loaded by spsr_hpc.config.load_config.

Sections: ``nse`` (architecture and head sizes, spsr_hpc.models.NSEConfig), ``objective``
(method and sampling geometry), ``data`` (spsr_hpc.data DataConfig, HR-only crops), ``train``,
``optim``, ``deepspeed``, ``checkpoint``, ``logging`` (the last three shared with the SR
trainer). Defaults are the SPEC §6 values for contrastive prediction; configs/nse_jigsaw.yaml
sets the jigsaw ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    strategies: list[str] = field(default_factory=lambda: ["h", "v", "c"])
    """Contrastive context strategies trained together, one predictor each, losses averaged:
    h (two horizontal neighbours), v (two vertical), c (four ends of a cross)."""
    context_distance: int | None = None
    """Grid steps from the target to each context; null = ceil(R/stride), the closest placement
    that does not overlap the target. Smaller values are refused."""
    scale: float = 64.0
    """τ in the logits τ·cos(p, z) (SPEC: 64)."""
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
    """Epochs of data.batches_per_epoch (or one pass over the shards) each."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs; for smoke runs)."""
    global_batch: int | None = 48
    """Check: data.batch_size (per rank) × grad_accum × world size must equal it (SPEC: 48);
    null disables the check. On 8 GPUs use data.batch_size=6."""
    grad_accum: int = 1
    """Micro batches accumulated per optimizer step."""
    seed: int = 0
    """Seeds the initialisation and the anchor/permutation draws (per rank and step)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = False
    """bf16 engine (GPU only)."""

    def validate(self) -> None:
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
    """SPEC: 1e-3 for contrastive prediction, 1e-4 for jigsaw."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    lr_step_epochs: int = 20
    """Multiply the lr by lr_gamma every this many epochs (SPEC: 20 contrastive, 30 jigsaw)."""
    lr_gamma: float = 0.2
    """SPEC: 0.2 for contrastive; the paper gives no factor for jigsaw (ours: 0.1)."""

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
        if self.train.bf16 and self.train.device == "cpu":
            raise ConfigError("train.bf16", "bf16 engines need a GPU; set train.bf16=false on CPU")

