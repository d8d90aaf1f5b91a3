"""NSE pretraining (contrastive prediction, jigsaw), its sampling geometry, export and evaluation.

See docs/nse.md. The trainer (spsr_hpc.nse.pretrain) and the evaluation (spsr_hpc.nse.evaluate)
import DeepSpeed and the data pipeline; import them explicitly.
"""

from spsr_hpc.nse.contrastive import ContrastiveObjective
from spsr_hpc.nse.export import load_nse, read_nse_metadata, save_nse
from spsr_hpc.nse.jigsaw import JigsawObjective
from spsr_hpc.nse.sampling import (
    JIGSAW_PERMUTATIONS,
    STRATEGY_DIRECTIONS,
    context_offsets,
    enumerate_anchors,
    overlap_radius,
    sample_anchors,
    sample_jigsaw,
)

__all__ = [
    "JIGSAW_PERMUTATIONS",
    "STRATEGY_DIRECTIONS",
    "ContrastiveObjective",
    "JigsawObjective",
    "context_offsets",
    "enumerate_anchors",
    "load_nse",
    "overlap_radius",
    "read_nse_metadata",
    "sample_anchors",
    "sample_jigsaw",
    "save_nse",
]
