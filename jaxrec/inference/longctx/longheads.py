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
turning the gathered keys), the chunk representations and the queries of the current chunk. The
prefill gives every query past the budget its own selection, as decoding would (one query at a
time: ``lax.map``); the queries within it attend plainly, in one block. A multi-token call after
earlier ones (a chunked prefill) completes the chunks it closes from the cached queries of the
open chunk and its own, then answers its queries the same way: a representation depends only on
its chunk, so the result equals one call.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrec.inference.longctx.policy import (
  Policy,
  check_int,
  repeat_kv,
  scores,
  softmax_values,
)
from jaxrec.layers import Attention


class LongHeadsEmpty(NamedTuple):
  """A LongHeads cache before its prefill: ``room [S, 0]`` only records the capacity ``S``."""

  room: jax.Array


class LongHeadsCache(NamedTuple):
  """``k [B, S, G, K]`` turned by each key's offset in its chunk (``R_{i mod w} k_i``), pre-RoPE
  ``v``; ``reps [B, ceil(S / w), H, K]`` of the complete chunks; ``q_chunk [B, w, H, K]`` the
  un-rotated queries of the current chunk (slot ``i mod w``); ``index``, the tokens written."""

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
    k = attn.rope(k, jnp.reshape(i % w, (1,)))
    cache = LongHeadsCache(
      k=jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), i, 1),
      v=jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), i, 1),
      reps=cache.reps,
      q_chunk=jax.lax.dynamic_update_slice_in_dim(
        cache.q_chunk, q.astype(cache.q_chunk.dtype), i % w, 1
      ),
      index=i + 1,
    )
    o = self._query(attn, q[:, 0], i, cache.k, cache.v, cache.reps)[:, None]

    def close_chunk(c):
      start = i + 1 - w
      chunk = lambda x: jax.lax.dynamic_slice_in_dim(x, start, w, 1)[:, None]
      rep = self.chunk_representations(attn, c.q_chunk[:, None], chunk(c.k), chunk(c.v))
      rep = rep.astype(c.reps.dtype)
      return c._replace(reps=jax.lax.dynamic_update_slice_in_dim(c.reps, rep, i // w, 1))

    cache = jax.lax.cond((i + 1) % w == 0, close_chunk, lambda c: c, cache)
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
    # Within the budget every chunk is selected at its true position: plain attention.
    plain = min(t, self.chunks_per_head * w)
    o = self._plain(attn, q[:, :plain], 0, k_local[:, :plain], v[:, :plain])
    if t > plain:
      one = lambda qi_i: self._query(attn, qi_i[0], qi_i[1], k_local, v, reps)
      rest = jax.lax.map(one, (q[:, plain:].transpose(1, 0, 2, 3), jnp.arange(plain, t)))
      o = jnp.concatenate([o, rest.transpose(1, 0, 2, 3).astype(q.dtype)], axis=1)
    k = k_local
    if cache is None:
      return o, None
    dtype = cache.room.dtype
    pad = lambda x: jnp.pad(x, ((0, 0), (0, room - t), (0, 0), (0, 0))).astype(dtype)
    q_chunk = jnp.zeros((b, w, h, dim), dtype).at[:, : t - full * w].set(q[:, full * w :])
    return o, LongHeadsCache(
      k=pad(k), v=pad(v), reps=reps.astype(dtype), q_chunk=q_chunk, index=jnp.asarray(t, jnp.int32)
    )

  def _extend(self, attn: Attention, q, k, v, cache):
    """A multi-token call at ``cache.index`` after earlier ones."""
    b, t, h, dim = q.shape
    w, i0 = self.chunk_size, cache.index
    k = attn.rope(k, (i0 + jnp.arange(t)) % w)
    k_all = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), i0, 1)
    v_all = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), i0, 1)
    # Queries from the start of the open chunk (base): the cached ones, then the new ones.
    base = i0 - i0 % w
    n = (w + t) // w + 1  # chunks the buffer can reach, one spare for the open chunk's slice
    queries = jnp.zeros((b, n * w, h, dim), cache.q_chunk.dtype)
    queries = queries.at[:, :w].set(cache.q_chunk)
    queries = jax.lax.dynamic_update_slice_in_dim(queries, q.astype(queries.dtype), i0 % w, 1)
    # The chunks this call closes: every one of the buffer that ends by i0 + t.
    closes = base + (jnp.arange(n) + 1) * w <= i0 + t
    slots = jnp.clip(base + jnp.arange(n * w), 0, k_all.shape[1] - 1)
    split = lambda x: x.reshape(b, n, w, *x.shape[2:])
    reps = self.chunk_representations(
      attn, split(queries), split(jnp.take(k_all, slots, 1)), split(jnp.take(v_all, slots, 1))
    )
    ids = jnp.where(closes, base // w + jnp.arange(n), cache.reps.shape[1])  # the others dropped
    reps = cache.reps.at[:, ids].set(reps.astype(cache.reps.dtype), mode="drop")
    end = i0 + t
    plain = min(self.chunks_per_head * w, k_all.shape[1])

    def each_query(_):
      one = lambda qi_i: self._query(attn, qi_i[0], qi_i[1], k_all, v_all, reps)
      o = jax.lax.map(one, (q.transpose(1, 0, 2, 3), i0 + jnp.arange(t)))  # [T, B, H, K]
      return o.transpose(1, 0, 2, 3).astype(q.dtype)

    within = lambda _: self._plain(attn, q, i0, k_all[:, :plain], v_all[:, :plain])
    o = jax.lax.cond(end <= plain, within, each_query, None)
    q_chunk = jax.lax.dynamic_slice_in_dim(queries, end - end % w - base, w, 1)
    cache = LongHeadsCache(k=k_all, v=v_all, reps=reps, q_chunk=q_chunk, index=end)
    return o, cache

  def _plain(self, attn: Attention, q, start, k_local, v):
    """Causal attention of un-rotated ``q [B, T, H, K]`` at positions ``start + t`` over the
    first keys ``k_local, v [B, S, G, K]`` at their true positions (every query within the
    budget)."""
    pos = jnp.arange(k_local.shape[1])
    k_rot = attn.rope(k_local, pos - pos % self.chunk_size)
    q_pos = start + jnp.arange(q.shape[1])
    mask = (pos[None, :] <= q_pos[:, None])[None, None]
    return softmax_values(scores(attn.rope(q, q_pos), k_rot), mask, v, q.dtype)

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

  def _query(self, attn: Attention, q, position, k_local, v, reps):
    """Output ``[B, H, K]`` of un-rotated ``q [B, H, K]`` at ``position`` over the keys of its
    selected chunks (``k_local``, turned by their offsets in the chunk, and ``v``, ``[B, S, G,
    K]``), gathered per head without copying the cache per head."""
    b, h, dim = q.shape
    w, g = self.chunk_size, k_local.shape[2]
    ids, used = self.select(q, position, reps)
    c = ids.shape[-1]
    slots = ids[..., None] * w + jnp.arange(w)  # [B, H, C, w]
    valid = used[..., None] & (slots <= position)
    slots = jnp.clip(slots, 0, k_local.shape[1] - 1).reshape(b, h, c * w)
    # The used chunks come first, the current one last: its rank is the number used minus one.
    # A key at offset o of the chunk of rank m sits at m w + o, the query at q_pos: the score
    # (R_{q_pos} q)·(R_{m w + o} k) is (R_{q_pos - m w} q)·(R_o k), with R_o k as cached.
    n_used = jnp.sum(used, axis=-1, keepdims=True)  # [B, H, 1]
    rank = jnp.where(jnp.arange(c) == c - 1, n_used - 1, jnp.arange(c))  # [B, H, C]
    q_pos = (n_used - 1) * w + position % w
    turned = jnp.broadcast_to(q.reshape(b * h, 1, 1, dim), (b * h, c, 1, dim))
    q_rot = attn.rope(turned, (q_pos - rank * w).reshape(b * h, c)).reshape(b, h, c, dim)
    rows = jnp.arange(b)[:, None, None]
    group = (jnp.arange(h) // (h // g))[None, :, None]
    kg = k_local[rows, slots, group].reshape(b, h, c, w, dim)  # [B, H, C, w, K]
    vg = v[rows, slots, group]  # [B, H, C w, K]
    s = jnp.einsum(
      "bhck,bhcok->bhco", q_rot.astype(jnp.float32), kg.astype(jnp.float32)
    ) / jnp.sqrt(jnp.float32(dim))
    s = jnp.where(valid, s, -jnp.inf).reshape(b, h, c * w)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhs,bhsk->bhk", p, vg.astype(jnp.float32))
