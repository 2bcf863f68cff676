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
costs (``jax.nn.dot_product_attention`` would first repeat them for every query head). A
decoding step reads the cache as it was and its own new keys as separate sets of one softmax
(``merged_grouped_attention``) and writes them afterwards (``written_after``), so that the
compiled step updates the cache in place and copies none of it.
"""

import functools
from collections.abc import Sequence
from typing import Literal, NamedTuple, get_args

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
  return merged_grouped_attention(q, [(k, v, mask)], scale=scale)


class KeySet(NamedTuple):
  """One key/value set of ``merged_grouped_attention``.

  Attributes:
    k: head-major keys ``[B, G, S, K_k]``.
    v: head-major values ``[B, G, S, K]`` (``K`` the width of the queries' heads and of the
      output).
    mask: bool ``[B, 1, T, S]``, true where a query sees a key.
    q: this set's own queries ``[B, T, H, K_k]`` (ThinK scores its pruned keys with the kept
      channels of the queries); ``None``: the call's queries.
  """

  k: jax.Array
  v: jax.Array
  mask: AttentionMask
  q: Queries | None = None


def merged_grouped_attention(
  q: Queries,
  key_sets: Sequence[KeySet | tuple],
  *,
  scale: float | None = None,
) -> Queries:
  """``grouped_attention`` over the union of several key/value sets, without concatenating them.

  One softmax spans every set: each set's exponentials are taken against the common maximum and
  the weighted values summed. A decoding step reads its KV cache and its own new keys as two sets,
  so the cache is read where it lies and never copied.

  The products are written with the query heads of a group and the queries merged into one axis
  (``[B, G, H / G · T, K]`` against ``[B, G, S, K]``): XLA's CPU dot then reads the cache in its
  stored layout, where the ``btgrk,bgsk`` form made it transpose the cache first.

  Args:
    q: queries ``[B, T, H, K]``.
    key_sets: ``KeySet`` s (or ``(k, v, mask)`` triples), one ``G`` for all.
    scale: logit scale of every set; ``K ** -0.5`` (the width of ``q``) when ``None``.

  Returns:
    ``[B, T, H, K]`` in the dtype of ``q``.
  """
  b, t, h, dim = q.shape
  key_sets = [KeySet(*s) for s in key_sets]
  if not key_sets:
    raise ValueError("key_sets: expected at least one (k, v, mask) triple, got none")
  g = key_sets[0].k.shape[1]
  for k, v, mask, q_set in key_sets:
    width = dim if q_set is None else q_set.shape[3]
    if q_set is not None and q_set.shape[:3] != q.shape[:3]:
      raise ValueError(f"q: expected a set's queries [B, T, H] = {q.shape[:3]}, got {q_set.shape}")
    if (
      k.ndim != 4
      or k.shape[:2] != (b, g)
      or k.shape[3] != width
      or v.shape != (*k.shape[:3], dim)
      or h % g
    ):
      raise ValueError(
        f"k, v: expected head-major [B={b}, G, S, K={width}] keys and [B, G, S, K={dim}] values "
        f"with one G dividing H={h}, got {k.shape} and {v.shape}"
      )
    if mask.shape != (b, 1, t, k.shape[2]):
      raise ValueError(f"mask: expected [B, 1, T, S] = {(b, 1, t, k.shape[2])}, got {mask.shape}")
  key_sets = [s for s in key_sets if s.k.shape[2]]
  if not key_sets:
    raise ValueError("key_sets: expected at least one set with keys, got only empty ones")
  r = h // g
  scale = dim**-0.5 if scale is None else scale
  # [B, G, R·T, K]: a group's query heads and queries as the rows of one product.
  rows = lambda x: x.reshape(b, t, g, r, -1).transpose(0, 2, 3, 1, 4).reshape(b, g, r * t, -1)
  # Each set as P blocks of its keys, [B, G, P, S_i / P, K] (a free reshape): the scores
  # [B, G, P, R, T, S_i / P] and the weighted values of each block are their own products.
  blocked = []
  for k, v, mask, q_set in key_sets:
    n = key_blocks(k.shape[2])
    kb, vb = (a.reshape(b, g, n, -1, a.shape[3]) for a in (k, v))
    qg = rows(q if q_set is None else q_set).astype(k.dtype)
    s = jnp.einsum("bgmk,bgpsk->bgpms", qg, kb, preferred_element_type=jnp.float32)
    s = (s * scale).reshape(b, g, n, r, t, -1)
    mask = mask.reshape(b, 1, t, n, -1).transpose(0, 1, 3, 2, 4)[:, :, :, None]
    blocked.append((jnp.where(mask, s, jnp.finfo(jnp.float32).min), vb))
  top = functools.reduce(
    jnp.maximum, [s.max(axis=(2, 5), keepdims=True) for s, _ in blocked]
  )  # [B, G, 1, R, T, 1]
  total, out = 0.0, 0.0
  for s, vb in blocked:
    w = jnp.exp(s - top)
    total = total + w.sum(axis=(2, 5))
    w = w.reshape(*w.shape[:3], r * t, -1).astype(vb.dtype)
    # Block by block (``p`` a batch axis, not contracted), then summed.
    o = jnp.einsum("bgpms,bgpsk->bgpmk", w, vb, preferred_element_type=jnp.float32)
    out = out + o.sum(axis=2)
  out = out.reshape(b, g, r, t, dim) / total[..., None]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dim).astype(q.dtype)


# Sets of at least this many keys per block are read as several blocks (``key_blocks``).
KEY_BLOCK = 8192


def key_blocks(num_keys: int) -> int:
  """The number of blocks ``merged_grouped_attention`` reads ``num_keys`` keys as: up to 4 blocks
  of at least ``KEY_BLOCK`` keys, a divisor of ``num_keys`` (1 for a short set).

  Split-K, as flash-decoding does on GPUs: one query row against a long cache is a
  matrix-vector product, and separate blocks let the backend read them in parallel (on a 2-core
  CPU, the weighted values of 32k keys run at 19 against 10 GB/s as 4 blocks).
  """
  for n in (4, 2):
    if num_keys % n == 0 and num_keys // n >= KEY_BLOCK:
      return n
  return 1


def written_after(update: jax.Array, *reads: jax.Array) -> jax.Array:
  """``update`` (``[B, ...]``) made to depend on ``reads`` (``[B, ...]`` each), so that XLA writes
  it into a cache in place after the products that read the old cache and made ``reads``.

  Without a data dependency XLA cannot order an in-place ``dynamic_update_slice`` (or scatter) of
  a loop-carried cache after the reads of the same buffer, and copies the whole cache every
  decoding step instead (on CPU: two copies of each of K and V per layer and step, which made
  attention decode 4-6x slower than its memory bound; ``lax.optimization_barrier`` does not
  remove them). The dependency is a select on each batch row: a row whose outputs hold a NaN
  writes NaN (its state is lost already; -1 for an integer ``update``); every other row writes
  ``update`` exactly.
  """
  ok = jnp.ones(update.shape[:1], bool)
  for x in reads:
    ok &= ~jnp.isnan(x).reshape(x.shape[0], -1).any(axis=1)
  ok = ok.reshape((-1,) + (1,) * (update.ndim - 1))
  # Integer updates (segment ids) write -1, an id no document has.
  lost = jnp.nan if jnp.issubdtype(update.dtype, jnp.inexact) else -1
  return jnp.where(ok, update, jnp.asarray(lost, update.dtype))


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
