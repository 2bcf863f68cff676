"""Pure functions on arrays: the reference form of every recurrence, and dispatch to kernels."""

from jaxrec.ops.scan import linear_scan

__all__ = ["linear_scan"]
