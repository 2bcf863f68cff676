"""The math of one sub-chunk, shared by the forward and backward kernels of ``kernel.py``.

Per batch row and head, ``S_t = diag(e^{g_t}) S_{t-1} + k_t v_tᵀ`` and
``o_t = scale · S_tᵀ q_t`` with a fp32 ``[K, V]`` state. The kernels walk each chunk of ``C``
steps in sub-chunks of ``c = gcd(C, 16)`` steps. With ``G`` the log-decay cumulated inside a
sub-chunk (``G_i = g_0 + ... + g_i``, computed in XLA), ``S`` the state entering it and ``G_l``
its last row::

  o_i = scale · ((q_i ⊙ e^{G_i}) S + Σ_{j <= i} (Σ_K q_i k_j e^{G_i - G_j}) v_j)
  S'  = e^{G_l} ⊙ S + Σ_j (k_j ⊙ e^{G_l - G_j}) v_jᵀ

Every exponent is a sum of log-decays over steps that happen in that order, so it is ``<= 0``:
decays of ``e^{-20}`` a step underflow to 0 instead of overflowing. The intra-chunk decays are
computed exactly, as a ``[c, c, K]`` tensor of ``G_i - G_j`` masked to ``-inf`` for ``i < j`` (and
across segments) *before* ``exp``. That costs ``c·K`` exponentials and multiply-adds per token on
the vector units, where a ``q kᵀ`` matmul would do the same count on the matrix units, so ``c``
stays small (16). It needs nothing but 3-D broadcasts and reductions, which lower both to Triton
(power-of-2 register tensors) and to Mosaic; the alternative, sub-blocks factored through
reference points ``e^{G_i - G_r} e^{G_r - G_j}``, still needs this exact form on its diagonal
blocks. Segments enter as masks precomputed in XLA: which pairs share a segment, which rows see
the entering state (``cin``), which rows reach the leaving state (``mout``).

Inside the kernels every value is fp32; refs are read at static sub-chunk offsets within a chunk.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

SUB_CHUNK = 16  # exact pairwise-decay block; also Triton's minimum dot dimension


class SegmentMasks(NamedTuple):
  """Resets, as fp32 0/1 masks at sub-chunk granularity (``c`` steps).

  Attributes:
    pair: ``[B, N, C, c]``: step ``i`` and step ``j`` of its sub-chunk share a segment and
      ``j <= i``.
    cin: ``[B, N, C, 1]``: step ``i`` shares a segment with the state entering its sub-chunk.
    mout: ``[B, N, C, 1]``: step ``i`` shares a segment with the last step of its sub-chunk.
  """

  pair: jax.Array
  cin: jax.Array
  mout: jax.Array


def sub_chunk(chunk_size: int) -> int:
  return math.gcd(chunk_size, SUB_CHUNK)


def _dot(a, b, contract):
  # HIGHEST: fp32 operands stay fp32 (Triton would otherwise use TF32, whose 10-bit mantissa is
  # far from the fp32 tolerance).
  return lax.dot_general(
    a,
    b,
    (contract, ((), ())),
    precision=lax.Precision.HIGHEST,
    preferred_element_type=jnp.float32,
  )


def _mm(a, b):  # a @ b
  return _dot(a, b, ((1,), (0,)))


def _mm_tn(a, b):  # aᵀ @ b
  return _dot(a, b, ((0,), (0,)))


def _mm_nt(a, b):  # a @ bᵀ
  return _dot(a, b, ((1,), (1,)))


def _rows(x, mask):
  return x if mask is None else x * mask


class Sub(NamedTuple):
  """One sub-chunk: ``q, k, g`` ``[c, K]``, ``v`` ``[c, bv]``, ``g_last`` ``[1, K]`` (last row
  of ``g``), ``g_last_col`` ``[K, 1]`` (the same, as a column), the pair mask ``[c, c]`` (bool)
  and the optional row masks ``cin, mout`` ``[c, 1]`` and ``clast`` ``[1, 1]`` (``cin`` of the
  last row: the state survives the whole sub-chunk)."""

  q: jax.Array
  k: jax.Array
  v: jax.Array
  g: jax.Array
  g_last: jax.Array
  g_last_col: jax.Array
  pair: jax.Array
  cin: jax.Array | None
  mout: jax.Array | None
  clast: jax.Array | None


def load(refs, n, s, c):
  """Sub-chunk ``s`` of chunk ``n`` (of the block) from the input refs."""
  q_ref, k_ref, v_ref, g_ref, gl_ref, seg = refs
  rows = pl.ds(s * c, c)
  f32 = jnp.float32
  if seg is None:
    pair = lax.broadcasted_iota(jnp.int32, (c, c), 0) >= lax.broadcasted_iota(jnp.int32, (c, c), 1)
    cin = mout = clast = None
  else:
    pair_ref, cin_ref, mout_ref = seg
    pair = pair_ref[n, rows, :] > 0
    cin, mout = cin_ref[n, rows, :], mout_ref[n, rows, :]
    clast = cin_ref[n, pl.ds(s * c + c - 1, 1), :]
  return Sub(
    q=q_ref[n, rows, :].astype(f32),
    k=k_ref[n, rows, :].astype(f32),
    v=v_ref[n, rows, :].astype(f32),
    g=g_ref[n, rows, :],
    g_last=g_ref[n, pl.ds(s * c + c - 1, 1), :],
    g_last_col=gl_ref[n, s],
    pair=pair,
    cin=cin,
    mout=mout,
    clast=clast,
  )


def _pair_decay(x: Sub):
  """``e^{G_i - G_j}`` for the pairs of the mask, else 0: ``[c, c, K]``. The mask goes in
  before ``exp``: unmasked ``G_i - G_j`` (``i < j``) is positive and unbounded."""
  diff = x.g[:, None, :] - x.g[None, :, :]
  return jnp.exp(jnp.where(x.pair[:, :, None], diff, -jnp.inf))


def _scores(x: Sub, decay):
  """``A_ij = Σ_K q_i k_j e^{G_i - G_j}`` over the masked pairs, ``[c, c]``."""
  return jnp.sum(x.q[:, None, :] * x.k[None, :, :] * decay, axis=-1)


def _q_in(x: Sub):  # e^{G_i} on rows that see the entering state
  return _rows(jnp.exp(x.g), x.cin)


def _k_out(x: Sub):  # e^{G_l - G_j} on rows that reach the leaving state
  return _rows(jnp.exp(x.g_last - x.g), x.mout)


def next_state(x: Sub, state, k_out=None):
  carried = _rows(jnp.exp(x.g_last_col) * state, x.clast)
  return carried + _mm_tn(x.k * (_k_out(x) if k_out is None else k_out), x.v)


def output(x: Sub, state, scale):
  return scale * (_mm(x.q * _q_in(x), state) + _mm(_scores(x, _pair_decay(x)), x.v))


def grads(x: Sub, state, dstate, do, scale):
  """Gradients of one sub-chunk given ``do`` and ``dS'`` (w.r.t. the leaving state).

  ``dG`` is the gradient w.r.t. the cumulated log-decay ``G`` of this sub-chunk; ``ops.py`` turns
  it into ``dg`` by a suffix sum inside the sub-chunk. Per key channel it is
  ``q_i dq_i - k_i dk_i`` plus, on the last row, ``Σ_V S' ⊙ dS'``, except that terms whose decay
  exponent is identically 0, and so do not depend on ``G``, are left out of all three: the
  diagonal scores ``A_ii`` and the last row's own ``k_l v_lᵀ`` in ``S'``. They would cancel
  exactly, but at O(1) size: under strong decays the true ``dG`` is ~``e^{g}`` and would drown
  in their rounding error. What remains carries at least one step of decay.

  Returns ``dq, dk, dG`` (this value block's share; fp32 ``[c, K]``), ``dv`` and ``dS`` (w.r.t.
  the entering state).
  """
  c = x.q.shape[0]
  row = lax.broadcasted_iota(jnp.int32, (c, c), 0)
  col = lax.broadcasted_iota(jnp.int32, (c, c), 1)
  last = lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1
  decay = _pair_decay(x)
  q_in, k_out = _q_in(x), _k_out(x)
  dv = scale * _mm_tn(_scores(x, decay), do) + _mm(x.k * k_out, dstate)
  # dA_ij = scale · do_i · v_j; off the diagonal it spreads over K by the pairwise decay.
  da = scale * _mm_nt(do, x.v)
  w = jnp.where((row == col)[:, :, None], 0.0, da[:, :, None] * decay)
  da_diag = jnp.sum(jnp.where(row == col, da, 0.0), axis=1, keepdims=True)  # [c, 1]
  dq_off = scale * q_in * _mm_nt(do, state) + jnp.sum(w * x.k[None, :, :], axis=1)
  dk_off = jnp.sum(w * x.q[:, None, :], axis=0)
  dk_state = k_out * _mm_nt(x.v, dstate)
  # Σ_V (S' - k_l v_lᵀ) ⊙ dS', as a [1, K] row broadcast to every row by a ones matmul (no
  # transpose of the [K, 1] column); S' - k_l v_lᵀ is built without its last term, not by a
  # subtraction that would cancel.
  s_excl = next_state(x, state, jnp.where(last, 0.0, k_out))
  boundary = _mm_nt(jnp.ones(do.shape, jnp.float32), s_excl * dstate)
  dg = (
    x.q * dq_off - x.k * (dk_off + jnp.where(last, 0.0, dk_state)) + jnp.where(last, boundary, 0.0)
  )
  dq = dq_off + da_diag * x.k
  dk = dk_off + da_diag * x.q + dk_state
  dstate_in = _rows(jnp.exp(x.g_last_col) * dstate, x.clast) + scale * _mm_tn(x.q * q_in, do)
  return dq, dk, dg, dv, dstate_in
