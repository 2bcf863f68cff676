"""LongHeads (Lu et al. 2024, arXiv 2402.10685): every head attends to its own few chunks.

The keys are cut into chunks of ``w = chunk_size`` tokens. A complete chunk ``c`` gets, per query
head ``h``, a key representation (keys and queries of the chunk turned by their local positions
``p mod w``)::

  O_c = softmax(Q_c K_c^T / sqrt(K)) V_c        (bidirectional within the chunk)
  r_c = softmax(mean_t(O_c) K_c^T / sqrt(K)) K_c

A query at position ``i`` (current chunk ``n = i // w``) scores the middle chunks ``1 .. n - 2``
by ``q_h · r_{h,c}`` with its un-rotated query, and each head attends to chunk ``0``, chunks
``n - 1`` and ``n`` (up to ``i``) and its ``chunks_per_head - 3`` best middle chunks: sorted,
concatenated and given contiguous positions (a key at offset ``o`` of the ``m``-th selected chunk
sits at ``m w + o``, the query after the last one), so no distance exceeds the ``chunks_per_head ·
w`` tokens the model saw in training. With ``i < chunks_per_head · w`` every chunk is selected at
its true positions: plain attention.

Decoding costs ``O(chunks_per_head · w)`` attention plus one score per chunk. The cache holds
each key turned by its offset in its chunk, ``R_{i mod w} k_i`` (what the chunk representations
read; positions change with the selection, by whole chunks: a key of the ``m``-th selected chunk
is ``R_{m w}`` away from its cached form, so the query is turned by ``q_pos - m w`` instead of
turning the gathered keys), head-major (``[B, G, S, K]``: a chunk of a key head is one contiguous
``[w, K]`` block), the chunk representations and the queries of the current chunk. A query reads
the cache as it was before it: its selected complete chunks gathered per head, the open chunk up
to the slot before it per key head, and its own key as a third set, one softmax over the three; a
decoding step then writes its key after these reads, in place (``written_after``), and copies
nothing of the cache. The prefill gives every query past the budget its own selection, as
decoding would (one query at a time: ``lax.map``); the queries within it attend plainly, in one
block. A multi-token call after earlier ones (a chunked prefill) completes the chunks it closes
from the cached queries of the open chunk and its own, then answers its queries the same way: a
representation depends only on its chunk, so the result equals one call.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrec.inference.longctx.policy import Policy, check_int, repeat_kv
from jaxrec.layers import Attention
from jaxrec.ops.attention import grouped_attention, written_after


class LongHeadsEmpty(NamedTuple):
  """A LongHeads cache before its prefill: ``room [S, 0]`` only records the capacity ``S``."""

  room: jax.Array


class LongHeadsCache(NamedTuple):
  """Head-major ``k [B, G, S, K]`` turned by each key's offset in its chunk (``R_{i mod w} k_i``),
  pre-RoPE ``v [B, G, S, K]``; ``reps [B, ceil(S / w), H, K]`` of the complete chunks; ``q_chunk
  [B, w, H, K]`` the un-rotated queries of the current chunk (slot ``i mod w``); ``index``, the
  tokens written."""

  k: jax.Array
  v: jax.Array
  reps: jax.Array
  q_chunk: jax.Array
  index: jax.Array


@dataclasses.dataclass(frozen=True)
class LongHeads(Policy):
  """LongHeads chunk selection per head (see the module docstring); the paper's defaults (a
  4096-token budget).

  Attributes:
    chunk_size: ``w``, tokens per chunk.
    chunks_per_head: ``C >= 3``, the chunks each head attends to.
  """

  chunk_size: int = 256
  chunks_per_head: int = 16

  def __post_init__(self):
    check_int("chunk_size", self.chunk_size, 1)
    check_int("chunks_per_head", self.chunks_per_head, 3)

  def init_cache(self, attn: Attention, batch_size: int, max_length: int, dtype):
    return LongHeadsEmpty(room=jnp.zeros((max_length, 0), dtype))

  def attend(self, attn: Attention, q, k, v, *, cache, layer: int):
    if cache is None or isinstance(cache, LongHeadsEmpty):
      return self._prefill(attn, q, k, v, cache)
    if q.shape[1] != 1:
      return self._extend(attn, q, k, v, cache)
    w, i = self.chunk_size, cache.index
    # The new key and value head-major, [B, G, 1, K], in the cache's dtype (as a read sees them).
    k = attn.rope(k, jnp.reshape(i % w, (1,)))
    k, v = (_head_major(x).astype(cache.k.dtype) for x in (k, v))
    o = self._query(attn, q[:, 0], i, cache.k, cache.v, cache.reps, k[:, :, 0], v[:, :, 0])
    o = o[:, None]
    # Written in place, after the reads of the cache as it was.
    k, v = (written_after(x, o) for x in (k, v))
    k_all = jax.lax.dynamic_update_slice_in_dim(cache.k, k, i, 2)
    v_all = jax.lax.dynamic_update_slice_in_dim(cache.v, v, i, 2)
    q_chunk = jax.lax.dynamic_update_slice_in_dim(
      cache.q_chunk, q.astype(cache.q_chunk.dtype), i % w, 1
    )

    def close_chunk(reps):
      """``reps`` with the chunk this token completes, read from the written cache."""
      chunk = lambda x: _seq_major(jax.lax.dynamic_slice_in_dim(x, i + 1 - w, w, 2))[:, None]
      rep = self.chunk_representations(attn, q_chunk[:, None], chunk(k_all), chunk(v_all))
      return jax.lax.dynamic_update_slice_in_dim(reps, rep.astype(reps.dtype), i // w, 1)

    reps = jax.lax.cond((i + 1) % w == 0, close_chunk, lambda r: r, cache.reps)
    cache = LongHeadsCache(k=k_all, v=v_all, reps=reps, q_chunk=q_chunk, index=i + 1)
    return o.astype(q.dtype), cache

  def _prefill(self, attn: Attention, q, k, v, cache):
    b, t, h, dim = q.shape
    w = self.chunk_size
    room = t if cache is None else cache.room.shape[0]
    n_max = -(-room // w)
    full = t // w
    k_local = attn.rope(k, jnp.arange(t) % w)
    split = lambda x: x[:, : full * w].reshape(b, full, w, *x.shape[2:])
    reps = self.chunk_representations(attn, split(q), split(k_local), split(v))
    reps = jnp.pad(reps, ((0, 0), (0, n_max - full), (0, 0), (0, 0)))
    k_heads, v_heads = _head_major(k_local), _head_major(v)
    # Within the budget every chunk is selected at its true position: plain attention.
    plain = min(t, self.chunks_per_head * w)
    o = self._plain(attn, q[:, :plain], 0, k_heads[:, :, :plain], v_heads[:, :, :plain])
    if t > plain:
      one = lambda x: self._query(attn, x[0], x[1], k_heads, v_heads, reps, x[2], x[3])
      steps = lambda x: x[:, plain:].transpose(1, 0, 2, 3)  # [T - plain, B, H or G, K]
      rest = jax.lax.map(one, (steps(q), jnp.arange(plain, t), steps(k_local), steps(v)))
      o = jnp.concatenate([o, rest.transpose(1, 0, 2, 3).astype(q.dtype)], axis=1)
    if cache is None:
      return o, None
    dtype = cache.room.dtype
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, room - t), (0, 0))).astype(dtype)
    q_chunk = jnp.zeros((b, w, h, dim), dtype)
    q_chunk = q_chunk.at[:, : t - full * w].set(q[:, full * w :].astype(dtype))
    return o, LongHeadsCache(
      k=pad(k_heads),
      v=pad(v_heads),
      reps=reps.astype(dtype),
      q_chunk=q_chunk,
      index=jnp.asarray(t, jnp.int32),
    )

  def _extend(self, attn: Attention, q, k, v, cache):
    """A multi-token call at ``cache.index`` after earlier ones."""
    b, t, h, dim = q.shape
    w, i0 = self.chunk_size, cache.index
    k = attn.rope(k, (i0 + jnp.arange(t)) % w).astype(cache.k.dtype)
    v = v.astype(cache.v.dtype)
    k_all = jax.lax.dynamic_update_slice_in_dim(cache.k, _head_major(k), i0, 2)
    v_all = jax.lax.dynamic_update_slice_in_dim(cache.v, _head_major(v), i0, 2)
    # Queries from the start of the open chunk (base): the cached ones, then the new ones.
    base = i0 - i0 % w
    n = (w + t) // w + 1  # chunks the buffer can reach, one spare for the open chunk's slice
    queries = jnp.zeros((b, n * w, h, dim), cache.q_chunk.dtype)
    queries = queries.at[:, :w].set(cache.q_chunk)
    queries = jax.lax.dynamic_update_slice_in_dim(queries, q.astype(queries.dtype), i0 % w, 1)
    # The chunks this call closes: every one of the buffer that ends by i0 + t.
    closes = base + (jnp.arange(n) + 1) * w <= i0 + t
    slots = jnp.clip(base + jnp.arange(n * w), 0, k_all.shape[2] - 1)
    split = lambda x: x.reshape(b, n, w, *x.shape[2:])
    buffer = lambda x: split(_seq_major(jnp.take(x, slots, 2)))  # [B, n, w, G, K]
    reps = self.chunk_representations(attn, split(queries), buffer(k_all), buffer(v_all))
    ids = jnp.where(closes, base // w + jnp.arange(n), cache.reps.shape[1])  # the others dropped
    reps = cache.reps.at[:, ids].set(reps.astype(cache.reps.dtype), mode="drop")
    end = i0 + t
    plain = min(self.chunks_per_head * w, k_all.shape[2])

    def each_query(_):
      one = lambda x: self._query(attn, x[0], x[1], k_all, v_all, reps, x[2], x[3])
      steps = lambda x: x.transpose(1, 0, 2, 3)  # [T, B, H or G, K]
      o = jax.lax.map(one, (steps(q), i0 + jnp.arange(t), steps(k), steps(v)))  # [T, B, H, K]
      return o.transpose(1, 0, 2, 3).astype(q.dtype)

    within = lambda _: self._plain(attn, q, i0, k_all[:, :, :plain], v_all[:, :, :plain])
    o = jax.lax.cond(end <= plain, within, each_query, None)
    q_chunk = jax.lax.dynamic_slice_in_dim(queries, end - end % w - base, w, 1)
    cache = LongHeadsCache(k=k_all, v=v_all, reps=reps, q_chunk=q_chunk, index=end)
    return o, cache

  def _plain(self, attn: Attention, q, start, k_local, v):
    """Causal attention of un-rotated ``q [B, T, H, K]`` at positions ``start + t`` over the
    first keys, head-major ``k_local, v [B, G, S, K]``, at their true positions (every query
    within the budget); fp32 as the selected chunks' attention, the output in ``q``'s dtype."""
    b, t = q.shape[:2]
    pos = jnp.arange(k_local.shape[2])
    k_rot = _rope_head_major(attn, k_local, pos - pos % self.chunk_size)
    q_pos = start + jnp.arange(t)
    mask = jnp.broadcast_to(pos[None, :] <= q_pos[:, None], (b, 1, t, pos.shape[0]))
    f32 = lambda x: x.astype(jnp.float32)
    o = grouped_attention(f32(attn.rope(q, q_pos)), f32(k_rot), f32(v), mask)
    return o.astype(q.dtype)

  def chunk_representations(self, attn: Attention, q, k_local, v):
    """``[B, N, H, K]`` key representations of ``N`` complete chunks from their un-rotated
    ``q [B, N, w, H, K]``, their keys turned by their offsets in the chunk ``k_local`` and
    values ``v [B, N, w, G, K]``."""
    b, n, w, h, dim = q.shape
    if n == 0:
      return jnp.zeros((b, 0, h, dim), jnp.float32)
    flat = lambda x: x.reshape(b * n, w, *x.shape[3:])
    local = jnp.arange(w)
    qc = attn.rope(flat(q), local).astype(jnp.float32)
    kc = repeat_kv(flat(k_local), h).astype(jnp.float32)
    vc = repeat_kv(flat(v), h).astype(jnp.float32)
    scale = 1 / jnp.sqrt(jnp.float32(dim))
    p = jax.nn.softmax(jnp.einsum("bqhk,bshk->bhqs", qc, kc) * scale, axis=-1)
    mean_o = jnp.einsum("bhqs,bshk->bqhk", p, vc).mean(axis=1)  # [B N, H, K]
    a = jax.nn.softmax(jnp.einsum("bhk,bshk->bhs", mean_o, kc) * scale, axis=-1)
    return jnp.einsum("bhs,bshk->bhk", a, kc).reshape(b, n, h, dim)

  def select(self, q, position, reps):
    """Chunks of each head for un-rotated queries ``q [B, H, K]`` at ``position``: int32 ``[B, H,
    C]`` chunk ids, ascending, and whether each is used (``bool [B, H, C]``); the used ones come
    first."""
    cur = position // self.chunk_size
    ids = jnp.arange(reps.shape[1])
    score = jnp.einsum("bhk,bchk->bhc", q.astype(jnp.float32), reps.astype(jnp.float32))
    score = jnp.where((ids >= 1) & (ids <= cur - 2), score, -jnp.inf)
    # Chunk 0 and the previous chunk are forced; the current one is appended below.
    priority = jnp.where(((ids == 0) | (ids == cur - 1)) & (ids < cur), jnp.inf, score)
    top, chosen = jax.lax.top_k(priority, min(self.chunks_per_head - 1, ids.shape[0]))
    used = top > -jnp.inf
    chosen = jnp.sort(jnp.where(used, chosen, jnp.iinfo(jnp.int32).max), axis=-1)
    used = jnp.arange(chosen.shape[-1]) < jnp.sum(used, axis=-1, keepdims=True)
    current = jnp.broadcast_to(cur, chosen.shape[:2])[..., None]
    ids_out = jnp.concatenate([jnp.where(used, chosen, 0), current], axis=-1)
    used = jnp.concatenate([used, jnp.ones_like(current, bool)], axis=-1)
    return ids_out.astype(jnp.int32), used

  def _query(self, attn: Attention, q, position, k_local, v, reps, k_own, v_own):
    """fp32 output ``[B, H, K]`` of un-rotated ``q [B, H, K]`` at ``position`` over its selected
    chunks: of the head-major cache ``k_local`` (turned by the keys' offsets in the chunk) and
    ``v``, ``[B, G, S, K]``, only the slots before ``position`` are read; its own key and value
    ``k_own, v_own [B, G, K]`` (turned by its offset) come apart, so that a decoding step reads
    the cache before writing to it.

    Three key sets under one softmax: each head's selected complete chunks, gathered as
    contiguous ``[w, K]`` blocks (heads of one key head select different chunks, each with its
    own query rotation: a per-head problem, not ``merged_grouped_attention``'s per key head);
    the open chunk up to the query and the query's own key, the same for the heads of a key head.
    """
    b, h, dim = q.shape
    w, (g, s) = self.chunk_size, k_local.shape[1:3]
    r = h // g
    size = min(w, s)  # a chunk's keys; fewer only in a cache shorter than a chunk (none complete)
    ids, used = self.select(q, position, reps)
    ids, used = ids[..., :-1], used[..., :-1]  # the complete chunks; the open one is the last
    m = ids.shape[-1]
    f32 = lambda x: x.astype(jnp.float32)
    scale = 1 / jnp.sqrt(jnp.float32(dim))
    # The used chunks come first, the open one after them. A key at offset o of the chunk of rank
    # j sits at j w + o, the query at q_pos: the score (R_{q_pos} q)·(R_{j w + o} k) is
    # (R_{q_pos - j w} q)·(R_o k), with R_o k as cached (R_{position mod w} q for the open chunk).
    local = position % w
    q_pos = jnp.sum(used, axis=-1, keepdims=True) * w + local  # [B, H, 1]
    turned = jnp.broadcast_to(q.reshape(b * h, 1, 1, dim), (b * h, m, 1, dim))
    q_rot = attn.rope(turned, (q_pos - jnp.arange(m) * w).reshape(b * h, m)).reshape(b, h, m, dim)
    # Each head's chunks, [B, H, m, w, K]: the blocks at (batch b, key head h // r, slot id · w).
    starts = jnp.broadcast_arrays(
      jnp.arange(b)[:, None, None], (jnp.arange(h) // r)[None, :, None], ids * w
    )
    starts = jnp.stack(starts, axis=-1)  # [B, H, m, 3]
    dims = jax.lax.GatherDimensionNumbers(
      offset_dims=(3, 4), collapsed_slice_dims=(0, 1), start_index_map=(0, 1, 2)
    )
    gather = lambda x: jax.lax.gather(x, starts, dims, (1, 1, size, dim), mode="clip")
    kg, vg = gather(k_local), gather(v)
    s_chunks = jnp.einsum("bhck,bhcok->bhco", f32(q_rot), f32(kg)) * scale
    s_chunks = jnp.where(used[..., None], s_chunks, -jnp.inf).reshape(b, h, m * size)
    # The open chunk (its slice clamped into a cache whose end is not a chunk boundary).
    first = position - local
    start = jnp.clip(first, 0, s - size)
    k_open, v_open = (jax.lax.dynamic_slice_in_dim(x, start, size, 2) for x in (k_local, v))
    slots = start + jnp.arange(size)
    q_open = f32(attn.rope(q[:, None], jnp.reshape(local, (1,)))).reshape(b, g, r, dim)
    s_open = jnp.einsum("bgrk,bgok->bgro", q_open, f32(k_open)).reshape(b, h, size) * scale
    s_open = jnp.where((slots >= first) & (slots < position), s_open, -jnp.inf)
    s_own = jnp.einsum("bgrk,bgk->bgr", q_open, f32(k_own)).reshape(b, h, 1) * scale
    p = jax.nn.softmax(jnp.concatenate([s_chunks, s_open, s_own], axis=-1), axis=-1)
    p_chunks, p_open, p_own = jnp.split(p, [m * size, (m + 1) * size], axis=-1)
    o = jnp.einsum("bhs,bhsk->bhk", p_chunks, f32(vg).reshape(b, h, m * size, dim))
    o_open = jnp.einsum("bgro,bgok->bgrk", p_open.reshape(b, g, r, size), f32(v_open))
    o_own = p_own.reshape(b, g, r, 1) * f32(v_own)[:, :, None]
    return o + (o_open + o_own).reshape(b, h, dim)


def _head_major(x):
  """``[B, S, G, K]`` -> ``[B, G, S, K]``, the cache's layout."""
  return jnp.swapaxes(x, 1, 2)


_seq_major = _head_major  # and back: ``[B, G, S, K]`` -> ``[B, S, G, K]``


def _rope_head_major(attn: Attention, x, positions):
  """Head-major ``x [B, G, S, K]`` rotated to ``positions [S]`` (``attn.rope`` over ``[B G, S, 1,
  K]``, a free reshape)."""
  b, g, s, dim = x.shape
  return attn.rope(x.reshape(b * g, s, 1, dim), positions).reshape(x.shape)
