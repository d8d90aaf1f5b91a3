"""The one place that knows about ranks (STYLE.md rule 4).

Works with every launcher: `deepspeed`, `torchrun` (both set RANK/WORLD_SIZE/LOCAL_RANK),
and plain `python` (one process, no environment needed).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    if is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    if is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on global rank 0: the only rank that prints, logs and writes shared files."""
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def local_device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK when CUDA is present, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", get_local_rank() % torch.cuda.device_count())
    return torch.device("cpu")
