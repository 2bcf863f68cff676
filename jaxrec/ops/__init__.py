"""Pure functions on arrays: the reference form of every recurrence, and dispatch to kernels."""

from jaxrec.ops.attention import attention_mask, dot_product_attention
from jaxrec.ops.gla import gated_linear_attention, gated_linear_attention_step
from jaxrec.ops.newton import JacobianStructure, NewtonInfo, newton_rnn
from jaxrec.ops.newton_sharded import newton_rnn_sharded
from jaxrec.ops.scan import linear_scan

__all__ = [
  "JacobianStructure",
  "NewtonInfo",
  "attention_mask",
  "dot_product_attention",
  "gated_linear_attention",
  "gated_linear_attention_step",
  "linear_scan",
  "newton_rnn",
  "newton_rnn_sharded",
]
