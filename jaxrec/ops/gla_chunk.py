"""A three-pass chunkwise form of gated linear attention, forward and backward (GLA §3.3-3.4).

``gated_linear_attention(..., method="three_pass")``. It is built for accelerators (bf16 matmuls
with fp32 accumulation, an associative pass over the chunk states, no stored per-level
intermediates), the structure of FLA's ``chunk_gla``; ``experiments/bench_peers_gpu.py`` times it
against that kernel and ``method="chunk"``. On the 2-core CPU it is exact but not faster than
``method="chunk"`` (BENCHMARKS.md: forward 1.3-2× slower, forward+backward even to 1.5×
slower), so ``"auto"`` does not pick it there.

Per batch row and head, ``S_t = diag(e^{g_t}) S_{t-1} + k_t v_tᵀ`` and ``o_t = scale · S_tᵀ q_t``,
with the sequence cut into chunks of ``C`` steps. Inside a chunk, with ``G_i = g_0 + ... + g_i``
(``i`` counted from the chunk's start, ``L`` its last step) and ``S`` the state entering it::

  o_i = scale · ((q_i ⊙ e^{G_i}) S + Σ_{j <= i} A_ij v_j)        A_ij = Σ_K q_i k_j e^{G_i - G_j}
  S'  = e^{G_L} ⊙ S + Σ_j (k_j ⊙ e^{G_L - G_j}) v_jᵀ

Three passes, as in FLA's ``chunk_gla``: (1) per chunk, all chunks at once, the decay factors and
the chunk's contribution ``u = Σ_j (k_j ⊙ e^{G_L - G_j}) v_jᵀ`` (one matmul); (2) the only
sequential part, ``S_{n+1} = e^{G_L} ⊙ S_n + u_n`` over the ``T / C`` chunk states, each state
written once, by an associative scan (``log2(T / C)`` rounds, where a serial loop of ``T / C``
steps is what costs on an accelerator); (3) per chunk, all at once, the outputs.

**Decay factors, all exponents <= 0.** ``e^{-G_j}`` overflows under strong decays, so ``A`` never
factors through one reference per chunk. The chunk is halved recursively: for the halves ``l, r``
of a block, with ``m`` the last step of ``l``, every pair ``i ∈ r, j ∈ l`` factors as

  e^{G_i - G_j} = e^{G_i - G_m} · e^{G_m - G_j}        (both exponents <= 0)

so the ``r × l`` block of ``A`` is one matmul of rescaled queries and keys. The factors are
products of decays over steps that happen in that order, built by doubling: the prefix products
``P_s`` (from a block's first step to ``i``) and suffix products ``Q_s`` (from after ``j`` to the
block's last step) of blocks of ``2s`` steps follow from those of ``s`` by one multiplication
(``P_2s = P_s · P_s(last of l)`` on ``r``, ``Q_2s = Q_s · P_s(last of r)`` on ``l``), so the factors
of every level cost one product each, not an ``exp``, and underflow to 0 rather than overflow.
The chunk's own ``e^{G_i}`` and ``e^{G_L - G_j}`` are the top level's ``P`` and ``Q``. The
recursion stops at diagonal blocks of ``b`` steps, whose scores are exact:
``e^{G_i - G_j}`` from log-decays cumulated inside the block, masked to ``-inf`` for ``j > i``
before the ``exp``. Small ``b`` costs fewer ``exp`` s, large ``b`` fewer, larger matmuls; ``b``
is a quarter chunk, at most 16 steps (FLA's sub-chunks of 16 in chunks of 64).

Resets (``segment_ids``): a step that starts a segment has decay 0 (the state before it is
dropped). Its factor 0 enters every product that spans it, so the levels need no masks; the
exact diagonal blocks mask pairs whose run of resets differs.

**Precision.** Matmul operands are in the input dtype (bf16 inputs run on tensor cores) with fp32
accumulation; decay factors, states and gradients accumulate in fp32 (fp64 for fp64 inputs).

**Backward** (a ``custom_vjp``; autodiff would store every level's rescaled operands). The chunk
states come from the forward pass (``T / C`` of them, not one per step); a reverse pass over
chunks carries ``dS``; then, per chunk at once, ``dq, dk, dv`` by the same levels, and the
gradient w.r.t. the cumulated log-decay by FLA's identity ``dG = q ⊙ dq - k ⊙ dk``
(+ ``Σ_V S' ⊙ dS'`` on the last row), ``dg_t = Σ_{s >= t} dG_s`` within the chunk. Terms whose
exponent is identically 0 (the diagonal ``A_ii``, the last step's own ``k_L v_Lᵀ`` in ``S'``)
cancel exactly in that identity but at O(1) size; they are left out before summing, so that
under strong decays ``dg`` (~``e^g``) does not drown in their rounding. A reset step's own decay
multiplies a dropped state: its gradient is 0.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


def chunkwise_gla(q, k, v, log_decay, h0, reset, *, scale, chunk_size):
  """Chunkwise gated linear attention (see the module docstring); ``gated_linear_attention``'s
  ``method="three_pass"``, which validates the arguments and casts them as below.

  Args:
    q: queries, ``[B, T, H, K]``; ``q, k, v`` in their common dtype are the matmul operands.
    k: keys, ``[B, T, H, K]``.
    v: values, ``[B, T, H, V]``.
    log_decay: ``[B, T, H, K]`` in the compute dtype (fp32, or fp64), ``<= 0``.
    h0: the state before the first step, ``[B, H, K, V]``, compute dtype.
    reset: bool ``[B, T]``, true where a segment starts, or ``None``.
    scale: query scale.
    chunk_size: ``C``, a power of two (a shorter one is used for a shorter ``T``); the exact
      diagonal blocks are ``b = min(C / 4, 16)`` steps (at least 1).

  Returns:
    ``(o [B, T, H, V], final_state [B, H, K, V])``, both in the compute dtype.
  """
  batch, t, heads, _ = q.shape
  c = min(chunk_size, 1 << max(t - 1, 0).bit_length())
  n = -(-t // c)
  pad = n * c - t
  mm = jnp.result_type(q, k, v)
  q, k, v = (_blocks(x.astype(mm), c, pad) for x in (q, k, v))
  g = _blocks(log_decay, c, pad)
  if reset is not None:
    reset = jnp.pad(reset, ((0, 0), (pad, 0))).reshape(batch, 1, n, c)
  opts = _Options(float(scale), max(1, min(c // 4, 16)))
  o, state = _chunk_gla(q, k, v, g, h0, reset, opts)
  o = jnp.moveaxis(o, 1, 3).reshape(batch, n * c, heads, -1)
  return o[:, pad:], state


def _blocks(x, c, pad):
  """``[B, T, H, D] -> [B, H, N, C, D]``, with ``pad`` steps of zeros (no input, no decay) in
  front: padding at the end would put identity steps after the last one, whose own ``k v ᵀ``
  term then no longer sits on a chunk's last row, where the backward pass expects it."""
  batch, t, heads, d = x.shape
  x = jnp.pad(x, ((0, 0), (pad, 0), (0, 0), (0, 0)))
  return jnp.moveaxis(x.reshape(batch, (pad + t) // c, c, heads, d), 3, 1)


class _Options(NamedTuple):
  scale: float
  diag_size: int


# ----------------------------------------------------------------------------------------------
# Shared pieces. Per-chunk tensors are [B, H, N, C, D]; a level of block size s views them as
# [..., C / 2s, 2, s, D] (axis -3 picks the left or right half of each block of 2s steps).


def _mm(spec, a, b, dtype):
  """``einsum`` with both operands in ``dtype`` and the accumulation in fp32 (or fp64)."""
  acc = jnp.promote_types(dtype, jnp.float32)
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=acc)


def _halves(x, s):
  *lead, c, d = x.shape
  x = x.reshape(*lead, c // (2 * s), 2, s, d)
  return x[..., 0, :, :], x[..., 1, :, :]


def _join(left, right):
  """Inverse of ``_halves``."""
  *lead, pairs, s, d = left.shape
  return jnp.stack([left, right], axis=-3).reshape(*lead, pairs * 2 * s, d)


def _add_half(acc, x, right):
  """Adds ``x [..., C / 2s, s, D]`` to the right (or left) halves of ``acc [..., C, D]``."""
  zero = jnp.zeros_like(x)
  return acc + (_join(zero, x) if right else _join(x, zero))


def _diag_view(x, b):
  *lead, c, d = x.shape
  return x.reshape(*lead, c // b, b, d)


class _Decays(NamedTuple):
  """The decay factors of every chunk (fp32): ``prefix`` ``e^{G_i}`` and ``suffix``
  ``e^{G_L - G_j}`` ``[..., C, K]`` (0 across a reset); ``levels``, per level ``s = b, 2b, ...,
  C / 2``, the right halves' prefix and left halves' suffix factors ``[..., C / 2s, s, K]``; and
  ``diag``, ``e^{G_i - G_j}`` inside the diagonal blocks for ``j < i`` in the same segment, else
  0, ``[..., C / b, b, b, K]`` (``None`` for ``b = 1``)."""

  prefix: jax.Array
  suffix: jax.Array
  levels: tuple
  diag: jax.Array | None


def _decays(g, reset, b) -> _Decays:
  c = g.shape[-2]
  # Log-decay cumulated inside each diagonal block, by a matmul with a triangle of ones: XLA:CPU
  # lowers a cumsum to a reduce-window that it fuses into, and recomputes in, every consumer.
  tri = jnp.tril(jnp.ones((b, b), g.dtype))
  gb = jnp.einsum("ij,...jk->...ik", tri, _diag_view(g, b), precision=lax.Precision.HIGHEST)
  prefix, suffix = jnp.exp(gb), jnp.exp(gb[..., -1:, :] - gb)
  pair = jnp.tril(jnp.ones((b, b), bool), -1)
  if reset is not None:
    # Resets so far in the block: two steps share a segment iff their counts are equal.
    count = jnp.cumsum(reset.reshape(*reset.shape[:-1], c // b, b).astype(jnp.int32), axis=-1)
    prefix = jnp.where((count == 0)[..., None], prefix, 0.0)
    suffix = jnp.where((count == count[..., -1:])[..., None], suffix, 0.0)
    pair = pair & (count[..., :, None] == count[..., None, :])
  diag = None
  if b > 1:
    diff = gb[..., :, None, :] - gb[..., None, :, :]
    diag = jnp.exp(jnp.where(pair[..., None], diff, -jnp.inf))
  prefix, suffix = prefix.reshape(g.shape), suffix.reshape(g.shape)

  levels = []
  s = b
  while s < c:
    p_l, p_r = _halves(prefix, s)
    q_l, q_r = _halves(suffix, s)
    levels.append((p_r, q_l))
    prefix = _join(p_l, p_r * p_l[..., -1:, :])
    suffix = _join(q_l * p_r[..., -1:, :], q_r)
    s *= 2
  return _Decays(prefix, suffix, tuple(levels), diag)


def _diag_scores(q, k, decays: _Decays, b):
  """Scores inside the diagonal blocks, ``[..., C / b, b, b]``, fp32."""
  qb, kb = (_diag_view(x, b).astype(decays.prefix.dtype) for x in (q, k))
  own = jnp.sum(qb * kb, axis=-1)  # A_ii: exponent 0
  scores = own[..., :, None] * jnp.eye(b, dtype=own.dtype)
  if decays.diag is not None:
    scores = scores + jnp.sum(qb[..., :, None, :] * kb[..., None, :, :] * decays.diag, axis=-1)
  return scores


def _combine(x, y):
  """``(a1, u1)`` then ``(a2, u2)``: ``h -> a2 (a1 h + u1) + u2``."""
  return x[0] * y[0], y[0] * x[1] + y[1]


def _scan_chunks(a, u, h0, reverse):
  """``h_n = a_n ⊙ h_{n-1} + u_n`` over axis 2 (chunks) of ``u [B, H, N, K, V]``, decays
  ``a [B, H, N, K]``, from ``h0``, by an associative scan; returns the state *entering* every
  chunk ``[B, H, N, K, V]`` and the one after the last. With ``reverse`` the chunks are taken
  from last to first."""
  a = a[..., None]
  first = -1 if reverse else 0
  u = u.at[:, :, first].add(a[:, :, first] * h0)  # fold h0 into the first step
  _, after = lax.associative_scan(_combine, (a, u), reverse=reverse, axis=2)
  h0 = h0[:, :, None]
  if reverse:
    return jnp.concatenate([after[:, :, 1:], h0], axis=2), after[:, :, 0]
  return jnp.concatenate([h0, after[:, :, :-1]], axis=2), after[:, :, -1]


# ----------------------------------------------------------------------------------------------
# Forward and backward.


def _forward(q, k, v, g, h0, reset, opts: _Options):
  """``(o, final state, states entering every chunk)``."""
  mm, b = q.dtype, opts.diag_size
  dec = _decays(g, reset, b)
  u = _mm("...ck,...cv->...kv", k * dec.suffix, v, mm)
  s_in, s_last = _scan_chunks(dec.prefix[..., -1, :], u, h0, False)
  o = _mm("...ck,...kv->...cv", q * dec.prefix, s_in, mm)
  o_diag = _mm("...ij,...jv->...iv", _diag_scores(q, k, dec, b), _diag_view(v, b), mm)
  o = o + o_diag.reshape(o.shape)
  for p_r, q_l in dec.levels:
    s = p_r.shape[-2]
    (_, q_r), (k_l, _), (v_l, _) = (_halves(x, s) for x in (q, k, v))
    scores = _mm("...ik,...jk->...ij", q_r * p_r, k_l * q_l, mm)
    o = _add_half(o, _mm("...ij,...jv->...iv", scores, v_l, mm), right=True)
  return opts.scale * o, s_last, s_in


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _chunk_gla(q, k, v, g, h0, reset, opts):
  o, state, _ = _forward(q, k, v, g, h0, reset, opts)
  return o, state


def _chunk_gla_fwd(q, k, v, g, h0, reset, opts):
  o, state, s_in = _forward(q, k, v, g, h0, reset, opts)
  return (o, state), (q, k, v, g, reset, s_in)


def _chunk_gla_bwd(opts: _Options, res, cts):
  q, k, v, g, reset, s_in = res
  do, dstate = cts
  mm, cdt, b = q.dtype, g.dtype, opts.diag_size
  c = q.shape[-2]
  dec = _decays(g, reset, b)
  do = opts.scale * do.astype(cdt)
  decay = dec.prefix[..., -1, :]
  # dS leaving every chunk, by the reverse pass over chunks: dS = e^{G_L} ⊙ dS' + Σ_i q_in_i do_iᵀ.
  w = _mm("...ck,...cv->...kv", q * dec.prefix, do, mm)
  ds_out, dh0 = _scan_chunks(decay, w, dstate, True)

  # Everything below leaves out the terms of exponent 0 (see dG), added back at the end.
  dq = dec.prefix * _mm("...cv,...kv->...ck", do, s_in, mm)
  dk = jnp.zeros_like(dq)
  dk_state = dec.suffix * _mm("...cv,...kv->...ck", v, ds_out, mm)
  dv = _mm("...ck,...kv->...cv", k * dec.suffix, ds_out, mm)
  for p_r, q_l in dec.levels:
    s = p_r.shape[-2]
    (_, q_r), (k_l, _), (v_l, _), (_, do_r) = (_halves(x, s) for x in (q, k, v, do))
    q_r, k_l = q_r * p_r, k_l * q_l
    scores = _mm("...ik,...jk->...ij", q_r, k_l, mm)
    dscores = _mm("...iv,...jv->...ij", do_r, v_l, mm)
    dv = _add_half(dv, _mm("...ij,...iv->...jv", scores, do_r, mm), right=False)
    dq = _add_half(dq, p_r * _mm("...ij,...jk->...ik", dscores, k_l, mm), right=True)
    dk = _add_half(dk, q_l * _mm("...ij,...ik->...jk", dscores, q_r, mm), right=False)
  qf, kf = q.astype(cdt), k.astype(cdt)
  do_b = _diag_view(do, b)
  dscores = _mm("...iv,...jv->...ij", do_b, _diag_view(v, b), mm)
  dv = dv + _mm("...ij,...iv->...jv", _diag_scores(q, k, dec, b), do_b, mm).reshape(dv.shape)
  if dec.diag is not None:
    # As matmuls over the [b, b, K] weights: XLA:CPU (jax 0.10.2) miscompiles these two
    # reductions written as broadcast products summed over a block axis (a segfault at run time).
    w_off = dscores[..., None] * dec.diag  # 0 on and above the diagonal
    dq = dq + jnp.einsum("...ijk,...jk->...ik", w_off, _diag_view(kf, b)).reshape(dq.shape)
    dk = dk + jnp.einsum("...ijk,...ik->...jk", w_off, _diag_view(qf, b)).reshape(dk.shape)

  # dG = q ⊙ dq - k ⊙ dk, and on the last row Σ_V S' ⊙ dS' = e^{G_L} Σ_V S ⊙ dS' + Σ_j k_j ⊙
  # dk_state_j; the last row's own k_L ⊙ dk_state_L cancels there and is left out.
  last = (jnp.arange(c) == c - 1)[:, None]
  not_last = jnp.where(last, 0.0, kf * dk_state)
  boundary = decay * jnp.sum(s_in * ds_out, axis=-1) + jnp.sum(not_last, axis=-2)
  dlog = qf * dq - kf * dk - not_last + jnp.where(last, boundary[..., None, :], 0.0)
  # dg_t = Σ_{s >= t} dG_s inside the chunk (a triangle of ones, as for the cumsum).
  upper = jnp.triu(jnp.ones((c, c), cdt))
  dg = jnp.einsum("ij,...jk->...ik", upper, dlog, precision=lax.Precision.HIGHEST)
  if reset is not None:
    dg = jnp.where(reset[..., None], 0.0, dg)  # a reset step's decay multiplies a dropped state

  own = jnp.diagonal(dscores, axis1=-2, axis2=-1).reshape(*dq.shape[:-1], 1)  # dA_ii
  dq = dq + own * kf
  dk = dk + own * qf + dk_state
  return dq.astype(mm), dk.astype(mm), dv.astype(v.dtype), dg, dh0, None


_chunk_gla.defvjp(_chunk_gla_fwd, _chunk_gla_bwd)
