"""Recycled Attention (Xu, Goyal, Choi 2024, arXiv 2411.05787; RefreshKV in v2): decode against a
small recycled cache, refreshed by periodic full-attention steps.

Two caches per layer: ``C_f``, every key (rotated: tokens keep their positions), and ``C_r``, the
``k`` keys per key head that mattered most at the last full step. A full step (the prefill, and
every ``stride``-th decoding step) attends to all of ``C_f`` and sets ``C_r`` to the top ``k``
positions of its last query's attention, max-pooled over the query heads of each key head (v2)
and optionally over ``pool`` neighbouring positions (SnapKV-style). A recycle step attends only
to ``C_r`` plus the tokens since the last full step (v1's append; at most ``stride`` of them), so
its cost is ``O(k + stride)`` whatever the context.

Dynamic schedule (``dynamic=True``): every ``check_every`` steps the cosine similarity of the
current (un-rotated) query to the one of the last full step, averaged over heads, triggers a full
step when it is ``<= threshold`` in any sequence of the batch; each layer decides for itself. A
full step also comes at the latest ``stride`` steps after the previous one, which bounds the
tokens appended to ``C_r``.

``C_r`` is kept as indices into ``C_f`` (``[B, G, k]``), gathered at each recycle step. ``C_f``
is stored head-major (``[B, G, S, K]``) and read where it lies: a step reads the cache as it was
and its own new tokens as separate key sets, and writes the new tokens afterwards, after the
products that read the cache (``jaxrec.ops.attention.written_after``), so that no step copies it.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrec.inference.longctx.policy import Policy, check_int, scores, softmax_values
from jaxrec.layers import Attention
from jaxrec.ops.attention import KeySet, key_blocks, merged_grouped_attention, written_after


class RecycledCache(NamedTuple):
  """``C_f`` (rotated ``k``, ``v``, head-major ``[B, G, S, K]`` as ``jaxrec.layers.KVCache``),
  ``C_r`` (``recycled`` int32 ``[B, G, k]`` positions, best first), ``index`` (tokens written),
  ``last_full`` (position of the last full step, ``-1`` before the first: every token is recent),
  ``steps`` (decoding steps since it), ``q_full`` (its un-rotated queries ``[B, H, K]``)."""

  k: jax.Array
  v: jax.Array
  recycled: jax.Array
  index: jax.Array
  last_full: jax.Array
  steps: jax.Array
  q_full: jax.Array


@dataclasses.dataclass(frozen=True)
class Recycled(Policy):
  """Recycled Attention (see the module docstring); defaults of the paper's 16K language
  modelling runs.

  Attributes:
    k: size of the recycled cache per key head.
    stride: ``S``, a full step every ``S`` decoding steps (``1``: always, plain attention).
    pool: max-pooling width over neighbouring positions of the scores (odd; 1: none).
    dynamic: decide full steps by query similarity (``check_every``, ``threshold``).
    check_every: ``QC``, steps between similarity checks.
    threshold: ``s``, a full step when the similarity is ``<= s``.
  """

  k: int = 2048
  stride: int = 10
  pool: int = 1
  dynamic: bool = False
  check_every: int = 5
  threshold: float = 0.8

  def __post_init__(self):
    check_int("k", self.k, 1)
    check_int("stride", self.stride, 1)
    check_int("pool", self.pool, 1)
    check_int("check_every", self.check_every, 1)
    if self.pool % 2 == 0:
      raise ValueError(f"pool: expected an odd pooling width, got {self.pool}")
    if not isinstance(self.dynamic, bool):
      raise ValueError(f"dynamic: expected a bool, got {self.dynamic!r}")
    if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float):
      raise ValueError(f"threshold: expected a number, got {self.threshold!r}")

  def init_cache(self, attn: Attention, batch_size: int, max_length: int, dtype):
    shape = (batch_size, attn.num_kv_heads, max_length, attn.head_dim)
    zero = jnp.zeros((), jnp.int32)
    return RecycledCache(
      k=jnp.zeros(shape, dtype),
      v=jnp.zeros(shape, dtype),
      recycled=jnp.zeros((batch_size, attn.num_kv_heads, min(self.k, max_length)), jnp.int32),
      index=zero,
      last_full=jnp.full((), -1, jnp.int32),
      steps=zero,
      q_full=jnp.zeros((batch_size, attn.num_heads, attn.head_dim), jnp.float32),
    )

  def attend(self, attn: Attention, q, k, v, *, cache, layer: int):
    t = q.shape[1]
    positions = (0 if cache is None else cache.index) + jnp.arange(t)
    qr, kr = attn.rope(q, positions), attn.rope(k, positions)
    if cache is None:
      causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
      return softmax_values(scores(qr, kr), causal, v, q.dtype), None
    # The new tokens head-major, as C_f stores them: a key set of their own, written after.
    new = tuple(jnp.swapaxes(a, 1, 2).astype(cache.k.dtype) for a in (kr, v))
    if t > 1:
      o, schedule = self._full(qr, q, new, positions, cache)
    else:
      steps = cache.steps + 1
      full = steps >= self.stride
      if self.dynamic:
        a = q[:, 0].astype(jnp.float32)
        cos = jnp.sum(a * cache.q_full, -1) / (
          jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(cache.q_full, axis=-1) + 1e-12
        )
        drifted = jnp.any(jnp.mean(cos, axis=-1) <= self.threshold)
        full |= (steps % self.check_every == 0) & drifted
      # The branches give back only the schedule's fields: C_f is read in them, never returned.
      o, schedule = jax.lax.cond(
        full,
        lambda c: self._full(qr, q, new, positions, c),
        lambda c: self._recycle(qr, new, c, steps),
        cache,
      )
    k_new, v_new = (written_after(a, o) for a in new)
    return o, cache._replace(
      k=jax.lax.dynamic_update_slice_in_dim(cache.k, k_new, cache.index, 2),
      v=jax.lax.dynamic_update_slice_in_dim(cache.v, v_new, cache.index, 2),
      index=cache.index + t,
      **schedule,
    )

  def _full(self, qr, q, new, positions, cache):
    """Attention to all of ``C_f`` (the cache as it was and the ``new`` keys and values ``[B, G,
    T, K]``); ``C_r`` from the last query's pooled attention. Returns the outputs and the
    schedule's fields.

    One product of the queries with each key set gives the scores both need, in the head-major
    form of ``merged_grouped_attention`` (``bgmk,bgpsk``: a group's query heads and queries as
    the rows ``m``, the cache as ``key_blocks`` blocks ``p``), which reads the cache as it lies.
    """
    b, t, h, dim = qr.shape
    _, g, size, _ = cache.k.shape
    r = h // g
    k_new, v_new = new
    qg = qr.reshape(b, t, g, r, dim).transpose(0, 2, 3, 1, 4).reshape(b, g, r * t, dim)
    qg = qg.astype(cache.k.dtype)
    product = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
    n = key_blocks(size)
    kb, vb = (a.reshape(b, g, n, size // n, dim) for a in (cache.k, cache.v))
    written = (jnp.arange(size) < cache.index).reshape(n, 1, -1)
    s_c = jnp.where(written, product("bgmk,bgpsk->bgpms", qg, kb) * dim**-0.5, -jnp.inf)
    causal = jnp.tile(jnp.tril(jnp.ones((t, t), bool)), (r, 1))  # rows m = head · T + query
    s_n = jnp.where(causal, product("bgmk,bgsk->bgms", qg, k_new) * dim**-0.5, -jnp.inf)
    top = jnp.maximum(s_c.max(axis=(2, 4)), s_n.max(axis=-1))[..., None]  # [B, G, R·T, 1]
    w_c, w_n = jnp.exp(s_c - top[:, :, None]), jnp.exp(s_n - top)
    total = w_c.sum(axis=(2, 4))[..., None] + w_n.sum(axis=-1, keepdims=True)
    o = product("bgpms,bgpsk->bgpmk", w_c.astype(vb.dtype), vb).sum(axis=2)
    o += product("bgms,bgsk->bgmk", w_n.astype(v_new.dtype), v_new)
    o = (o / total).reshape(b, g, r, t, dim).transpose(0, 3, 1, 2, 4).reshape(b, t, h, dim)
    # The last query's probabilities [B, G, S]: max over the group's heads, the new keys in their
    # slots.
    p_c = (w_c / total[:, :, None]).reshape(b, g, n, r, t, -1)[..., -1, :].max(axis=3)
    p_n = (w_n / total).reshape(b, g, r, t, t)[:, :, :, -1].max(axis=2)
    p = jax.lax.dynamic_update_slice_in_dim(p_c.reshape(b, g, size), p_n, cache.index, 2)
    if self.pool > 1:
      pad = [(0, 0), (0, 0), (self.pool // 2,) * 2]
      p = jax.lax.reduce_window(p, -jnp.inf, jax.lax.max, (1, 1, self.pool), (1, 1, 1), pad)
    last = positions[-1]
    # Slots after the last query rank below every probability: they come last in C_r.
    p = jnp.where(jnp.arange(size) <= last, p, -1.0)
    _, recycled = jax.lax.top_k(p, cache.recycled.shape[-1])
    return o.astype(qr.dtype), dict(
      recycled=recycled.astype(jnp.int32),
      last_full=last,
      steps=jnp.zeros((), jnp.int32),
      q_full=q[:, -1].astype(jnp.float32),
    )

  def _recycle(self, qr, new, cache, steps):
    """Attention to ``C_r``, the tokens of ``C_f`` after the last full step (fewer than
    ``stride``) and the ``new`` key and value ``[B, G, 1, K]``. Returns the outputs and the
    schedule's fields."""
    b, _, size, _ = cache.k.shape
    idx = cache.recycled[..., None]  # [B, G, k, 1]
    k_r = jnp.take_along_axis(cache.k, idx, axis=2)
    v_r = jnp.take_along_axis(cache.v, idx, axis=2)
    # A full step ranks the slots after it last, so C_r's positions up to last_full, the valid
    # ones, are its first last_full + 1 entries in every head: one mask serves all heads.
    valid_r = jnp.arange(idx.shape[2]) <= cache.last_full
    n = min(self.stride - 1, size)
    start = jnp.clip(cache.index - n, 0, size - n)
    recent = start + jnp.arange(n)
    valid_n = (recent > cache.last_full) & (recent < cache.index)
    key_sets = [
      KeySet(k_r, v_r, jnp.broadcast_to(valid_r, (b, 1, 1, idx.shape[2]))),
      KeySet(
        jax.lax.dynamic_slice_in_dim(cache.k, start, n, 2),
        jax.lax.dynamic_slice_in_dim(cache.v, start, n, 2),
        jnp.broadcast_to(valid_n, (b, 1, 1, n)),
      ),
      KeySet(*new, jnp.ones((b, 1, 1, 1), bool)),
    ]
    o = merged_grouped_attention(qr, key_sets)
    return o, dict(
      recycled=cache.recycled, last_full=cache.last_full, steps=steps, q_full=cache.q_full
    )
