"""The ``pallas_call`` s of chunked gated linear attention: a forward pass and a backward pass.

The math of one sub-chunk lives in ``subchunk.py``; this module holds the kernels and their
``pallas_call`` s. ``ops.py`` hands every per-token tensor over as ``[B, H, N, C, D]`` (``N``
chunks of ``C`` steps); the kernels walk each chunk in sub-chunks of ``c = gcd(C, 16)`` steps.

Grid ``(B, H, V / bv, T / (nb·C))``. Batch, heads and value blocks are independent. Time is the
innermost axis: on TPU it is "arbitrary" (sequential) with one chunk per grid step, and the state
is carried in the resident final-state output block (its index ignores time), as recurrentgemma
does; on GPU, grid programs run concurrently, so the whole sequence is one block and a
``fori_loop`` walks the chunks inside one program. The backward pass walks time in reverse and
carries ``dS``; it recomputes each chunk's sub-chunk states from the chunk-entry states that a
state-only run of the forward kernel stores (as FLA does), so only ``T / C`` states are held.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._backend import compiled_on, compiler_params
from pallas_kernels.gla import subchunk


def _chunks_per_block(num_chunks: int, interpret: bool) -> int:
  """Chunks per grid step along time: one on TPU (sequential grid axis), all elsewhere."""
  return 1 if compiled_on("tpu", interpret) else num_chunks


def _block_v(value_dim: int, interpret: bool) -> int:
  if compiled_on("tpu", interpret):
    return 128 if value_dim > 128 and value_dim % 128 == 0 else value_dim  # lane-aligned or full
  if compiled_on("gpu", interpret):
    # Value blocks are independent programs: more of them fill more SMs, and a [K, 32] state
    # leaves registers for the [c, c, K] decays.
    return 32 if value_dim > 32 and value_dim % 32 == 0 else value_dim
  return value_dim


def _compiler_params(interpret: bool, key_dim: int):
  # On GPU the [c, c, K] fp32 decays take c²K / (32 · num_warps) registers a thread: 128 at
  # K <= 64 with 4 warps, and at K = 128 with 8.
  return compiler_params(
    interpret,
    dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
    num_warps=4 if key_dim <= 64 else 8,
    num_stages=1,
  )


# ----------------------------------------------------------------------------------------------
# Kernels. Refs hold one block: per-token ``[nb, C, D]``, ``g_last_col`` ``[nb, m, K, 1]``,
# states ``[K, bv]``, chunk-entry states ``[nb, K, bv]``.


def _fwd_kernel(*refs, scale, nb, c, m, seg, emit_output, emit_states, single_block):
  it = iter(refs)
  ins = [next(it) for _ in range(5)]
  seg_refs = tuple(next(it) for _ in range(3)) if seg else None
  h0_ref = next(it)
  o_ref = next(it) if emit_output else None
  hs_ref = next(it) if emit_states else None
  ht_ref = next(it)
  refs = (*ins, seg_refs)

  if single_block:
    state = h0_ref[...]
  else:

    @pl.when(pl.program_id(3) == 0)
    def _init():
      ht_ref[...] = h0_ref[...]

    state = ht_ref[...]

  def chunk(n, state):
    if emit_states:
      hs_ref[n] = state
    for s in range(m):
      x = subchunk.load(refs, n, s, c)
      if emit_output:
        o_ref[n, pl.ds(s * c, c), :] = subchunk.output(x, state, scale).astype(o_ref.dtype)
      state = subchunk.next_state(x, state)
    return state

  ht_ref[...] = lax.fori_loop(0, nb, chunk, state)


def _bwd_kernel(*refs, scale, nb, c, m, seg, single_block):
  it = iter(refs)
  ins = [next(it) for _ in range(5)]
  seg_refs = tuple(next(it) for _ in range(3)) if seg else None
  hs_ref, do_ref, dht_ref, dq_ref, dk_ref, dg_ref, dv_ref, dh0_ref = it
  refs = (*ins, seg_refs)

  if single_block:
    dstate = dht_ref[...]
  else:

    @pl.when(pl.program_id(3) == 0)
    def _init():
      dh0_ref[...] = dht_ref[...]

    dstate = dh0_ref[...]

  def chunk(j, dstate):
    n = nb - 1 - j
    # The sub-chunk states of this chunk, recomputed forward from the stored entry state.
    # Inputs are loaded again where used rather than kept live across both loops.
    states = [hs_ref[n]]
    for s in range(m - 1):
      states.append(subchunk.next_state(subchunk.load(refs, n, s, c), states[-1]))
    for s in reversed(range(m)):
      rows = pl.ds(s * c, c)
      do = do_ref[n, rows, :].astype(jnp.float32)
      x = subchunk.load(refs, n, s, c)
      dq, dk, dg, dv, dstate = subchunk.grads(x, states[s], dstate, do, scale)
      dq_ref[n, rows, :] = dq
      dk_ref[n, rows, :] = dk
      dg_ref[n, rows, :] = dg
      dv_ref[n, rows, :] = dv.astype(dv_ref.dtype)
    return dstate

  dh0_ref[...] = lax.fori_loop(0, nb, chunk, dstate)


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers.


class _Tiling(NamedTuple):
  batch: int
  heads: int
  num_chunks: int
  chunk: int
  sub: int
  key_dim: int
  value_dim: int
  block_v: int
  nb: int

  @property
  def grid(self):
    return (self.batch, self.heads, self.value_dim // self.block_v, self.num_chunks // self.nb)


def _tiling(q, v, interpret) -> _Tiling:
  batch, heads, n, chunk, key_dim = q.shape
  value_dim = v.shape[-1]
  return _Tiling(
    batch,
    heads,
    n,
    chunk,
    subchunk.sub_chunk(chunk),
    key_dim,
    value_dim,
    _block_v(value_dim, interpret),
    _chunks_per_block(n, interpret),
  )


def _specs(t: _Tiling, seg: bool, reverse: bool):
  """BlockSpecs of (q, k, v, g, g_last_col, *segment masks) and of the states."""
  sq = pl.Squeezed()
  n_t = t.num_chunks // t.nb

  def tb(i):
    return n_t - 1 - i if reverse else i

  qk = pl.BlockSpec((sq, sq, t.nb, t.chunk, t.key_dim), lambda b, h, j, i: (b, h, tb(i), 0, 0))
  v = pl.BlockSpec((sq, sq, t.nb, t.chunk, t.block_v), lambda b, h, j, i: (b, h, tb(i), 0, j))
  gl = pl.BlockSpec(
    (sq, sq, t.nb, t.chunk // t.sub, t.key_dim, 1), lambda b, h, j, i: (b, h, tb(i), 0, 0, 0)
  )
  ins = [qk, qk, v, qk, gl]
  if seg:
    pair = pl.BlockSpec((sq, t.nb, t.chunk, t.sub), lambda b, h, j, i: (b, tb(i), 0, 0))
    col = pl.BlockSpec((sq, t.nb, t.chunk, 1), lambda b, h, j, i: (b, tb(i), 0, 0))
    ins += [pair, col, col]
  state = pl.BlockSpec((sq, sq, t.key_dim, t.block_v), lambda b, h, j, i: (b, h, 0, j))
  states = pl.BlockSpec(
    (sq, sq, t.nb, t.key_dim, t.block_v), lambda b, h, j, i: (b, h, tb(i), 0, j)
  )
  return ins, v, state, states


def _kernel_kwargs(t: _Tiling, seg):
  return dict(
    nb=t.nb,
    c=t.sub,
    m=t.chunk // t.sub,
    seg=seg is not None,
    single_block=t.nb == t.num_chunks,
  )


@functools.partial(jax.jit, static_argnames=("scale", "emit_output", "emit_states", "interpret"))
def forward(
  q, k, v, g, g_last_col, seg, h0, *, scale, emit_output=True, emit_states=False, interpret=False
):
  """Runs the forward kernel.

  Args:
    q: ``[B, H, N, C, K]``, any float dtype.
    k: ``[B, H, N, C, K]``.
    v: ``[B, H, N, C, V]``.
    g: fp32 ``[B, H, N, C, K]``, log-decay cumulated within each sub-chunk of ``sub_chunk(C)``.
    g_last_col: fp32 ``[B, H, N, C / c, K, 1]``, the last row of ``g`` in each sub-chunk.
    seg: ``subchunk.SegmentMasks`` or ``None``.
    h0: fp32 ``[B, H, K, V]``, the state before the first step.
    scale: query scale.
    emit_output: compute ``o``.
    emit_states: store the state entering every chunk.
    interpret: run the Pallas interpreter (CPU).

  Returns:
    ``(o, states, final_state)``: ``o`` ``[B, H, N, C, V]`` in ``q``'s dtype (or ``None``),
    ``states`` fp32 ``[B, H, N, K, V]`` (or ``None``), ``final_state`` fp32 ``[B, H, K, V]``.
  """
  t = _tiling(q, v, interpret)
  in_specs, v_spec, state_spec, states_spec = _specs(t, seg is not None, reverse=False)
  out_shape, out_specs = [], []
  if emit_output:
    out_shape.append(jax.ShapeDtypeStruct(v.shape, q.dtype))
    out_specs.append(v_spec)
  if emit_states:
    out_shape.append(
      jax.ShapeDtypeStruct((t.batch, t.heads, t.num_chunks, t.key_dim, t.value_dim), jnp.float32)
    )
    out_specs.append(states_spec)
  out_shape.append(jax.ShapeDtypeStruct(h0.shape, jnp.float32))
  out_specs.append(state_spec)
  outs = pl.pallas_call(
    functools.partial(
      _fwd_kernel,
      scale=scale,
      emit_output=emit_output,
      emit_states=emit_states,
      **_kernel_kwargs(t, seg),
    ),
    out_shape=tuple(out_shape),
    grid=t.grid,
    in_specs=[*in_specs, state_spec],
    out_specs=tuple(out_specs),
    compiler_params=_compiler_params(interpret, t.key_dim),
    interpret=interpret,
    name="gla_fwd",
  )(q, k, v, g, g_last_col, *(seg or ()), h0)
  outs = list(outs)
  o = outs.pop(0) if emit_output else None
  states = outs.pop(0) if emit_states else None
  return o, states, outs[0]


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def backward(q, k, v, g, g_last_col, seg, states, do, dht, *, scale, interpret=False):
  """Runs the backward kernel.

  Args:
    q, k, v, g, g_last_col, seg: as for ``forward``.
    states: fp32 ``[B, H, N, K, V]``, the state entering every chunk (``forward`` with
      ``emit_states``).
    do: ``[B, H, N, C, V]``, cotangent of ``o``.
    dht: fp32 ``[B, H, K, V]``, cotangent of the final state.
    scale: query scale.
    interpret: run the Pallas interpreter (CPU).

  Returns:
    ``(dq, dk, dG, dv, dh0)``: ``dq, dk`` and ``dG`` (w.r.t. ``g``, see ``subchunk.grads``) fp32
    ``[V / bv, B, H, N, C, K]``, one share per value block (their sum is the gradient); ``dv``
    ``[B, H, N, C, V]`` in ``v``'s dtype; ``dh0`` fp32 ``[B, H, K, V]``.
  """
  t = _tiling(q, v, interpret)
  in_specs, v_spec, state_spec, states_spec = _specs(t, seg is not None, reverse=True)
  n_v = t.value_dim // t.block_v
  n_t = t.num_chunks // t.nb
  sq = pl.Squeezed()
  share_spec = pl.BlockSpec(
    (sq, sq, sq, t.nb, t.chunk, t.key_dim), lambda b, h, j, i: (j, b, h, n_t - 1 - i, 0, 0)
  )
  share = jax.ShapeDtypeStruct((n_v, *q.shape), jnp.float32)
  return pl.pallas_call(
    functools.partial(_bwd_kernel, scale=scale, **_kernel_kwargs(t, seg)),
    out_shape=(
      share,
      share,
      share,
      jax.ShapeDtypeStruct(v.shape, v.dtype),
      jax.ShapeDtypeStruct(dht.shape, jnp.float32),
    ),
    grid=t.grid,
    in_specs=[*in_specs, states_spec, v_spec, state_spec],
    out_specs=(share_spec, share_spec, share_spec, v_spec, state_spec),
    compiler_params=_compiler_params(interpret, t.key_dim),
    interpret=interpret,
    name="gla_bwd",
  )(q, k, v, g, g_last_col, *(seg or ()), states, do, dht)
