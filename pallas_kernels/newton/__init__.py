"""Pallas kernel fusing the Newton iterations of a channel-elementwise RNN (ParaGRU, ParaLSTM)."""

from pallas_kernels.newton.ops import check_elementwise, newton_solve

__all__ = ["check_elementwise", "newton_solve"]
