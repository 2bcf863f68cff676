"""``chunk_mlstm``: the chunkwise mLSTM in Pallas kernels, and its gradient.

Per batch row and head, the stabilized mLSTM (xLSTM, Beck et al. 2024; the state ``(C, n, m)``)::

  m_t = max(log f_t + m_{t-1}, ĩ_t)
  C_t = e^{log f_t + m_{t-1} - m_t} C_{t-1} + e^{ĩ_t - m_t} k_t v_tᵀ,  n_t likewise with k_t
  h_t = q_tᵀC_t / (max(|q_t·n_t|, e^{-m_t}) + ε)

Axes (the letters of ``jaxrec.typing``): ``B`` batch, ``T`` time, ``H`` heads, ``K`` key width,
``V`` value width, ``N = T / C`` chunks of ``C`` steps. This module reshapes to the kernels'
``[B, H, N, C, D]`` layout and builds the segment masks in XLA, and wraps the two
``pallas_call`` s of ``kernel.py`` in a ``jax.custom_vjp`` (``pallas_call`` has no autodiff rule). The stabilizers are constants under
differentiation, except the initial ``m_0``, which scales the initial state (``chunk.py``).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Bool, Float

from pallas_kernels.mlstm import kernel

Queries = Float[jax.Array, "B T H K"]
Values = Float[jax.Array, "B T H V"]
Gates = Float[jax.Array, "B T H"]
SegmentStarts = Bool[jax.Array, "B T"]
MatrixState = Float[jax.Array, "B H K V"]
NormalizerState = Float[jax.Array, "B H K"]
StabilizerState = Float[jax.Array, "B H"]
State = tuple[MatrixState, NormalizerState, StabilizerState]


def chunk_mlstm(
  q: Queries,
  k: Queries,
  v: Values,
  i_gate: Gates,
  log_f: Gates,
  *,
  initial_state: State,
  segment_starts: SegmentStarts | None = None,
  eps: float,
  chunk_size: int,
  interpret: bool | pltpu.InterpretParams,
) -> tuple[Values, State]:
  """The mLSTM over axis 1, chunk by chunk, in Pallas kernels.

  Args:
    q: queries, ``[B, T, H, K]``, already scaled (``K^{-1/2}``); any float dtype (fp32 inside).
    k: keys, ``[B, T, H, K]``.
    v: values, ``[B, T, H, V]``.
    i_gate: input gate pre-activations ``ĩ``, ``[B, T, H]``.
    log_f: ``log σ(f̃)``, ``[B, T, H]``.
    initial_state: ``(C [B, H, K, V], n [B, H, K], m [B, H])``.
    segment_starts: bool ``[B, T]`` or ``None``: true at the first step of every packed document
      but the first, where the forget gate is shut; ``initial_state`` only feeds the first one.
    eps: ``ε`` of the denominator.
    chunk_size: ``C``; ``T`` must be a multiple (the caller pads: zero ``q, k, v``,
      ``ĩ = -∞`` and ``log f = 0`` leave the state as it is).
    interpret: run the Pallas interpreter instead of compiling (needed on CPU).

  Returns:
    ``(h, final_state)``: ``h`` ``[B, T, H, V]`` in ``q``'s dtype, ``final_state`` fp32.
  """
  _validate(q, k, v, i_gate, log_f, initial_state, segment_starts, chunk_size)
  batch, t, _, _ = q.shape
  f32 = jnp.float32
  if segment_starts is None:
    segment_starts = jnp.zeros((batch, t), bool)
  c0, n0, m0 = (x.astype(f32) for x in initial_state)
  # The reset step's own gate multiplies a state that the masks drop.
  log_f = jnp.where(segment_starts[..., None], 0.0, log_f.astype(f32))
  inputs = (
    *(_to_chunks(x, chunk_size) for x in (q, k, v)),
    _gates_to_chunks(log_f, chunk_size),
    _gates_to_chunks(i_gate.astype(f32), chunk_size),
    *_segment_masks(segment_starts, chunk_size),
  )
  h, c, n, m = _core(inputs, c0, n0, m0[..., None], eps=float(eps), interpret=interpret)
  return _from_chunks(h), (c, n, m[..., 0])


def _validate(q, k, v, i_gate, log_f, initial_state, segment_starts, chunk_size):
  for name, x in (("q", q), ("k", k), ("v", v), ("i_gate", i_gate), ("log_f", log_f)):
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise ValueError(f"{name}: expected a floating dtype, got {jnp.result_type(x)}")
  if jnp.ndim(q) != 4 or jnp.shape(k) != jnp.shape(q):
    raise ValueError(f"q, k: expected equal [B, T, H, K] shapes, got {q.shape} and {k.shape}")
  batch, t, heads, key_dim = q.shape
  if jnp.ndim(v) != 4 or v.shape[:3] != (batch, t, heads):
    raise ValueError(f"v: expected shape ({batch}, {t}, {heads}, V) [B, T, H, V], got {v.shape}")
  for name, x in (("i_gate", i_gate), ("log_f", log_f)):
    if jnp.shape(x) != (batch, t, heads):
      raise ValueError(f"{name}: expected shape {(batch, t, heads)} [B, T, H], got {x.shape}")
  want = ((batch, heads, key_dim, v.shape[-1]), (batch, heads, key_dim), (batch, heads))
  got = tuple(jnp.shape(x) for x in initial_state)
  if got != want:
    raise ValueError(f"initial_state: expected shapes {want} (C, n, m), got {got}")
  if segment_starts is not None and jnp.shape(segment_starts) != (batch, t):
    raise ValueError(
      f"segment_starts: expected shape {(batch, t)} [B, T], got {jnp.shape(segment_starts)}"
    )
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
  if t == 0 or t % chunk_size:
    raise ValueError(f"q: expected T a positive multiple of chunk_size={chunk_size}, got T={t}")


# ----------------------------------------------------------------------------------------------
# Layout and preprocessing (XLA).


def _to_chunks(x, chunk):
  """``[B, T, H, D] -> [B, H, N, C, D]``."""
  batch, t, heads, d = x.shape
  return x.reshape(batch, t // chunk, chunk, heads, d).transpose(0, 3, 1, 2, 4)


def _gates_to_chunks(x, chunk):
  """``[B, T, H] -> [B, H, N, C]``."""
  batch, t, heads = x.shape
  return x.reshape(batch, t // chunk, chunk, heads).transpose(0, 3, 1, 2)


def _from_chunks(x):
  """``[B, H, N, C, D] -> [B, T, H, D]``."""
  batch, heads, n, chunk, d = x.shape
  return x.transpose(0, 2, 3, 1, 4).reshape(batch, n * chunk, heads, d)


def _segment_masks(starts, chunk):
  """fp32 0/1 ``pair [B, N, C, C]``, ``cin [B, N, C]``, ``mout [B, N, C]`` from run indices:
  ``run_t`` counts the segment starts in the chunk up to ``t``, so two steps share a segment iff
  their runs are equal, and the entering state is live while the run is 0."""
  batch, t = starts.shape
  run = jnp.cumsum(starts.reshape(batch, t // chunk, chunk), axis=-1, dtype=jnp.int32)
  causal = jnp.tril(jnp.ones((chunk, chunk), bool))
  pair = causal & (run[..., :, None] == run[..., None, :])
  f32 = jnp.float32
  return pair.astype(f32), (run == 0).astype(f32), (run == run[..., -1:]).astype(f32)


# ----------------------------------------------------------------------------------------------
# custom_vjp.


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _core(inputs, c0, n0, m0, eps, interpret):
  h, _, (c, n, m) = kernel.forward(inputs, c0, n0, m0, eps=eps, interpret=interpret)
  return h, c, n, m


def _core_fwd(inputs, c0, n0, m0, eps, interpret):
  return _core(inputs, c0, n0, m0, eps, interpret), (inputs, c0, n0, m0)


def _core_bwd(eps, interpret, res, cts):
  inputs, c0, n0, m0 = res
  dh, dct, dnt, _ = cts  # the final m is a stabilizer: no gradient flows through it
  # Chunk-entry states, recomputed rather than kept from the forward pass.
  _, states, _ = kernel.forward(
    inputs, c0, n0, m0, eps=eps, emit_output=False, emit_states=True, interpret=interpret
  )
  dq, dk, dv, df, di, dm_in, dc0, dn0 = kernel.backward(
    inputs, states, dh, dct, dnt, eps=eps, interpret=interpret
  )
  q, k = inputs[:2]
  d_inputs = (dq.astype(q.dtype), dk.astype(k.dtype), dv, df, di, None, None, None)
  # Only the first chunk's entering stabilizer is an input (m_0); the others are stabilizers.
  return d_inputs, dc0, dn0, dm_in[..., 0, :]


_core.defvjp(_core_fwd, _core_bwd)
