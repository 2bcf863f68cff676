"""Pallas kernel for the diagonal linear recurrence ``h_t = a_t * h_{t-1} + b_t``."""

from pallas_kernels.linear_scan.ops import linear_scan

__all__ = ["linear_scan"]
