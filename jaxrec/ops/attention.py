"""Softmax attention and its masks: causal, sliding window, packed segments.

Axes (``jaxrec.typing``): ``B`` batch, ``T`` query time, ``S`` key time, ``H`` query heads, ``G``
key/value heads (``H`` a multiple of ``G``: grouped-query attention), ``K`` the width of every
head, ``head_dim``.

Masks are built from explicit positions, so one function serves training (``T == S``) and
decoding against a KV cache (``T`` new queries at positions ``index .. index + T - 1``, keys at
cache slots ``0 .. S - 1``; slots not yet written lie in the future and the causal mask hides
them). The softmax itself is ``jax.nn.dot_product_attention``. A KV cache is read by
``grouped_attention``, over keys and values stored head-major (``[B, G, S, K]``): each key/value
head's keys contiguous and read once for its ``H / G`` query heads, which is what a decoding step
costs (``jax.nn.dot_product_attention`` would first repeat them for every query head).
"""

from typing import Literal, get_args

import jax
import jax.numpy as jnp

from jaxrec.ops import _checks
from jaxrec.typing import (
  AttentionKeys,
  AttentionMask,
  KeyPositions,
  KeySegmentIds,
  Positions,
  Queries,
  SegmentIds,
)

AttentionMethod = Literal["auto", "xla", "cudnn"]
METHODS = get_args(AttentionMethod)


def attention_mask(
  q_positions: Positions,
  kv_positions: KeyPositions,
  *,
  causal: bool = True,
  window: int | None = None,
  q_segment_ids: SegmentIds | None = None,
  kv_segment_ids: KeySegmentIds | None = None,
) -> AttentionMask:
  """Which keys each query may attend to.

  Args:
    q_positions: integer ``[B, T]``.
    kv_positions: integer ``[B, S]``.
    causal: keys at later positions than the query are hidden.
    window: with ``causal``, only the ``window`` most recent keys, the query's own position
      included, are visible: ``0 <= q_pos - kv_pos < window``.
    q_segment_ids: integer ``[B, T]``; a query only sees keys of its own segment.
    kv_segment_ids: integer ``[B, S]``; required with ``q_segment_ids``.

  Returns:
    bool ``[B, 1, T, S]``, true where attention is allowed.
  """
  dist = q_positions[:, :, None] - kv_positions[:, None, :]
  mask = jnp.ones(dist.shape, bool)
  if causal:
    mask = dist >= 0
  if window is not None:
    mask &= dist < window
  if q_segment_ids is not None:
    mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  return mask[:, None]


def dot_product_attention(
  q: Queries,
  k: AttentionKeys,
  v: AttentionKeys,
  *,
  causal: bool = True,
  window: int | None = None,
  segment_ids: SegmentIds | None = None,
  kv_segment_ids: KeySegmentIds | None = None,
  q_positions: Positions | None = None,
  kv_positions: KeyPositions | None = None,
  scale: float | None = None,
  method: AttentionMethod = "auto",
) -> Queries:
  """Masked softmax attention ``softmax(scale · q kᵀ + mask) v`` per head.

  Args:
    q: queries ``[B, T, H, K]``.
    k: keys ``[B, S, G, K]``.
    v: values ``[B, S, G, K]``.
    causal: hide keys at later positions than the query.
    window: sliding window, the number of most recent keys visible (``None``: all); needs
      ``causal``.
    segment_ids: integer ``[B, T]`` document ids of the queries (packed sequences): no attention
      across documents.
    kv_segment_ids: integer ``[B, S]`` ids of the keys; defaults to ``segment_ids`` (``T == S``).
    q_positions: integer ``[B, T]`` or ``[T]``; defaults to the last ``T`` of ``S`` positions,
      ``S - T .. S - 1``.
    kv_positions: integer ``[B, S]`` or ``[S]``; defaults to ``0 .. S - 1``.
    scale: logit scale; ``K ** -0.5`` when ``None``.
    method: ``"auto" | "xla" | "cudnn"``, the ``implementation`` of
      ``jax.nn.dot_product_attention`` (``"auto"`` lets JAX choose).

  Returns:
    ``[B, T, H, K]`` in the dtype of ``q``; the softmax is computed in fp32.
  """
  _validate(
    q=q,
    k=k,
    v=v,
    causal=causal,
    window=window,
    segment_ids=segment_ids,
    kv_segment_ids=kv_segment_ids,
    method=method,
  )
  batch, t = q.shape[:2]
  s = k.shape[1]
  if q_positions is None:
    q_positions = jnp.arange(s - t, s)
  if kv_positions is None:
    kv_positions = jnp.arange(s)
  q_positions = jnp.broadcast_to(q_positions, (batch, t))
  kv_positions = jnp.broadcast_to(kv_positions, (batch, s))
  if segment_ids is not None and kv_segment_ids is None:
    kv_segment_ids = segment_ids
  mask = attention_mask(
    q_positions,
    kv_positions,
    causal=causal,
    window=window,
    q_segment_ids=segment_ids,
    kv_segment_ids=kv_segment_ids,
  )
  dtype = q.dtype
  k, v = k.astype(dtype), v.astype(dtype)
  implementation = None if method == "auto" else method
  return jax.nn.dot_product_attention(
    q, k, v, mask=mask, scale=scale, implementation=implementation
  )


def grouped_attention(
  q: Queries,
  k: jax.Array,
  v: jax.Array,
  mask: AttentionMask,
  *,
  scale: float | None = None,
) -> Queries:
  """``softmax(scale · q kᵀ where mask) v`` over head-major keys and values, each key/value head
  serving its ``H / G`` query heads in one contraction.

  Scores and softmax in fp32 (a fully masked row averages its values, as
  ``jax.nn.dot_product_attention`` does); the products with the values in their dtype,
  accumulated in fp32.

  Args:
    q: queries ``[B, T, H, K]``.
    k: keys ``[B, G, S, K]`` (head-major, a KV cache's layout).
    v: values ``[B, G, S, K]``.
    mask: bool ``[B, 1, T, S]`` (``attention_mask``).
    scale: logit scale; ``K ** -0.5`` when ``None``.

  Returns:
    ``[B, T, H, K]`` in the dtype of ``q``.
  """
  b, t, h, dim = q.shape
  g = k.shape[1]
  if k.shape[0] != b or k.shape[3] != dim or v.shape != k.shape or h % g:
    raise ValueError(
      f"k, v: expected head-major [B={b}, G, S, K={dim}] with G dividing H={h}, got {k.shape} "
      f"and {v.shape}"
    )
  scale = dim**-0.5 if scale is None else scale
  qg = q.astype(k.dtype).reshape(b, t, g, h // g, dim)
  scores = jnp.einsum("btgrk,bgsk->bgrts", qg, k, preferred_element_type=jnp.float32) * scale
  scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bgrts,bgsk->btgrk", p, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, h, dim).astype(q.dtype)


def _validate(*, q, k, v, causal, window, segment_ids, kv_segment_ids, method):
  _checks.check_choice("method", method, METHODS)
  for name, x in (("q", q), ("k", k), ("v", v)):
    _checks.check_float(name, x)
  _checks.check_rank("q", q, 4, "[B, T, H, K]")
  _checks.check_rank("k", k, 4, "[B, S, G, K]")
  batch, t, heads, head_dim = q.shape
  _, s, kv_heads, _ = k.shape
  _checks.check_shape("k", k, (batch, s, kv_heads, head_dim), "[B, S, G, K] (B, K of q)")
  _checks.check_shape("v", v, k.shape, "[B, S, G, K] (the shape of k)")
  if heads % kv_heads:
    raise ValueError(f"k: expected a number of heads dividing {heads} (q's heads), got {kv_heads}")
  if window is not None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
      raise ValueError(f"window: expected a positive int or None, got {window!r}")
    if not causal:
      raise ValueError("window: a sliding window needs causal=True, got causal=False")
  _checks.check_segment_ids(segment_ids, (batch, t))
  if kv_segment_ids is not None:
    if segment_ids is None:
      raise ValueError("kv_segment_ids: given without segment_ids (the queries' ids)")
    _checks.check_shape("kv_segment_ids", kv_segment_ids, (batch, s), "[B, S]")
  elif segment_ids is not None and t != s:
    raise ValueError(f"kv_segment_ids: required when T != S (T={t}, S={s}) and segment_ids given")
