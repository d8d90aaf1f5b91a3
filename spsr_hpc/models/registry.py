"""Config names -> classes (STYLE rule 3: an explicit dict, no auto-registration)."""

from __future__ import annotations

from spsr_hpc.models.backbones import EDSR, RRDBNet, SRResNet
from spsr_hpc.models.discriminators import StructureDiscriminator, VGGDiscriminator
from spsr_hpc.models.spsr import SPSRGenerator

GENERATORS = {"spsr": SPSRGenerator, "rrdbnet": RRDBNet, "edsr": EDSR, "srresnet": SRResNet}
DISCRIMINATORS = {"vgg128": VGGDiscriminator, "structure": StructureDiscriminator}
