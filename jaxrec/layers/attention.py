"""Causal softmax attention mixer: grouped-query heads, RoPE, optional sliding window, KV cache."""

import math
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxrec.layers.linear import Dense
from jaxrec.layers.registry import register_mixer
from jaxrec.layers.rope import apply_rope
from jaxrec.ops import attention as attention_ops

if TYPE_CHECKING:
  from jaxrec.models.config import LMConfig


class KVCache(NamedTuple):
  """Keys and values of the tokens seen so far, written contiguously from slot 0.

  Attributes:
    k: rotated keys ``[B, S, K, D]``.
    v: values ``[B, S, K, D]``.
    segment_ids: int32 ``[B, S]``, the document of each written key, renumbered so that a new
      call continues the document of the last written token (as a recurrent state would).
    index: int32 scalar, the number of tokens written (the position of the next one).
  """

  k: jax.Array
  v: jax.Array
  segment_ids: jax.Array
  index: jax.Array


@register_mixer("attention")
class Attention(nnx.Module):
  """Multi-head causal attention with ``num_kv_heads`` shared key/value heads.

  Reads from ``cfg``: ``d_model, num_heads, kv_heads, attn_head_dim, window, rope_theta,
  init_std, num_layers, dtype, param_dtype``.
  """

  def __init__(self, cfg: "LMConfig", *, rngs: nnx.Rngs):
    d, h, kv, dh = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.attn_head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = h, kv, dh
    self.window = cfg.window
    self.rope_theta = cfg.rope_theta
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
    std = cfg.init_std
    self.q_proj = Dense(d, (h, dh), ("embed", "heads", "head_dim"), std=std, **kw)
    self.k_proj = Dense(d, (kv, dh), ("embed", "kv_heads", "head_dim"), std=std, **kw)
    self.v_proj = Dense(d, (kv, dh), ("embed", "kv_heads", "head_dim"), std=std, **kw)
    out_std = std / math.sqrt(2 * cfg.num_layers)
    self.o_proj = Dense((h, dh), d, ("heads", "head_dim", "embed"), std=out_std, **kw)

  def __call__(
    self,
    x: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    cache: KVCache | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Attends causally over ``x [B, T, D]`` (and over the cache's keys when given).

    With a cache, the ``T`` tokens take positions ``cache.index ..`` and are appended to it; the
    caller sizes the cache (``init_cache``) for every token it will hold.
    """
    t = x.shape[1]
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    if cache is None:
      positions = jnp.arange(t)
      q = apply_rope(q, positions, self.rope_theta)
      k = apply_rope(k, positions, self.rope_theta)
      o = attention_ops.dot_product_attention(
        q, k, v, window=self.window, segment_ids=segment_ids, q_positions=positions
      )
    else:
      positions = cache.index + jnp.arange(t)
      q = apply_rope(q, positions, self.rope_theta)
      k = apply_rope(k, positions, self.rope_theta)
      segments = _continue_segments(cache, segment_ids, x.shape[:2])
      cache = KVCache(
        k=lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), cache.index, 1),
        v=lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), cache.index, 1),
        segment_ids=lax.dynamic_update_slice_in_dim(cache.segment_ids, segments, cache.index, 1),
        index=cache.index + t,
      )
      o = attention_ops.dot_product_attention(
        q,
        cache.k,
        cache.v,
        window=self.window,
        segment_ids=segments,
        kv_segment_ids=cache.segment_ids,
        q_positions=positions,
      )
    return self.o_proj(o), cache

  def init_cache(self, batch_size: int, max_length: int, dtype: jnp.dtype) -> KVCache:
    """An empty cache with room for ``max_length`` tokens; keys and values in ``dtype``."""
    shape = (batch_size, max_length, self.num_kv_heads, self.head_dim)
    return KVCache(
      k=jnp.zeros(shape, dtype),
      v=jnp.zeros(shape, dtype),
      segment_ids=jnp.zeros((batch_size, max_length), jnp.int32),
      index=jnp.zeros((), jnp.int32),
    )


def _continue_segments(cache: KVCache, segment_ids: jax.Array | None, batch_time) -> jax.Array:
  """Cache-relative document ids ``[B, T]`` for new tokens.

  The first new token continues the document of the last cached one, and each change of
  ``segment_ids`` starts a new document: the same rule by which a recurrent mixer's
  ``initial_state`` feeds only the first segment.
  """
  last = lax.dynamic_index_in_dim(cache.segment_ids, jnp.maximum(cache.index - 1, 0), 1)
  if segment_ids is None:
    return jnp.broadcast_to(last, batch_time)
  starts = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
  return last + jnp.pad(jnp.cumsum(starts, axis=1), ((0, 0), (1, 0)))
