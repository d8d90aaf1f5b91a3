"""``spsr-train`` console script (pyproject [project.scripts]); same CLI as launch/train.py."""

from spsr_hpc.train.trainer import main

__all__ = ["main"]
