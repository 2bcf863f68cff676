"""``chunk_gla``: chunked gated linear attention with Pallas kernels, and its gradient.

Per batch row and head, with a fp32 ``[K, V]`` state (GLA, Yang et al. 2024)::

  S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ        o_t = scale · q_tᵀ S_t

Axes (the letters of ``jaxrec.typing``): ``B`` batch, ``T`` time, ``H`` heads, ``K`` key width
``key_dim``, ``V`` value width ``value_dim``, ``N = T / C`` chunks of ``C`` steps. This module reshapes to the kernels' ``[B, H, N, C, D]`` layout, cumulates the
log-decay and builds the segment masks in XLA, and wraps the two ``pallas_call`` s of
``kernel.py`` in a ``jax.custom_vjp`` (``pallas_call`` has no autodiff rule).

Backward. A reverse pass over chunks carrying ``dS`` gives ``dq, dk, dv``, ``dS_0`` and ``dG``,
the gradient w.r.t. the log-decay cumulated inside each sub-chunk (``G_i = g_0 + ... + g_i``; see
``subchunk.grads``), so ``dg_s = Σ_{i >= s} dG_i`` within the sub-chunk. That is FLA's identity
``dG = q ⊙ dq - k ⊙ dk`` (+ ``Σ_V S ⊙ dS`` at the sub-chunk's end) with the terms that cancel
exactly left out before they are summed, which keeps ``dg`` accurate under strong decays. With
segments, a reset step's own ``g`` multiplies a zeroed state: its gradient is 0.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Bool, Float

from pallas_kernels._backend import compiled_on
from pallas_kernels.gla import kernel, subchunk

Queries = Float[jax.Array, "B T H K"]
Values = Float[jax.Array, "B T H V"]
MatrixState = Float[jax.Array, "B H K V"]
SegmentStarts = Bool[jax.Array, "B T"]


def chunk_gla(
  q: Queries,
  k: Queries,
  v: Values,
  log_decay: Queries,
  *,
  initial_state: MatrixState | None = None,
  segment_starts: SegmentStarts | None = None,
  scale: float,
  chunk_size: int,
  interpret: bool | pltpu.InterpretParams,
) -> tuple[Values, MatrixState]:
  """Gated linear attention over axis 1, chunk by chunk, in Pallas kernels.

  Args:
    q: queries, ``[B, T, H, K]``, any float dtype (computed in fp32).
    k: keys, ``[B, T, H, K]``.
    v: values, ``[B, T, H, V]``.
    log_decay: ``g``, ``[B, T, H, K]``, fp32, expected ``<= 0`` (per key channel).
    initial_state: fp32 ``[B, H, K, V]``; zeros when ``None``.
    segment_starts: bool ``[B, T]`` or ``None``: true at the first step of every packed document
      but the first (``jaxrec.ops.segment_starts``), where the state restarts from zero;
      ``initial_state`` only feeds the first document.
    scale: query scale.
    chunk_size: ``C``, steps per chunk; ``T`` must be a multiple (the caller pads). The kernels
      take ``C`` steps per grid step and keep one state per chunk for the backward pass; inside a
      chunk they work in sub-chunks of ``gcd(C, 16)`` steps.
    interpret: run the Pallas interpreter instead of compiling (needed on CPU); a
      ``pltpu.InterpretParams`` selects the interpreter that models TPU memory.

  Returns:
    ``(o, final_state)``: ``o`` ``[B, T, H, V]`` in ``q``'s dtype, ``final_state`` fp32
    ``[B, H, K, V]``.
  """
  _validate(
    q=q,
    k=k,
    v=v,
    log_decay=log_decay,
    initial_state=initial_state,
    segment_starts=segment_starts,
    chunk_size=chunk_size,
    interpret=interpret,
  )
  batch, _, heads, key_dim = q.shape
  if initial_state is None:
    initial_state = jnp.zeros((batch, heads, key_dim, v.shape[-1]), jnp.float32)
  return _chunk_gla(
    q,
    k,
    v,
    log_decay.astype(jnp.float32),
    initial_state.astype(jnp.float32),
    segment_starts,
    scale=float(scale),
    chunk=chunk_size,
    interpret=interpret,
  )


def _validate(*, q, k, v, log_decay, initial_state, segment_starts, chunk_size, interpret):
  for name, x in (("q", q), ("k", k), ("v", v), ("log_decay", log_decay)):
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise ValueError(f"{name}: expected a floating dtype, got {jnp.result_type(x)}")
  if jnp.ndim(q) != 4:
    raise ValueError(f"q: expected rank 4 [B, T, H, K], got shape {jnp.shape(q)}")
  for name, x in (("k", k), ("log_decay", log_decay)):
    if jnp.shape(x) != jnp.shape(q):
      raise ValueError(f"{name}: expected shape {q.shape} [B, T, H, K], got {jnp.shape(x)}")
  batch, t, heads, key_dim = q.shape
  if jnp.ndim(v) != 4 or v.shape[:3] != (batch, t, heads):
    raise ValueError(f"v: expected shape ({batch}, {t}, {heads}, V) [B, T, H, V], got {v.shape}")
  if initial_state is not None and initial_state.shape != (batch, heads, key_dim, v.shape[-1]):
    want = (batch, heads, key_dim, v.shape[-1])
    raise ValueError(
      f"initial_state: expected shape {want} [B, H, K, V], got {jnp.shape(initial_state)}"
    )
  if segment_starts is not None:
    if jnp.shape(segment_starts) != (batch, t):
      raise ValueError(
        f"segment_starts: expected shape {(batch, t)} [B, T], got {jnp.shape(segment_starts)}"
      )
    if jnp.result_type(segment_starts) != jnp.bool_:
      raise ValueError(
        f"segment_starts: expected a bool dtype, got {jnp.result_type(segment_starts)}"
      )
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
  if t == 0 or t % chunk_size:
    raise ValueError(f"q: expected T a positive multiple of chunk_size={chunk_size}, got T={t}")
  if compiled_on("gpu", interpret):
    # Triton register tensors have power-of-2 sizes and its dots need every dim >= 16.
    for name, d in (("chunk_size", chunk_size), ("key_dim", key_dim), ("value_dim", v.shape[-1])):
      if d < 16 or d & (d - 1):
        raise ValueError(f"{name}: expected a power of 2 >= 16 on GPU, got {d}")


# ----------------------------------------------------------------------------------------------
# Layout and preprocessing (XLA).


def _to_chunks(x, chunk):
  """``[B, T, H, D] -> [B, H, N, C, D]``."""
  batch, t, heads, d = x.shape
  return x.reshape(batch, t // chunk, chunk, heads, d).transpose(0, 3, 1, 2, 4)


def _from_chunks(x):
  """``[B, H, N, C, D] -> [B, T, H, D]``."""
  batch, heads, n, chunk, d = x.shape
  return x.transpose(0, 2, 3, 1, 4).reshape(batch, n * chunk, heads, d)


def _cumulated_decay(g, chunk):
  """The log-decay cumulated within each sub-chunk, in the kernel layout, and its last rows."""
  batch, t, heads, key_dim = g.shape
  c = subchunk.sub_chunk(chunk)
  g_cum = jnp.cumsum(g.reshape(batch, t // c, c, heads, key_dim), axis=2)
  g_last = g_cum[:, :, -1].reshape(batch, t // chunk, chunk // c, heads, key_dim)
  g_last_col = g_last.transpose(0, 3, 1, 2, 4)[..., None]  # [B, H, N, C / c, K, 1]
  return _to_chunks(g_cum.reshape(g.shape), chunk), g_last_col


def _segment_masks(starts, chunk) -> subchunk.SegmentMasks | None:
  """Masks from run indices: ``run_t`` counts the segment starts up to ``t``, so two steps share
  a segment iff their runs are equal."""
  if starts is None:
    return None
  batch, t = starts.shape
  c = subchunk.sub_chunk(chunk)
  run = jnp.cumsum(starts, axis=1, dtype=jnp.int32).reshape(batch, t // c, c)
  # The state entering sub-chunk u belongs to the run of the step before it (run 0 for u = 0:
  # the initial state feeds the first segment).
  run_in = jnp.pad(run[:, :-1, -1], ((0, 0), (1, 0)))
  tri = jnp.tril(jnp.ones((c, c), bool))
  pair = (run[..., :, None] == run[..., None, :]) & tri
  cin = run == run_in[..., None]
  mout = run == run[..., -1:]
  n = t // chunk

  def shape(x, cols):
    return x.astype(jnp.float32).reshape(batch, n, chunk, cols)

  return subchunk.SegmentMasks(pair=shape(pair, c), cin=shape(cin, 1), mout=shape(mout, 1))


# ----------------------------------------------------------------------------------------------
# custom_vjp.


def _prepare(q, k, v, g, starts, chunk):
  g_cum, g_last_col = _cumulated_decay(g, chunk)
  chunks = tuple(_to_chunks(x, chunk) for x in (q, k, v))
  return (*chunks, g_cum, g_last_col, _segment_masks(starts, chunk))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _chunk_gla(q, k, v, g, h0, starts, scale, chunk, interpret):
  o, _, ht = kernel.forward(
    *_prepare(q, k, v, g, starts, chunk), h0, scale=scale, interpret=interpret
  )
  return _from_chunks(o), ht


def _chunk_gla_fwd(q, k, v, g, h0, starts, scale, chunk, interpret):
  out = _chunk_gla(q, k, v, g, h0, starts, scale=scale, chunk=chunk, interpret=interpret)
  return out, (q, k, v, g, h0, starts)


def _chunk_gla_bwd(scale, chunk, interpret, res, cts):
  q, k, v, g, h0, starts = res
  do, dht = cts
  prepared = _prepare(q, k, v, g, starts, chunk)
  # Chunk-entry states, recomputed rather than kept from the forward pass (as FLA does).
  _, states, _ = kernel.forward(
    *prepared, h0, scale=scale, emit_output=False, emit_states=True, interpret=interpret
  )
  dq, dk, dg, dv, dh0 = kernel.backward(
    *prepared,
    states,
    _to_chunks(do, chunk),
    dht.astype(jnp.float32),
    scale=scale,
    interpret=interpret,
  )
  dq, dk, dg = (_from_chunks(x.sum(0)) for x in (dq, dk, dg))
  batch, t, heads, key_dim = g.shape
  c = subchunk.sub_chunk(chunk)
  dg = lax.cumsum(dg.reshape(batch, t // c, c, heads, key_dim), axis=2, reverse=True)
  dg = dg.reshape(g.shape)
  if starts is not None:
    dg = jnp.where(starts[..., None, None], 0.0, dg)
  return dq.astype(q.dtype), dk.astype(k.dtype), _from_chunks(dv), dg, dh0, None


_chunk_gla.defvjp(_chunk_gla_fwd, _chunk_gla_bwd)
