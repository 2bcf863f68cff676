"""Causal softmax attention mixer: grouped-query heads, RoPE, optional sliding window, KV cache.

The options of the Llama family are arguments with today's behaviour as default: Llama 3's RoPE
frequency scaling (``rope_scaling``) and Qwen2's query/key/value biases (``qkv_bias``).
"""

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxrec.layers import _checks
from jaxrec.layers.linear import Dense
from jaxrec.layers.rope import apply_rope, check_rope_scaling
from jaxrec.ops import attention as attention_ops
from jaxrec.ops import segment_starts
from jaxrec.typing import Activations, CachedKeys, KeySegmentIds, SegmentIds

# Calls over a cache with at most this many queries read it head-major (``Attention._attend``).
GROUPED_MAX_QUERIES = 16

# Positions of ring slots not written yet: so far in the past that every window hides them.
EMPTY_POSITION = -(2**30)


class KVCache(NamedTuple):
  """Keys and values of the tokens seen so far.

  Full attention writes them contiguously from slot 0. Sliding-window attention keeps a ring of
  its last ``S = window`` tokens instead, token ``p`` in slot ``p mod S``, so that its decoding
  state does not grow with the context; ``positions`` then says which token each slot holds.

  Keys and values are stored head-major, each key/value head's tokens contiguous: a decoding
  step reads each head's keys once for its group of query heads
  (``jaxrec.ops.attention.grouped_attention``).

  Attributes:
    k: rotated keys ``[B, G, S, K]`` (``K = head_dim``).
    v: values ``[B, G, S, K]``.
    segment_ids: int32 ``[B, S]``, the document of each written key, renumbered so that a new
      call continues the document of the last written token (as a recurrent state would).
    index: int32 scalar, the number of tokens written (the position of the next one).
    positions: int32 ``[S]``, the position held by each slot of a ring (``EMPTY_POSITION`` while
      empty); ``None`` for a contiguous cache, whose slot ``s`` holds position ``s``.
  """

  k: CachedKeys
  v: CachedKeys
  segment_ids: KeySegmentIds
  index: jax.Array
  positions: jax.Array | None = None

  @property
  def is_ring(self) -> bool:
    return self.positions is not None


class Attention(nnx.Module):
  """Multi-head causal attention with ``num_kv_heads`` shared key/value heads.

  Args:
    d_model: width ``D`` of the input and output.
    num_heads: query heads ``H``.
    num_kv_heads: key/value heads ``G``, a divisor of ``num_heads`` (grouped-query attention
      when smaller); ``None`` means ``num_heads``.
    head_dim: width of every head, even (RoPE rotates channel pairs); ``None`` means
      ``d_model // num_heads``.
    window: sliding window, the number of keys a query sees (its own included); ``None`` is
      full causal attention.
    rope_theta: RoPE base wavelength.
    rope_scaling: RoPE frequency scaling, e.g. Llama 3's (``jaxrec.layers.rope``); ``None``
      for plain RoPE.
    qkv_bias: give the query, key and value projections a bias (Qwen2).
    init_std: standard deviation of the query, key and value projections.
    num_layers: depth of the model; the output projection starts at
      ``init_std / sqrt(2 num_layers)`` (as ``MLP``).
    dtype: compute dtype; the output comes back in it.
    param_dtype: parameter storage dtype.
    rngs: the ``params`` stream.
  """

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    *,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    window: int | None = None,
    rope_theta: float = 10_000.0,
    rope_scaling: Mapping[str, Any] | None = None,
    qkv_bias: bool = False,
    init_std: float = 0.02,
    num_layers: int = 1,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    dtype, param_dtype = _checks.check_mixer_args(
      d_model, num_heads, init_std, num_layers, dtype, param_dtype
    )
    kv = num_heads if num_kv_heads is None else num_kv_heads
    _checks.check_positive_int("num_kv_heads", kv)
    if num_heads % kv:
      raise ValueError(f"num_kv_heads: expected a divisor of num_heads={num_heads}, got {kv}")
    width = d_model // num_heads if head_dim is None else head_dim
    if isinstance(width, bool) or not isinstance(width, int) or width < 2 or width % 2:
      raise ValueError(
        f"head_dim: expected an even head width >= 2 (RoPE), got {width} "
        f"(head_dim={head_dim}, d_model={d_model}, num_heads={num_heads})"
      )
    if window is not None:
      _checks.check_positive_int("window", window)
    _checks.check_positive("rope_theta", rope_theta)
    check_rope_scaling(rope_scaling)
    h = num_heads
    self.num_heads, self.num_kv_heads, self.head_dim = h, kv, width
    self.window = window
    self.rope_theta = rope_theta
    # Sorted items: a hashable, static attribute.
    self.rope_scaling = None if rope_scaling is None else tuple(sorted(dict(rope_scaling).items()))
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d, std = d_model, init_std
    qkv = dict(std=std, use_bias=bool(qkv_bias), **kw)
    self.q_proj = Dense(d, (h, width), ("embed", "heads", "head_dim"), **qkv)
    self.k_proj = Dense(d, (kv, width), ("embed", "kv_heads", "head_dim"), **qkv)
    self.v_proj = Dense(d, (kv, width), ("embed", "kv_heads", "head_dim"), **qkv)
    out_std = std / math.sqrt(2 * num_layers)
    self.o_proj = Dense((h, width), d, ("heads", "head_dim", "embed"), std=out_std, **kw)

  def __call__(
    self,
    x: Activations,
    *,
    segment_ids: SegmentIds | None = None,
    cache: KVCache | None = None,
  ) -> tuple[Activations, KVCache | None]:
    """Attends causally over ``x [B, T, D]`` (and over the cache's keys when given).

    With a cache, the ``T`` tokens take positions ``cache.index ..`` and are appended to it; the
    caller sizes the cache (``init_cache``) for every token it will hold.
    """
    t = x.shape[1]
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    if cache is None:
      positions = jnp.arange(t)
      q, k = self.rope(q, positions), self.rope(k, positions)
      o = attention_ops.dot_product_attention(
        q, k, v, window=self.window, segment_ids=segment_ids, q_positions=positions
      )
    else:
      positions = cache.index + jnp.arange(t)
      q, k = self.rope(q, positions), self.rope(k, positions)
      o, cache = self.attend_cached(q, k, v, cache, positions=positions, segment_ids=segment_ids)
    return self.o_proj(o), cache

  def attend_cached(
    self,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cache: KVCache,
    *,
    positions: jax.Array,
    segment_ids: SegmentIds | None,
  ) -> tuple[jax.Array, KVCache]:
    """Attention of new rotated queries ``q [B, T, H, K]`` over the cache and the new rotated keys
    and values ``k, v [B, T, G, K]`` (at ``positions [T]``, following the cache's), before the
    output projection; returns it and the cache with the new tokens written.

    The queries read the cache as it was (its written slots, or the ring's tokens) and the new
    tokens as a second key set; the new tokens are written afterwards, in place
    (``attention_ops.written_after``), so that a decoding step reads the cache once and copies
    nothing of it.
    """
    t = q.shape[1]
    # Head-major, as the cache stores them.
    k, v = (jnp.swapaxes(a, 1, 2).astype(cache.k.dtype) for a in (k, v))
    size = cache.k.shape[2]
    if cache.is_ring:
      last = jnp.take(cache.segment_ids, (cache.index - 1) % size, axis=1)[:, None]
      cached_positions = cache.positions
    else:
      last = lax.dynamic_index_in_dim(cache.segment_ids, jnp.maximum(cache.index - 1, 0), 1)
      # Slots from the index on are not written yet: place them past every query.
      slots = jnp.arange(size)
      cached_positions = jnp.where(slots < cache.index, slots, jnp.iinfo(jnp.int32).max)
    segments = continue_segments(last, segment_ids, q.shape[:2])
    o = self._attend(
      q,
      [(cache.k, cache.v, cached_positions, cache.segment_ids), (k, v, positions, segments)],
      positions,
      segments,
    )
    k, v, segments = (attention_ops.written_after(a, o) for a in (k, v, segments))
    if not cache.is_ring:
      return o, KVCache(
        k=lax.dynamic_update_slice_in_dim(cache.k, k, cache.index, 2),
        v=lax.dynamic_update_slice_in_dim(cache.v, v, cache.index, 2),
        segment_ids=lax.dynamic_update_slice_in_dim(cache.segment_ids, segments, cache.index, 1),
        index=cache.index + t,
      )
    # Only the last `size` new tokens can be seen again.
    n = min(t, size)
    slots = positions[-n:] % size
    return o, KVCache(
      k=cache.k.at[:, :, slots].set(k[:, :, -n:]),
      v=cache.v.at[:, :, slots].set(v[:, :, -n:]),
      segment_ids=cache.segment_ids.at[:, slots].set(segments[:, -n:]),
      index=cache.index + t,
      positions=cache.positions.at[slots].set(positions[-n:]),
    )

  def _attend(self, q, key_sets, q_positions, segments):
    """``q [B, T, H, K]`` over one or more head-major key sets ``(k, v [B, G, S_i, K], positions
    [S_i], segment ids [B, S_i])`` under this layer's causal, window and document mask: one
    softmax over their union.

    A few queries (decoding) read each set where it lies, each key/value head once
    (``merged_grouped_attention``); many (a chunked prefill), whose cost is the ``T x S``
    products, go to ``jax.nn.dot_product_attention`` over one ``[B, S, G, K]`` copy of the sets,
    the faster form there (one SmolLM2 layer on CPU: 2.0 against 3.3 ms for one query over 8192
    keys, 460 against 270 ms for 2048 queries over 2064).
    """
    batch, t = q.shape[:2]
    if t > GROUPED_MAX_QUERIES:
      cat = lambda i, axis: jnp.concatenate([s[i] for s in key_sets], axis=axis)
      return attention_ops.dot_product_attention(
        q,
        jnp.swapaxes(cat(0, 2), 1, 2),
        jnp.swapaxes(cat(1, 2), 1, 2),
        window=self.window,
        segment_ids=segments,
        kv_segment_ids=cat(3, 1),
        q_positions=q_positions,
        kv_positions=cat(2, 0),
      )
    masked = []
    for k, v, positions, kv_segments in key_sets:
      mask = attention_ops.attention_mask(
        jnp.broadcast_to(q_positions, (batch, t)),
        jnp.broadcast_to(positions, (batch, k.shape[2])),
        window=self.window,
        q_segment_ids=segments,
        kv_segment_ids=kv_segments,
      )
      masked.append((k, v, mask))
    return attention_ops.merged_grouped_attention(q, masked)

  def rope(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """``x [B, T, H or G, K]`` rotated to ``positions`` (``[T]`` or ``[B, T]``) with this layer's
    RoPE settings."""
    return apply_rope(x, positions, self.rope_theta, scaling=self.rope_scaling)

  def init_cache(self, batch_size: int, max_length: int, dtype: jnp.dtype) -> KVCache:
    """An empty cache for ``max_length`` tokens; keys and values in ``dtype``.

    With a sliding window shorter than ``max_length`` the cache is a ring of ``window`` slots, the
    same size at every context length; otherwise it has room for ``max_length`` tokens.
    """
    if self.window is not None and self.window < max_length:
      return self.init_ring(batch_size, dtype)
    shape = (batch_size, self.num_kv_heads, max_length, self.head_dim)
    return KVCache(
      k=jnp.zeros(shape, dtype),
      v=jnp.zeros(shape, dtype),
      segment_ids=jnp.zeros((batch_size, max_length), jnp.int32),
      index=jnp.zeros((), jnp.int32),
    )

  def init_ring(self, batch_size: int, dtype: jnp.dtype) -> KVCache:
    """An empty ring cache of ``window`` slots (sliding-window attention at any length)."""
    if self.window is None:
      raise ValueError("window: a ring cache needs a sliding window, got None")
    shape = (batch_size, self.num_kv_heads, self.window, self.head_dim)
    return KVCache(
      k=jnp.zeros(shape, dtype),
      v=jnp.zeros(shape, dtype),
      segment_ids=jnp.zeros((batch_size, self.window), jnp.int32),
      index=jnp.zeros((), jnp.int32),
      positions=jnp.full((self.window,), EMPTY_POSITION, jnp.int32),
    )


def continue_segments(
  last: jax.Array, segment_ids: SegmentIds | None, batch_time: tuple[int, int]
) -> SegmentIds:
  """Cache-relative document ids ``[B, T]`` for new tokens.

  The first new token continues the document of the last cached one (``last``, int ``[B, 1]``),
  and each change of ``segment_ids`` starts a new document: the same rule by which a recurrent
  mixer's ``initial_state`` feeds only the first segment.
  """
  if segment_ids is None:
    return jnp.broadcast_to(last, batch_time)
  return last + jnp.cumsum(segment_starts(segment_ids), axis=1, dtype=jnp.int32)
