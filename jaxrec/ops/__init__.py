"""Pure functions on arrays: the reference form of every recurrence, and dispatch to kernels."""

from jaxrec.ops.newton import JacobianStructure, NewtonInfo, newton_rnn
from jaxrec.ops.scan import linear_scan

__all__ = ["JacobianStructure", "NewtonInfo", "linear_scan", "newton_rnn"]
