"""The math of one chunk of the mLSTM, shared by the forward and backward kernels of ``kernel.py``.

Per batch row and head, a chunk of ``C`` steps is entered with the state ``(C_in, n_in, m_in)``.
With ``b_t = Σ_{s≤t} log f_s`` summed from the chunk's start and ``S_tj = Σ_{j<s≤t} log f_s``,
step ``t`` sees the entering state with log-weight ``b_t + m_in`` and step ``j <= t`` with
``S_tj + ĩ_j``. ``S`` is one ``[C, C]`` matmul of triangles, not ``b_t - b_j``: after strong
forgetting both running sums are large and their difference loses the bits that matter; with
every ``log f <= 0`` each sum is accurate to a few ulps.
Its stabilizer ``m_t`` is the maximum of those, and, with ``q`` already scaled::

  num_t = e^{b_t + m_in - m_t} q_tᵀC_in + Σ_j e^{S_tj + ĩ_j - m_t} (q_t·k_j) v_j
  den_t = e^{b_t + m_in - m_t} q_t·n_in + Σ_j e^{S_tj + ĩ_j - m_t} (q_t·k_j)
  h_t   = num_t / (max(|den_t|, e^{-m_t}) + ε)

The leaving state has ``m' = max(b_last + m_in, max_j (S_lj + ĩ_j))`` (``l`` the last step) and
``C' = e^{b_last + m_in - m'} C_in + Σ_j e^{S_lj + ĩ_j - m'} k_j v_jᵀ`` (``n'`` alike).
Every exponent is a log-weight minus a maximum that includes it, so ``<= 0``. Segments enter as
masks precomputed in XLA: which pairs share a segment and are causal (``pair``), which steps see
the entering state (``cin``), which reach the leaving one (``mout``); masked log-weights are
``-∞`` before ``exp``.

The stabilizers are constants under differentiation (the value depends on them only through
``ε``), so the backward pass is that of a linear map with fixed weights, plus the gradient of each
log-weight, which becomes the gradients of ``log f``, ``ĩ`` and ``m_in``. Everything is fp32.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class Chunk(NamedTuple):
  """One chunk: ``q, k`` ``[C, K]``, ``v`` ``[C, V]``, ``f`` (``log f``, 0 at segment starts)
  and ``i`` ``[C]``, ``pair`` ``[C, C]``, ``cin, mout`` ``[C]`` (masks as bools)."""

  q: jax.Array
  k: jax.Array
  v: jax.Array
  f: jax.Array
  i: jax.Array
  pair: jax.Array
  cin: jax.Array
  mout: jax.Array


class Weights(NamedTuple):
  """The stabilized weights of one chunk: ``w`` ``[C, C]`` (pairs), ``w_in`` ``[C]`` (entering
  state), ``m`` ``[C]`` (stabilizers), ``k_gain`` ``[C]`` (into the leaving state), ``alpha``
  ``[]`` (entering into leaving state), ``m_out`` ``[]`` (the leaving stabilizer)."""

  w: jax.Array
  w_in: jax.Array
  m: jax.Array
  k_gain: jax.Array
  alpha: jax.Array
  m_out: jax.Array


def load(refs, n) -> Chunk:
  """Chunk ``n`` of the block from the input refs ``(q, k, v, f, i, pair, cin, mout)``."""
  q, k, v, f, i, pair, cin, mout = (ref[n] for ref in refs)
  f32 = jnp.float32
  return Chunk(q.astype(f32), k.astype(f32), v.astype(f32), f, i, pair > 0, cin > 0, mout > 0)


def _mm(a, b, contract):
  return lax.dot_general(
    a, b, (contract, ((), ())), precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
  )


def _exp_where(mask, exponent):
  return jnp.where(mask, jnp.exp(jnp.where(mask, exponent, 0.0)), 0.0)


def _triangles(c):
  """``L[t, s] = [s <= t]`` and ``U[s, j] = [s > j]``, fp32 ``[C, C]``."""
  row = lax.broadcasted_iota(jnp.int32, (c, c), 0)
  col = lax.broadcasted_iota(jnp.int32, (c, c), 1)
  return (row >= col).astype(jnp.float32), (row > col).astype(jnp.float32)


def _sums(x: Chunk):
  """``b [C]`` and ``S = L diag(log f) U`` ``[C, C]``."""
  lower, upper = _triangles(x.f.shape[0])
  b = jnp.sum(lower * x.f[None, :], axis=1)
  return b, _mm(lower, x.f[:, None] * upper, ((1,), (0,)))


def weights(x: Chunk, m_in) -> Weights:
  """The stabilized weights of the chunk entered with stabilizer ``m_in`` (shape ``[]``)."""
  b, sums = _sums(x)
  log_w = jnp.where(x.pair, sums + x.i[None, :], -jnp.inf)
  log_in = jnp.where(x.cin, b + m_in, -jnp.inf)
  m = jnp.maximum(jnp.max(log_w, axis=1), log_in)
  b_last = b[-1]
  a = jnp.where(x.mout, sums[-1] + x.i, -jnp.inf)
  through = x.cin[-1]
  g = jnp.where(through, b_last + m_in, -jnp.inf)
  m_out = jnp.maximum(g, jnp.max(a))
  return Weights(
    w=_exp_where(x.pair, log_w - m[:, None]),
    w_in=_exp_where(x.cin, log_in - m),
    m=m,
    k_gain=_exp_where(x.mout, a - m_out),
    alpha=_exp_where(through, g - m_out),
    m_out=m_out,
  )


def _numerator_denominator(x: Chunk, wt: Weights, c_in, n_in):
  scores = _mm(x.q, x.k, ((1,), (1,))) * wt.w
  num = wt.w_in[:, None] * _mm(x.q, c_in, ((1,), (0,))) + _mm(scores, x.v, ((1,), (0,)))
  den = wt.w_in * jnp.sum(x.q * n_in[None, :], axis=1) + jnp.sum(scores, axis=1)
  return scores, num, den


def _denominator(den, m, eps):
  return jnp.maximum(jnp.abs(den), jnp.exp(-m)) + eps


def output(x: Chunk, wt: Weights, c_in, n_in, eps):
  """``h`` ``[C, V]`` of the chunk entered with ``(c_in [K, V], n_in [K])``."""
  _, num, den = _numerator_denominator(x, wt, c_in, n_in)
  return num / _denominator(den, wt.m, eps)[:, None]


def next_state(x: Chunk, wt: Weights, c_in, n_in):
  """The memory and normalizer leaving the chunk."""
  k_out = x.k * wt.k_gain[:, None]
  return wt.alpha * c_in + _mm(k_out, x.v, ((0,), (0,))), wt.alpha * n_in + jnp.sum(k_out, axis=0)


def grads(x: Chunk, wt: Weights, c_in, n_in, dh, dc, dn, eps):
  """Gradients of one chunk given ``dh`` ``[C, V]`` and ``(dc, dn)`` w.r.t. the leaving state.

  Returns ``dq, dk`` ``[C, K]``, ``dv`` ``[C, V]``, ``df, di`` ``[C]``, ``dm_in`` ``[]`` and the
  gradients ``(dc_in, dn_in)`` w.r.t. the entering state.
  """
  c = x.q.shape[0]
  scores, num, den = _numerator_denominator(x, wt, c_in, n_in)
  denom = _denominator(den, wt.m, eps)
  h = num / denom[:, None]
  dnum = dh / denom[:, None]
  # d/d den of num / (max(|den|, e^{-m}) + ε): only where |den| is the larger.
  dden = jnp.where(
    jnp.abs(den) > jnp.exp(-wt.m), -jnp.sum(dh * h, axis=1) / denom * jnp.sign(den), 0.0
  )
  k_out = x.k * wt.k_gain[:, None]
  # num = w_in q C_in + S v, den = w_in q·n_in + S 1, S = (q kᵀ) ⊙ w.
  ds = _mm(dnum, x.v, ((1,), (1,))) + dden[:, None]
  dqk = ds * wt.w
  dv = _mm(scores, dnum, ((0,), (0,))) + _mm(k_out, dc, ((1,), (0,)))
  q_state = _mm(dnum, c_in, ((1,), (1,))) + dden[:, None] * n_in[None, :]
  dq = _mm(dqk, x.k, ((1,), (0,))) + wt.w_in[:, None] * q_state
  k_state = _mm(x.v, dc, ((1,), (1,))) + dn[None, :]
  dk = _mm(dqk, x.q, ((0,), (0,))) + wt.k_gain[:, None] * k_state
  # Gradients of the log-weights: d log w = dS ⊙ S, and alike for the state terms.
  dlog_w = ds * scores
  dlog_in = jnp.sum(x.q * q_state, axis=1) * wt.w_in
  dlog_out = jnp.sum(x.k * k_state, axis=1) * wt.k_gain
  dlog_alpha = wt.alpha * (jnp.sum(c_in * dc) + jnp.sum(n_in * dn))
  # log w_tj = S_tj + ĩ_j - m_t, log w_in = b_t + m_in - m_t,
  # log k_gain_j = S_lj + ĩ_j - m', log α = b_l + m_in - m' (l the last step); then
  # b = L log f and S = L diag(log f) U give d log f = Lᵀ db + rowsum((Lᵀ dS) ⊙ U).
  last = lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1
  dsums = dlog_w + jnp.where(last, dlog_out[None, :], 0.0)
  db = dlog_in + jnp.where(last[:, 0], dlog_alpha, 0.0)
  lower, upper = _triangles(c)
  df = _mm(lower, db[:, None], ((0,), (0,)))[:, 0]
  df = df + jnp.sum(_mm(lower, dsums, ((0,), (0,))) * upper, axis=1)
  di = jnp.sum(dlog_w, axis=0) + dlog_out
  dm_in = jnp.sum(dlog_in) + dlog_alpha
  q_in = x.q * wt.w_in[:, None]
  dc_in = wt.alpha * dc + _mm(q_in, dnum, ((0,), (0,)))
  dn_in = wt.alpha * dn + jnp.sum(q_in * dden[:, None], axis=0)
  return dq, dk, dv, df, di, dm_in, dc_in, dn_in
