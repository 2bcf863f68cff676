"""Pallas kernels for chunked gated linear attention, forward and backward."""

from pallas_kernels.gla.ops import chunk_gla

__all__ = ["chunk_gla"]
