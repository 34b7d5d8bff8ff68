"""rada_mma: RAda and MMA adapters for frozen CLIP models, with fused kernels."""

__version__ = "0.1.0"
