"""The ``pallas_call`` s of the chunkwise mLSTM: a forward pass and a backward pass.

The math of one chunk lives in ``chunk.py``. ``ops.py`` hands every per-token tensor over as
``[B, H, N, C, D]`` (``N`` chunks of ``C`` steps) and the per-step gates as ``[B, H, N, C]``. The
grid is ``(B, H)``: batch rows and heads are independent programs, and each walks its chunks in a
``fori_loop`` carrying the state ``(C, n, m)``, forward in the forward pass and in reverse (carrying
``dC, dn``) in the backward pass. The backward pass recomputes each chunk's weights from the
chunk-entry states that a state-only run of the forward kernel stores, so only ``T / C`` states
are held, as in the GLA kernels.

Each program holds its whole sequence as one block (the GLA kernels' GPU layout). The kernels have
only run in the interpreter so far: no accelerator was at hand when they were written, so they
set no backend compiler parameters, and on TPU the whole-sequence blocks would have to become a
sequential grid axis over chunks (as the GLA kernels do there) to fit VMEM.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.mlstm import chunk as chunk_math


def _fwd_kernel(*refs, num_chunks, eps, emit_output, emit_states):
  it = iter(refs)
  ins = [next(it) for _ in range(8)]
  c0_ref, n0_ref, m0_ref = next(it), next(it), next(it)
  h_ref = next(it) if emit_output else None
  cs_ref, ns_ref, ms_ref = (next(it), next(it), next(it)) if emit_states else (None,) * 3
  ct_ref, nt_ref, mt_ref = it

  def step(n, state):
    c_st, n_st, m_st = state
    if emit_states:
      cs_ref[n], ns_ref[n], ms_ref[n] = c_st, n_st, m_st
    x = chunk_math.load(ins, n)
    wt = chunk_math.weights(x, m_st[0])
    if emit_output:
      h_ref[n] = chunk_math.output(x, wt, c_st, n_st, eps).astype(h_ref.dtype)
    c_st, n_st = chunk_math.next_state(x, wt, c_st, n_st)
    return c_st, n_st, jnp.reshape(wt.m_out, (1,))

  state = (c0_ref[...], n0_ref[...], m0_ref[...])
  ct_ref[...], nt_ref[...], mt_ref[...] = lax.fori_loop(0, num_chunks, step, state)


def _bwd_kernel(*refs, num_chunks, eps):
  it = iter(refs)
  ins = [next(it) for _ in range(8)]
  cs_ref, ns_ref, ms_ref, dh_ref, dct_ref, dnt_ref = (next(it) for _ in range(6))
  dq_ref, dk_ref, dv_ref, df_ref, di_ref, dm_ref, dc0_ref, dn0_ref = it

  def step(j, dstate):
    n = num_chunks - 1 - j
    x = chunk_math.load(ins, n)
    c_in, n_in = cs_ref[n], ns_ref[n]
    wt = chunk_math.weights(x, ms_ref[n][0])
    dh = dh_ref[n].astype(jnp.float32)
    dq, dk, dv, df, di, dm_in, dc, dn = chunk_math.grads(x, wt, c_in, n_in, dh, *dstate, eps)
    dq_ref[n], dk_ref[n], df_ref[n], di_ref[n] = dq, dk, df, di
    dv_ref[n] = dv.astype(dv_ref.dtype)
    dm_ref[n] = jnp.reshape(dm_in, (1,))
    return dc, dn

  dc0_ref[...], dn0_ref[...] = lax.fori_loop(0, num_chunks, step, (dct_ref[...], dnt_ref[...]))


def _specs(q, v):
  """BlockSpecs of the inputs ``(q, k, v, f, i, pair, cin, mout)`` and of the states."""
  _, _, n, c, key_dim = q.shape
  value_dim = v.shape[-1]
  sq = pl.Squeezed()

  def head(*block):
    return pl.BlockSpec((sq, sq, *block), lambda b, h: (b, h) + (0,) * len(block))

  def row(*block):
    return pl.BlockSpec((sq, *block), lambda b, h: (b,) + (0,) * len(block))

  ins = [
    head(n, c, key_dim),
    head(n, c, key_dim),
    head(n, c, value_dim),
    head(n, c),
    head(n, c),
    row(n, c, c),
    row(n, c),
    row(n, c),
  ]
  state = (head(key_dim, value_dim), head(key_dim), head(1))
  states = (head(n, key_dim, value_dim), head(n, key_dim), head(n, 1))
  return ins, head, state, states


def _state_shapes(batch, heads, key_dim, value_dim, *lead):
  f32 = jnp.float32
  return (
    jax.ShapeDtypeStruct((batch, heads, *lead, key_dim, value_dim), f32),
    jax.ShapeDtypeStruct((batch, heads, *lead, key_dim), f32),
    jax.ShapeDtypeStruct((batch, heads, *lead, 1), f32),
  )


@functools.partial(jax.jit, static_argnames=("eps", "emit_output", "emit_states", "interpret"))
def forward(inputs, c0, n0, m0, *, eps, emit_output=True, emit_states=False, interpret=False):
  """Runs the forward kernel.

  Args:
    inputs: ``(q, k, v, f, i, pair, cin, mout)``: ``q, k`` ``[B, H, N, C, K]`` (``q`` scaled),
      ``v`` ``[B, H, N, C, V]``, fp32 ``f`` (``log f``, 0 at segment starts) and ``i``
      ``[B, H, N, C]``, fp32 0/1 masks ``pair`` ``[B, N, C, C]``, ``cin, mout`` ``[B, N, C]``.
    c0: fp32 ``[B, H, K, V]``; n0: fp32 ``[B, H, K]``; m0: fp32 ``[B, H, 1]``: the initial state.
    eps: ``ε`` of the denominator.
    emit_output: compute ``h``.
    emit_states: store the state entering every chunk.
    interpret: run the Pallas interpreter (CPU).

  Returns:
    ``(h, states, final)``: ``h`` ``[B, H, N, C, V]`` in ``q``'s dtype (or ``None``), ``states``
    the entering ``(C, n, m)`` of every chunk, fp32 ``[B, H, N, ...]`` (or ``None``), ``final``
    the state after the last chunk.
  """
  q, v = inputs[0], inputs[2]
  batch, heads, n, _, key_dim = q.shape
  value_dim = v.shape[-1]
  in_specs, head, state_spec, states_spec = _specs(q, v)
  out_shape, out_specs = [], []
  if emit_output:
    out_shape.append(jax.ShapeDtypeStruct(v.shape, q.dtype))
    out_specs.append(head(*v.shape[2:]))
  if emit_states:
    out_shape += _state_shapes(batch, heads, key_dim, value_dim, n)
    out_specs += states_spec
  out_shape += _state_shapes(batch, heads, key_dim, value_dim)
  out_specs += state_spec
  outs = pl.pallas_call(
    functools.partial(
      _fwd_kernel, num_chunks=n, eps=eps, emit_output=emit_output, emit_states=emit_states
    ),
    out_shape=tuple(out_shape),
    grid=(batch, heads),
    in_specs=[*in_specs, *state_spec],
    out_specs=tuple(out_specs),
    interpret=interpret,
    name="mlstm_fwd",
  )(*inputs, c0, n0, m0)
  outs = list(outs)
  h = outs.pop(0) if emit_output else None
  states = tuple(outs[:3]) if emit_states else None
  return h, states, tuple(outs[-3:])


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def backward(inputs, states, dh, dct, dnt, *, eps, interpret=False):
  """Runs the backward kernel.

  Args:
    inputs: as for ``forward``.
    states: the chunk-entering states, ``forward`` with ``emit_states``.
    dh: ``[B, H, N, C, V]``, cotangent of ``h``.
    dct, dnt: fp32 cotangents of the final ``C`` and ``n`` (the final ``m`` has none: it is a
      stabilizer).
    eps: ``ε`` of the denominator.
    interpret: run the Pallas interpreter (CPU).

  Returns:
    ``(dq, dk, dv, df, di, dm_in, dc0, dn0)``: fp32 ``dq, dk`` ``[B, H, N, C, K]``, ``dv`` in
    ``v``'s dtype, fp32 ``df, di`` ``[B, H, N, C]``, ``dm_in`` ``[B, H, N, 1]`` (w.r.t. each
    chunk's entering stabilizer), ``dc0, dn0`` w.r.t. the initial state.
  """
  q, v = inputs[0], inputs[2]
  batch, heads, n, c, key_dim = q.shape
  value_dim = v.shape[-1]
  in_specs, head, state_spec, states_spec = _specs(q, v)
  f32 = jnp.float32
  per_token = (head(n, c, key_dim), head(n, c, key_dim), head(n, c, value_dim))
  return pl.pallas_call(
    functools.partial(_bwd_kernel, num_chunks=n, eps=eps),
    out_shape=(
      jax.ShapeDtypeStruct(q.shape, f32),
      jax.ShapeDtypeStruct(q.shape, f32),
      jax.ShapeDtypeStruct(v.shape, v.dtype),
      jax.ShapeDtypeStruct(q.shape[:-1], f32),
      jax.ShapeDtypeStruct(q.shape[:-1], f32),
      jax.ShapeDtypeStruct((batch, heads, n, 1), f32),
      *_state_shapes(batch, heads, key_dim, value_dim)[:2],
    ),
    grid=(batch, heads),
    in_specs=[*in_specs, *states_spec, head(n, c, value_dim), *state_spec[:2]],
    out_specs=(
      *per_token,
      head(n, c),
      head(n, c),
      head(n, 1),
      *state_spec[:2],
    ),
    interpret=interpret,
    name="mlstm_bwd",
  )(*inputs, *states, dh, dct, dnt)
