"""Shape aliases for annotations: one name per axis, across ops, kernels and layers.

Annotations only: nothing checks them at run time (``jaxtyping`` gives the notation, no
``@jaxtyped`` decorator is applied). Axis letters, as in every docstring of the project:

=====  =======================================================================================
``B``  batch
``T``  time (query time in attention)
``S``  key time (attention against a cache)
``H``  heads (query heads)
``G``  key/value heads of grouped-query attention (``H`` a multiple of ``G``)
``K``  key width per head, ``key_dim`` (``head_dim`` where keys and values share it)
``V``  value width per head, ``value_dim``
``D``  model width ``d_model``, or the state width of a nonlinear RNN
``N``  chunks of ``C`` steps (``T = N·C``) in chunked forms
``C``  steps per chunk, ``chunk_size``
``F``  any trailing feature axes (``*F``) of an elementwise recurrence
=====  =======================================================================================

Widths are named ``key_dim``, ``value_dim`` and ``head_dim`` in code; ``dq``, ``dk``, ``dv`` only
ever name gradients. Kernels (``pallas_kernels``, which imports nothing from ``jaxrec``) write the
same letters with ``jaxtyping`` directly.
"""

import jax
from jaxtyping import Bool, Float, Int, PyTree, Shaped

Array = jax.Array

# Packing.
SegmentIds = Int[Array, "B T"]
SegmentStarts = Bool[Array, "B T"]

# Elementwise linear recurrences (jaxrec.ops.linear_scan).
ScanInputs = Float[Array, "B T *F"]
ScanState = Float[Array, "B *F"]

# Heads: queries, keys, values and the matrix state of linear attention.
Queries = Float[Array, "B T H K"]
Keys = Float[Array, "B T H K"]
Values = Float[Array, "B T H V"]
HeadOutputs = Float[Array, "B T H V"]
LogDecay = Float[Array, "B T H K"] | Float[Array, "B T H"]
MatrixState = Float[Array, "B H K V"]
StepQueries = Float[Array, "B H K"]
StepKeys = Float[Array, "B H K"]
StepValues = Float[Array, "B H V"]
StepLogDecay = Float[Array, "B H K"] | Float[Array, "B H"]

# Per-head scalar gates (mLSTM's input and forget gate pre-activations) and the mLSTM's normalizer
# and stabilizer states.
HeadGates = Float[Array, "B T H"]
StepHeadGates = Float[Array, "B H"]
NormalizerState = Float[Array, "B H K"]
StabilizerState = Float[Array, "B H"]

# Softmax attention against keys of their own length S and G heads.
AttentionKeys = Float[Array, "B S G K"]
CachedKeys = Float[Array, "B G S K"]  # head-major, as a KV cache stores them
KeySegmentIds = Int[Array, "B S"]
AttentionMask = Bool[Array, "B 1 T S"]
Positions = Int[Array, "B T"] | Int[Array, "T"]
KeyPositions = Int[Array, "B S"] | Int[Array, "S"]

# Nonlinear RNNs (jaxrec.ops.newton_rnn): states of width D, inputs any [B, T, ...] pytree.
RNNState = Float[Array, "B D"]
RNNStates = Float[Array, "B T D"]
RNNInputs = PyTree[Shaped[Array, "B T *X"]]

# Layers: activations of width d_model.
Activations = Float[Array, "B T D"]

__all__ = [
  "Activations",
  "Array",
  "AttentionKeys",
  "AttentionMask",
  "CachedKeys",
  "HeadGates",
  "HeadOutputs",
  "KeyPositions",
  "KeySegmentIds",
  "Keys",
  "LogDecay",
  "MatrixState",
  "NormalizerState",
  "Positions",
  "Queries",
  "RNNInputs",
  "RNNState",
  "RNNStates",
  "ScanInputs",
  "ScanState",
  "SegmentIds",
  "SegmentStarts",
  "StabilizerState",
  "StepHeadGates",
  "StepKeys",
  "StepLogDecay",
  "StepQueries",
  "StepValues",
  "Values",
]
