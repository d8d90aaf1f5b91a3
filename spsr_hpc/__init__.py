"""spsr-hpc: distributed training of structure-preserving super-resolution."""
__version__ = "0.1.0"
