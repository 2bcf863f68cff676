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

``C_r`` is kept as indices into ``C_f`` (``[B, G, k]``), gathered at each recycle step.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrec.inference.longctx.policy import Policy, check_int, scores, softmax_values
from jaxrec.layers import Attention


class RecycledCache(NamedTuple):
  """``C_f`` (rotated ``k``, ``v`` ``[B, S, G, K]``), ``C_r`` (``recycled`` int32 ``[B, G, k]``
  positions), ``index`` (tokens written), ``last_full`` (position of the last full step),
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
    shape = (batch_size, max_length, attn.num_kv_heads, attn.head_dim)
    zero = jnp.zeros((), jnp.int32)
    return RecycledCache(
      k=jnp.zeros(shape, dtype),
      v=jnp.zeros(shape, dtype),
      recycled=jnp.zeros((batch_size, attn.num_kv_heads, min(self.k, max_length)), jnp.int32),
      index=zero,
      last_full=zero,
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
    index = cache.index
    cache = cache._replace(
      k=jax.lax.dynamic_update_slice_in_dim(cache.k, kr.astype(cache.k.dtype), index, 1),
      v=jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), index, 1),
      index=index + t,
    )
    if t > 1:
      return self._full(qr, q, positions, cache)
    steps = cache.steps + 1
    full = steps >= self.stride
    if self.dynamic:
      a = q[:, 0].astype(jnp.float32)
      cos = jnp.sum(a * cache.q_full, -1) / (
        jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(cache.q_full, axis=-1) + 1e-12
      )
      drifted = jnp.any(jnp.mean(cos, axis=-1) <= self.threshold)
      full |= (steps % self.check_every == 0) & drifted
    return jax.lax.cond(
      full,
      lambda c: self._full(qr, q, positions, c),
      lambda c: self._recycle(qr, positions, c._replace(steps=steps)),
      cache,
    )

  def _full(self, qr, q, positions, cache):
    """Attention to all of ``C_f``; ``C_r`` from the last query's pooled attention."""
    slots = jnp.arange(cache.k.shape[1])
    mask = (slots[None, :] <= positions[:, None])[None, None]
    s = scores(qr, cache.k)
    o = softmax_values(s, mask, cache.v, qr.dtype)
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf)[:, :, -1], axis=-1)  # [B, H, S]
    b, h, n = p.shape
    g = cache.k.shape[2]
    p = p.reshape(b, g, h // g, n).max(axis=2)
    if self.pool > 1:
      pad = [(0, 0), (0, 0), (self.pool // 2,) * 2]
      p = jax.lax.reduce_window(p, -jnp.inf, jax.lax.max, (1, 1, self.pool), (1, 1, 1), pad)
    last = positions[-1]
    p = jnp.where(slots <= last, p, -1.0)
    _, recycled = jax.lax.top_k(p, cache.recycled.shape[-1])
    return o, cache._replace(
      recycled=recycled.astype(jnp.int32),
      last_full=last,
      steps=jnp.zeros((), jnp.int32),
      q_full=q[:, -1].astype(jnp.float32),
    )

  def _recycle(self, qr, positions, cache):
    """Attention to ``C_r`` and the tokens after the last full step."""
    idx = cache.recycled.transpose(0, 2, 1)[..., None]  # [B, k, G, 1]
    k_r = jnp.take_along_axis(cache.k, idx, axis=1)
    v_r = jnp.take_along_axis(cache.v, idx, axis=1)
    size = min(self.stride, cache.k.shape[1])
    start = jnp.clip(positions[0] + 1 - size, 0, cache.k.shape[1] - size)
    k_n = jax.lax.dynamic_slice_in_dim(cache.k, start, size, 1)
    v_n = jax.lax.dynamic_slice_in_dim(cache.v, start, size, 1)
    recent = start + jnp.arange(size)
    valid_r = cache.recycled <= cache.last_full  # [B, G, k]
    h = qr.shape[2]
    valid_r = jnp.repeat(valid_r, h // valid_r.shape[1], axis=1)[:, :, None]
    valid_n = (recent > cache.last_full) & (recent <= positions[0])
    s = jnp.concatenate([scores(qr, k_r), scores(qr, k_n)], axis=-1)
    mask = jnp.concatenate(
      [valid_r, jnp.broadcast_to(valid_n, (*valid_r.shape[:3], size))], axis=-1
    )
    v_all = jnp.concatenate([v_r, v_n], axis=1)
    return softmax_values(s, mask, v_all, qr.dtype), cache
