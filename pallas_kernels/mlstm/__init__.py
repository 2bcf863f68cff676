"""Pallas kernels for the chunkwise mLSTM (xLSTM), forward and backward."""

from pallas_kernels.mlstm.ops import chunk_mlstm

__all__ = ["chunk_mlstm"]
