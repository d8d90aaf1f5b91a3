"""Data pipeline: MATLAB-compatible resize, bundled photos, shards, loaders, evaluation reader.

See docs/data.md for the commands, the shard layout and the loader options.
"""

from spsr_hpc.data.bundled import export_bundled_photos, load_bundled_photos
from spsr_hpc.data.config import DataConfig
from spsr_hpc.data.folder import FolderDataset
from spsr_hpc.data.images import BadImageError, read_rgb
from spsr_hpc.data.imresize import imresize, modcrop, to_uint8
from spsr_hpc.data.loader import build_train_loader, resolve_shards
from spsr_hpc.data.shards import make_shards, read_manifest, write_shards

__all__ = [
    "BadImageError",
    "DataConfig",
    "FolderDataset",
    "build_train_loader",
    "export_bundled_photos",
    "imresize",
    "load_bundled_photos",
    "make_shards",
    "modcrop",
    "read_manifest",
    "read_rgb",
    "resolve_shards",
    "to_uint8",
    "write_shards",
]
