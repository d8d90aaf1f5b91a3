"""Networks: SPSR generator, backbones, discriminators, NSE, checkpoint loading, config builders."""

from spsr_hpc.models.backbones import EDSR, RRDBNet, SRResNet
from spsr_hpc.models.blocks import RRDB, ResidualDenseBlock5C, SROutput, count_parameters, kaiming_init_
from spsr_hpc.models.config import (
    DiscriminatorConfig,
    GeneratorConfig,
    NSEConfig,
    build_context_predictor,
    build_discriminator,
    build_generator,
    build_jigsaw_classifier,
    build_nse,
    build_structure_extractor,
    generator_config_from_export,
)
from spsr_hpc.models.discriminators import StructureDiscriminator, VGGDiscriminator
from spsr_hpc.models.extractors import EXTRACTORS, ImageNetExtractor, feature_shape
from spsr_hpc.models.loading import CheckpointMismatchError, LoadReport, export_state_dict, load_pretrained
from spsr_hpc.models.nse import NSE, ContextPredictor, JigsawClassifier
from spsr_hpc.models.registry import DISCRIMINATORS, GENERATORS
from spsr_hpc.models.spsr import SPSRGenerator

__all__ = [
    "DISCRIMINATORS",
    "EDSR",
    "EXTRACTORS",
    "GENERATORS",
    "NSE",
    "RRDB",
    "CheckpointMismatchError",
    "ContextPredictor",
    "DiscriminatorConfig",
    "GeneratorConfig",
    "ImageNetExtractor",
    "JigsawClassifier",
    "LoadReport",
    "NSEConfig",
    "RRDBNet",
    "ResidualDenseBlock5C",
    "SPSRGenerator",
    "SROutput",
    "SRResNet",
    "StructureDiscriminator",
    "VGGDiscriminator",
    "build_context_predictor",
    "build_discriminator",
    "build_generator",
    "build_jigsaw_classifier",
    "build_nse",
    "build_structure_extractor",
    "count_parameters",
    "export_state_dict",
    "feature_shape",
    "generator_config_from_export",
    "kaiming_init_",
    "load_pretrained",
]
