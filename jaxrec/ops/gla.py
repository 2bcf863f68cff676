"""Gated linear attention: a matrix state whose key axis decays.

Per batch row and head, with a ``[K, V]`` state ``S`` (Yang et al. 2024, GLA, eq. 1)::

  S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ        o_t = scale · S_tᵀ q_t

The log-decay ``g_t`` (``log_decay``, expected ``<= 0``) is either per key channel, ``[B, T, H, K]``
(GLA, RWKV-6 style), or one scalar per head, ``[B, T, H]`` (RetNet, Mamba-2/SSD style). Axes
(``jaxrec.typing``): ``B`` batch, ``T`` time, ``H`` heads, ``K`` query/key width ``key_dim``,
``V`` value width ``value_dim``.

Forms, selected with ``method``:

* ``"sequential"``: ``lax.scan`` of the recurrence over ``T``; the reference.
* ``"chunk"``: chunkwise parallel (GLA §3.3, SSD): exact attention-like scores inside chunks of
  ``C`` steps, and a scan over the ``T / C`` chunk states in between; all in log space, see
  ``_chunked``.
* ``"three_pass"``: the chunkwise form restructured as FLA's ``chunk_gla`` (``gla_chunk``): chunk
  states written once and passed on by an associative scan, in-chunk scores by bounded-exponent
  levels, matmul operands in the input dtype, a recomputing custom VJP. The form to try on
  GPU/TPU; on CPU ``"chunk"`` is as fast or faster (BENCHMARKS.md).
* ``"pallas"``: the kernel in ``pallas_kernels.gla`` (interpret mode on CPU).

All gates, states and accumulations are fp32 (fp64 for fp64 inputs); outputs come back in the
dtype of ``q``. The exception is ``"three_pass"``'s matmul operands, which stay in the inputs'
dtype (bf16 inputs: bf16 operands with fp32 accumulation, as on tensor cores). Gradients of
``"sequential"`` and ``"chunk"`` are plain autodiff; ``"three_pass"`` and ``"pallas"`` have custom
VJPs (reverse mode only).
"""

from typing import Literal, get_args

import jax.numpy as jnp
from jax import lax

from jaxrec.ops import _checks, _dispatch, gla_chunk
from jaxrec.ops.segments import segment_starts
from jaxrec.typing import (
  HeadOutputs,
  Keys,
  LogDecay,
  MatrixState,
  Queries,
  SegmentIds,
  StepKeys,
  StepLogDecay,
  StepQueries,
  StepValues,
  Values,
)
from pallas_kernels import gla as pallas_gla

GLAMethod = Literal["auto", "sequential", "chunk", "three_pass", "pallas"]
METHODS = get_args(GLAMethod)


def gated_linear_attention(
  q: Queries,
  k: Keys,
  v: Values,
  log_decay: LogDecay,
  *,
  initial_state: MatrixState | None = None,
  output_final_state: bool = False,
  segment_ids: SegmentIds | None = None,
  scale: float | None = None,
  chunk_size: int = 64,
  method: GLAMethod = "auto",
) -> tuple[HeadOutputs, MatrixState | None]:
  """Runs gated linear attention over axis 1.

  Args:
    q: queries, ``[B, T, H, K]``.
    k: keys, ``[B, T, H, K]``.
    v: values, ``[B, T, H, V]``.
    log_decay: log of the state decay, ``[B, T, H, K]`` (per key channel) or ``[B, T, H]`` (per
      head); expected ``<= 0`` and used as given.
    initial_state: state before the first step, ``[B, H, K, V]``; zeros when ``None``.
    output_final_state: also return the state after the last step.
    segment_ids: integer ``[B, T]``; the state restarts from zero wherever the id changes
      (packed documents, see ``segment_starts``). ``initial_state`` only feeds the first segment.
    scale: query scale; ``K ** -0.5`` when ``None``.
    chunk_size: steps per chunk for ``"chunk"``, ``"three_pass"`` and ``"pallas"``, a power of
      two (the XLA forms use a shorter one when ``T`` is shorter). 64 is the fastest on CPU.
    method: ``"auto" | "sequential" | "chunk" | "three_pass" | "pallas"`` (the module
      docstring). ``"auto"`` is ``"pallas"`` on TPU and ``"chunk"`` elsewhere, the fastest
      measured (BENCHMARKS.md). It does not pick ``"three_pass"`` on CPU, where that form is
      1.3-2× slower forward and even to 1.5× slower forward+backward; ``"three_pass"`` is the
      form to try on GPU/TPU, not yet timed there.

  Returns:
    ``(o, final_state)``: ``o`` ``[B, T, H, V]`` in the dtype of ``q``, and, when
    ``output_final_state``, the state after the last step ``[B, H, K, V]`` in fp32 (fp64 for
    fp64 inputs), else ``None``.
  """
  _validate(
    q=q,
    k=k,
    v=v,
    log_decay=log_decay,
    initial_state=initial_state,
    segment_ids=segment_ids,
    chunk_size=chunk_size,
    method=method,
  )
  batch, _, heads, key_dim = q.shape
  out_dtype = q.dtype
  cdt = _checks.compute_dtype(q, k, v, log_decay)
  scale = key_dim**-0.5 if scale is None else scale
  if initial_state is None:
    h0 = jnp.zeros((batch, heads, key_dim, v.shape[-1]), cdt)
  else:
    h0 = initial_state.astype(cdt)
  reset = None if segment_ids is None else segment_starts(segment_ids)

  method = _resolve_method(method)
  if method == "pallas":
    o, state = _pallas(
      q=q,
      k=k,
      v=v,
      log_decay=log_decay.astype(cdt),
      h0=h0,
      reset=reset,
      scale=scale,
      chunk_size=chunk_size,
    )
  elif method == "three_pass":
    if log_decay.ndim == 3:
      log_decay = jnp.broadcast_to(log_decay[..., None], q.shape)
    # q, k, v keep their dtype: they are the matmul operands (bf16 ones run on tensor cores).
    o, state = gla_chunk.chunkwise_gla(
      q,
      k,
      v,
      log_decay.astype(cdt),
      h0,
      reset,
      scale=scale,
      chunk_size=chunk_size,
    )
  else:
    q, k, v, log_decay = (x.astype(cdt) for x in (q, k, v, log_decay))
    forms = dict(q=q, k=k, v=v, log_decay=log_decay, h0=h0, reset=reset, scale=scale)
    if method == "sequential":
      o, state = _sequential(**forms)
    else:
      o, state = _chunked(**forms, chunk_size=chunk_size)
  return o.astype(out_dtype), state if output_final_state else None


def gated_linear_attention_step(
  q: StepQueries,
  k: StepKeys,
  v: StepValues,
  log_decay: StepLogDecay,
  state: MatrixState,
  *,
  scale: float | None = None,
) -> tuple[StepValues, MatrixState]:
  """One decoding step of ``gated_linear_attention``.

  Args:
    q: query, ``[B, H, K]``.
    k: key, ``[B, H, K]``.
    v: value, ``[B, H, V]``.
    log_decay: ``[B, H, K]`` or ``[B, H]``.
    state: the state before this step, ``[B, H, K, V]``.
    scale: query scale; ``K ** -0.5`` when ``None``.

  Returns:
    ``(o, new_state)``: ``o`` ``[B, H, V]`` in the dtype of ``q``, ``new_state`` ``[B, H, K, V]``
    in fp32 (fp64 for fp64 inputs).
  """
  _validate_step(q, k, v, log_decay, state)
  cdt = _checks.compute_dtype(q, k, v, log_decay)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  new_state = _recur(state.astype(cdt), *(x.astype(cdt) for x in (k, v, log_decay)))
  o = _readout(q.astype(cdt), new_state, scale)
  return o.astype(q.dtype), new_state


# ----------------------------------------------------------------------------------------------
# Validation and dispatch.


def _validate(*, q, k, v, log_decay, initial_state, segment_ids, chunk_size, method):
  _checks.check_choice("method", method, METHODS)
  for name, x in (("q", q), ("k", k), ("v", v), ("log_decay", log_decay)):
    _checks.check_float(name, x)
  _checks.check_rank("q", q, 4, "[B, T, H, K]")
  batch, t, heads, key_dim = q.shape
  _checks.check_shape("k", k, q.shape, "[B, T, H, K] (the shape of q)")
  _checks.check_rank("v", v, 4, "[B, T, H, V]")
  _checks.check_shape("v", v, (batch, t, heads, v.shape[-1]), "[B, T, H, V] (B, T, H of q)")
  _check_decay_shape(log_decay, q.shape, "[B, T, H, K] or [B, T, H]")
  if initial_state is not None:
    _checks.check_float("initial_state", initial_state)
    want = (batch, heads, key_dim, v.shape[-1])
    _checks.check_shape("initial_state", initial_state, want, "[B, H, K, V]")
  _checks.check_segment_ids(segment_ids, (batch, t))
  _checks.check_power_of_two("chunk_size", chunk_size)


def _validate_step(q, k, v, log_decay, state):
  for name, x in (("q", q), ("k", k), ("v", v), ("log_decay", log_decay), ("state", state)):
    _checks.check_float(name, x)
  _checks.check_rank("q", q, 3, "[B, H, K]")
  batch, heads, key_dim = q.shape
  _checks.check_shape("k", k, q.shape, "[B, H, K] (the shape of q)")
  _checks.check_rank("v", v, 3, "[B, H, V]")
  _checks.check_shape("v", v, (batch, heads, v.shape[-1]), "[B, H, V] (B, H of q)")
  _check_decay_shape(log_decay, q.shape, "[B, H, K] or [B, H]")
  _checks.check_shape("state", state, (batch, heads, key_dim, v.shape[-1]), "[B, H, K, V]")


def _check_decay_shape(log_decay, q_shape, axes):
  if tuple(jnp.shape(log_decay)) not in (tuple(q_shape), tuple(q_shape[:-1])):
    raise ValueError(
      f"log_decay: expected shape {tuple(q_shape)} or {tuple(q_shape[:-1])} {axes}, "
      f"got {tuple(jnp.shape(log_decay))}"
    )


def _resolve_method(method: GLAMethod) -> GLAMethod:
  if method != "auto":
    return method
  # Measured in BENCHMARKS.md: on an H200 the chunkwise XLA form is 3-5x faster than the Triton
  # kernel (whose chunk loop runs in one program per head), and on CPU it is 3-4x faster than the
  # sequential scan for training. The kernel is the TPU path (Mosaic, chunk axis "arbitrary").
  # "three_pass" is 1.3-2x slower than "chunk" forward on CPU and at best even forward+backward
  # (its time goes to layout copies there, not matmuls). To confirm on GPU (issue 13):
  # experiments/bench_peers_gpu.py times "chunk" and "three_pass" against FLA's chunk_gla; if
  # "three_pass" wins there, "auto" picks it on GPU.
  return "pallas" if _dispatch.default_backend() == "tpu" else "chunk"


def _pallas(*, q, k, v, log_decay, h0, reset, scale, chunk_size):
  t = q.shape[1]
  if log_decay.ndim == 3:
    log_decay = jnp.broadcast_to(log_decay[..., None], q.shape)
  pad = -t % chunk_size
  if pad:
    # Zero inputs and zero log-decay leave the state untouched, and padding steps start no
    # segment: they stay in the last one.
    q, k, v, log_decay = (
      jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v, log_decay)
    )
    if reset is not None:
      reset = jnp.pad(reset, ((0, 0), (0, pad)))
  o, state = pallas_gla.chunk_gla(
    q,
    k,
    v,
    log_decay,
    initial_state=h0.astype(jnp.float32),
    segment_starts=reset,
    scale=scale,
    chunk_size=chunk_size,
    interpret=_dispatch.pallas_interpret(),
  )
  return o[:, :t], state


# ----------------------------------------------------------------------------------------------
# The recurrence, one step at a time.


def _recur(state, k, v, log_decay):
  """``S <- diag(exp(g)) S + k vᵀ`` for one step; ``k [B, H, K]``, ``g [B, H, K]`` or ``[B, H]``."""
  decay = jnp.exp(log_decay)
  decay = decay[..., None] if log_decay.ndim == k.ndim else decay[..., None, None]
  return decay * state + k[..., :, None] * v[..., None, :]


def _readout(q, state, scale):
  return scale * jnp.einsum("bhk,bhkv->bhv", q, state)


def _sequential(*, q, k, v, log_decay, h0, reset, scale):
  def step(state, x):
    q_t, k_t, v_t, g_t, reset_t = x
    if reset_t is not None:
      state = jnp.where(reset_t[:, None, None, None], 0.0, state)
    state = _recur(state, k_t, v_t, g_t)
    return state, _readout(q_t, state, scale)

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, log_decay))
  xs += (None if reset is None else reset.T,)
  state, o = lax.scan(step, h0, xs)
  return jnp.moveaxis(o, 0, 1), state


# ----------------------------------------------------------------------------------------------
# The chunkwise-parallel form.


def _chunked(*, q, k, v, log_decay, h0, reset, scale, chunk_size):
  """Chunkwise form. With ``G`` the cumulative log-decay inside a chunk (``G_0 = g_0``) and
  ``S`` the state entering it::

    o_i = (q_i ⊙ e^{G_i}) S + Σ_{j <= i} (Σ_K q_i k_j e^{G_i - G_j}) v_j
    S'  = e^{G_last} ⊙ S + Σ_j (k_j ⊙ e^{G_last - G_j}) v_jᵀ

  Every exponent is a decay over steps that actually happen in that order, so it is ``<= 0``
  and nothing overflows, however small the decays (``_intra_scores`` keeps that true for
  per-channel decays). Resets (``segment_ids``) are masks on those terms.
  """
  batch, t, heads, _ = q.shape
  scalar = log_decay.ndim == 3
  # Short inputs use a shorter chunk, still a power of two.
  c = min(chunk_size, 1 << max(t - 1, 0).bit_length())
  n = -(-t // c)
  pad = n * c - t

  def blocks(x):  # [B, T, H, ...] -> [B, H, n, C, ...], padded with zeros (no input, no decay)
    x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(batch, n, c, heads, *x.shape[3:]), 3, 1)

  q, k, v, g = (blocks(x) for x in (q * scale, k, v, log_decay))
  g = _chunk_cumsum(g, scalar)
  g_k = g[..., None] if scalar else g  # broadcastable against the K axis
  g_last = g_k[:, :, :, -1:]

  # Segments, local to each chunk: `run` counts the resets up to each step of its chunk, so two
  # steps share a segment iff their counts are equal, and the incoming state is live while the
  # count is 0.
  if reset is not None:
    reset = jnp.pad(reset, ((0, 0), (0, pad))).reshape(batch, 1, n, c)
    run = jnp.cumsum(reset.astype(jnp.int32), axis=-1)
    live_in = (run == 0)[..., None]
    live_out = (run == run[..., -1:])[..., None]
    same = run[..., :, None] == run[..., None, :]

  # Chunk states (the only sequential part): S_{n+1} = a_n ⊙ S_n + u_n.
  k_out = k * jnp.exp(g_last - g_k)
  chunk_decay = jnp.exp(g_last[:, :, :, 0])  # [B, H, n, K or 1]
  if reset is not None:
    k_out = jnp.where(live_out, k_out, 0.0)
    chunk_decay = jnp.where(live_in[..., -1, :], chunk_decay, 0.0)
  u = jnp.einsum("bhnck,bhncv->bhnkv", k_out, v)

  def carry(state, x):
    a, u_n = x
    return a[..., None] * state + u_n, state  # emit the state entering the chunk

  state, s_in = lax.scan(carry, h0, (jnp.moveaxis(chunk_decay, 2, 0), jnp.moveaxis(u, 2, 0)))
  s_in = jnp.moveaxis(s_in, 0, 2)

  q_in = q * jnp.exp(g_k)
  if reset is not None:
    q_in = jnp.where(live_in, q_in, 0.0)
  o = jnp.einsum("bhnck,bhnkv->bhncv", q_in, s_in)

  scores = _intra_scores(q, k, g, scalar)
  if reset is not None:
    scores = jnp.where(same, scores, 0.0)
  o = o + jnp.einsum("bhnij,bhnjv->bhniv", scores, v)
  o = jnp.moveaxis(o, 1, 3).reshape(batch, n * c, heads, -1)
  return o[:, :t], state


def _chunk_cumsum(g, scalar):
  """Inclusive cumulative sum over the chunk axis (3) of ``[B, H, n, C, ...]``.

  As a matmul with a triangle of ones rather than ``jnp.cumsum``: XLA:CPU lowers the latter to a
  reduce-window that it then fuses into, and recomputes in, every consumer of ``G``.
  """
  c = g.shape[3]
  tri = jnp.tril(jnp.ones((c, c), g.dtype))
  spec = "ij,bhnj->bhni" if scalar else "ij,bhnjk->bhnik"
  return jnp.einsum(spec, tri, g, precision=lax.Precision.HIGHEST)


def _decay_where(mask, exponent):
  """``exp(exponent)`` where ``mask``, else 0; masked entries never reach ``exp``, so neither the
  value nor the gradient can become ``inf * 0``."""
  return jnp.where(mask, jnp.exp(jnp.where(mask, exponent, 0.0)), 0.0)


def _intra_scores(q, k, g, scalar):
  """Causal in-chunk scores ``A_ij = Σ_K q_i k_j e^{G_i - G_j}`` (``i >= j``), ``[B, H, n, C, C]``.

  A scalar decay factors out of the K sum, so ``A = (q kᵀ) ⊙ e^{G_i - G_j}`` directly. A
  per-channel decay does not, and splitting ``e^{G_i - G_j} = e^{G_i} e^{-G_j}`` would overflow
  for strong decays. Instead the chunk is halved recursively: for the halves ``L``, ``R`` of a
  block, with ``r`` the last step of ``L``, every pair ``i ∈ R``, ``j ∈ L`` factors as

    e^{G_i - G_j} = e^{G_i - G_r} · e^{G_r - G_j}        (both exponents <= 0)

  so the ``R × L`` block is one matmul of rescaled queries and keys. ``log2 C`` levels, each
  batched over all blocks of its size, build ``A`` from its diagonal ``q_i · k_i`` up.
  """
  *lead, c, key_dim = q.shape
  if scalar:
    causal = jnp.tril(jnp.ones((c, c), bool))
    decay = _decay_where(causal, g[..., :, None] - g[..., None, :])
    return jnp.einsum("...ik,...jk->...ij", q, k) * decay

  scores = jnp.sum(q * k, axis=-1)[..., None, None]  # blocks of size 1: [.., C, 1, 1]
  size = 1
  while size < c:
    pairs = c // (2 * size)
    q2, k2, g2 = (x.reshape(*lead, pairs, 2, size, key_dim) for x in (q, k, g))
    g_r = g2[..., 0, -1:, :]
    q_right = q2[..., 1, :, :] * jnp.exp(g2[..., 1, :, :] - g_r)
    k_left = k2[..., 0, :, :] * jnp.exp(g_r - g2[..., 0, :, :])
    cross = jnp.einsum("...ik,...jk->...ij", q_right, k_left)
    scores = scores.reshape(*lead, pairs, 2, size, size)
    upper = jnp.concatenate([scores[..., 0, :, :], jnp.zeros_like(cross)], axis=-1)
    lower = jnp.concatenate([cross, scores[..., 1, :, :]], axis=-1)
    scores = jnp.concatenate([upper, lower], axis=-2)
    size *= 2
  return scores.reshape(*lead, c, c)
