"""Pure functions on arrays: the reference form of every recurrence, and dispatch to kernels.

Design notes: the API shape every op here follows, and every new op copies.

* **Shapes** ``[B, T, H, K]`` for per-head queries and keys, ``[B, T, H, V]`` for values and
  outputs, ``[B, T, *F]`` for elementwise recurrences, ``[B, T, D]`` for RNN states; the axis
  letters and shape aliases are those of ``jaxrec.typing``, used in every annotation.
* **Returns: always a tuple.** A sequence op returns ``(out, final_state)``, as
  flash-linear-attention's ops do: ``initial_state=None`` in (zeros), and ``final_state`` is the
  state after the last step when ``output_final_state=True``, ``None`` otherwise (fp32 states for
  bf16 inputs, so they come back separately rather than as ``out[:, -1]``). ``linear_scan``,
  ``gated_linear_attention``, ``mlstm``, ``based_attention`` and ``prefix_linear_attention``
  follow it. The Newton solvers, whose ``out`` is every state (the final one is ``h[:, -1]``),
  return ``(h, info)`` with their ``NewtonInfo`` diagnostics instead. The shape of the result
  never depends on a flag, so it is typed without overloads; under ``jit``, XLA drops what the
  caller does not read. One-step decoding functions (``gated_linear_attention_step``,
  ``mlstm_step``) return ``(out, new_state)``.
* **Packing** ``segment_ids [B, T]``: the state restarts where the id changes
  (``segment_starts``); ``initial_state`` feeds the first document only.
* **Options** such as ``method`` are ``Literal`` aliases exported here (``ScanMethod``,
  ``GLAMethod``, ``MLSTMMethod``, ``NewtonMethod``, ...); each module derives its tuple of valid
  values with ``typing.get_args``, and a bad value raises a ``ValueError`` that names the argument
  and lists them. ``method="auto"`` picks the fastest correct form for the backend; the
  sequential form is the reference and is always kept.
* **Precision** gates, states and accumulations in fp32 (fp64 for fp64 inputs); outputs in the
  input dtype.
"""

from jaxrec.ops.attention import AttentionMethod, attention_mask, dot_product_attention
from jaxrec.ops.based import (
  BasedMethod,
  based_attention,
  based_attention_step,
  prefix_linear_attention,
  prefix_linear_attention_step,
  prefix_mask,
  taylor_feature_map,
)
from jaxrec.ops.gla import GLAMethod, gated_linear_attention, gated_linear_attention_step
from jaxrec.ops.mlstm import MLSTMMethod, MLSTMState, mlstm, mlstm_step
from jaxrec.ops.newton import NewtonMethod, newton_rnn
from jaxrec.ops.newton_core import (
  Fallback,
  JacobianKind,
  JacobianStructure,
  NewtonInfo,
  SolveMethod,
)
from jaxrec.ops.newton_sharded import newton_rnn_sharded
from jaxrec.ops.rat import RATMethod, RATState, rat, rat_init_state, rat_step
from jaxrec.ops.scan import ScanMethod, linear_scan
from jaxrec.ops.segments import segment_starts

__all__ = [
  "AttentionMethod",
  "BasedMethod",
  "Fallback",
  "GLAMethod",
  "JacobianKind",
  "JacobianStructure",
  "MLSTMMethod",
  "MLSTMState",
  "NewtonInfo",
  "NewtonMethod",
  "RATMethod",
  "RATState",
  "ScanMethod",
  "SolveMethod",
  "attention_mask",
  "based_attention",
  "based_attention_step",
  "dot_product_attention",
  "gated_linear_attention",
  "gated_linear_attention_step",
  "linear_scan",
  "mlstm",
  "mlstm_step",
  "newton_rnn",
  "newton_rnn_sharded",
  "prefix_linear_attention",
  "prefix_linear_attention_step",
  "prefix_mask",
  "rat",
  "rat_init_state",
  "rat_step",
  "segment_starts",
  "taylor_feature_map",
]
