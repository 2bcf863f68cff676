"""LM-Infinite (Han et al., NAACL'24, arXiv 2308.16137): a Λ-shaped mask with a distance cap.

A query at position ``i`` sees, with ``L = window``, ``G = global_tokens`` and ``d = distance_cap``:

* the local keys ``i - L < j <= i`` with their true RoPE score ``(R_i q_i)·(R_j k_j) / sqrt(K)``;
* the global keys ``j < G`` with ``j <= i - L`` at the capped distance
  ``(R_{d'} q_i)·k_j / sqrt(K)``, ``d' = min(d, i)``: the query turned by ``d'``, the key
  un-rotated, so every global key looks ``d'`` tokens away whatever ``i`` is (the reference code's
  ``min(d, T_kv - 1)`` read causally, so that decoding one token at a time equals the prefill);
* nothing else; one softmax runs over the union.

Optionally (``top_k > 0``, the authors' later addition) the last query of each call in layers
``>= top_k_from_layer`` also sees the ``top_k`` middle keys ``G <= j <= i - L`` that score highest
under ``(R_{top_k_insert_at} q_i)·k_j / sqrt(K)``, with those scores. A prompt prefilled in
chunks (``chunked``) gives them only to its last query, as one call would.

The cache holds the ``G`` global keys un-rotated (they are seen at the capped distance) and a ring
of the last ``L`` keys rotated at their own positions (local scores are the true RoPE scores, so
rotating them once is exact): ``O(G + L)`` memory and decoding time, whatever the context; with
``top_k`` also every key un-rotated. A multi-token call runs blockwise: queries in blocks of
``min(T, L)`` against the ``L + block`` keys that can reach them plus the global keys,
``O(T·(L + G))`` time; decoding one token writes its key into the ring in place and merges the
local and global softmax terms without copying the ring.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrec.inference.longctx.policy import (
  Policy,
  check_int,
  merged_softmax_values,
  repeat_kv,
  scores,
)
from jaxrec.layers import Attention


class LMInfiniteCache(NamedTuple):
  """Pre-RoPE keys and values of an LM-Infinite layer.

  Attributes:
    k_global, v_global: ``[B, G, Gk, K]``, the first ``G`` tokens (slot = position), keys
      un-rotated.
    k_ring, v_ring: ``[B, R, Gk, K]``, ``R = min(L, S)``, the last ``R`` tokens (slot = position
      mod ``R``), keys rotated at their positions.
    k_all, v_all: ``[B, S, Gk, K]`` every token (slot = position) with ``top_k``, else ``[B, 0,
      Gk, K]``.
    index: int32 scalar, the number of tokens seen.
  """

  k_global: jax.Array
  v_global: jax.Array
  k_ring: jax.Array
  v_ring: jax.Array
  k_all: jax.Array
  v_all: jax.Array
  index: jax.Array


@dataclasses.dataclass(frozen=True)
class LMInfinite(Policy):
  """LM-Infinite's Λ-mask (see the module docstring); defaults of the paper's Llama-2 runs.

  Attributes:
    global_tokens: ``G``, the starting tokens every query sees (10 for passkey, 100 for
      perplexity in the paper).
    window: ``L``, the local keys a query sees, its own included.
    distance_cap: ``d >= L``, the distance at which the global keys are seen.
    top_k: middle keys added to the last query (0: none; the paper's passkey runs use 5).
    top_k_from_layer: first layer (0-based) with the top-k middle keys.
    top_k_insert_at: the distance at which the middle keys are scored.
    prompt_length: set by ``chunked`` for a prompt prefilled in several calls: of the queries of
      multi-token calls only the one at ``prompt_length - 1`` sees the middle keys (decoding
      steps always do); ``None``: the last query of every call.
  """

  global_tokens: int = 10
  window: int = 4096
  distance_cap: int = 4096
  top_k: int = 0
  top_k_from_layer: int = 4
  top_k_insert_at: int = 2048
  prompt_length: int | None = None

  def __post_init__(self):
    check_int("global_tokens", self.global_tokens, 0)
    check_int("window", self.window, 1)
    check_int("distance_cap", self.distance_cap, 1)
    check_int("top_k", self.top_k, 0)
    check_int("top_k_from_layer", self.top_k_from_layer, 0)
    check_int("top_k_insert_at", self.top_k_insert_at, 0)
    if self.prompt_length is not None:
      check_int("prompt_length", self.prompt_length, 1)
    if self.window > self.distance_cap:
      raise ValueError(
        f"window: expected at most distance_cap={self.distance_cap} (local keys are never "
        f"farther than the cap), got {self.window}"
      )

  def chunked(self, prompt_length: int) -> "LMInfinite":
    return dataclasses.replace(self, prompt_length=prompt_length) if self.top_k else self

  def init_cache(self, attn: Attention, batch_size: int, max_length: int, dtype):
    head = (attn.num_kv_heads, attn.head_dim)
    zeros = lambda n: jnp.zeros((batch_size, n, *head), dtype)
    full = max_length if self.top_k else 0
    ring = min(self.window, max_length)  # a shorter ring holds every token the cache will see
    return LMInfiniteCache(
      k_global=zeros(self.global_tokens),
      v_global=zeros(self.global_tokens),
      k_ring=zeros(ring),
      v_ring=zeros(ring),
      k_all=zeros(full),
      v_all=zeros(full),
      index=jnp.zeros((), jnp.int32),
    )

  def attend(self, attn: Attention, q, k, v, *, cache, layer: int):
    b, t = q.shape[:2]
    fresh = cache is None
    if fresh:
      cache = self.init_cache(attn, b, t, k.dtype)
    index = cache.index
    big_l, g = self.window, self.global_tokens
    new_k, new_v = k.astype(cache.k_ring.dtype), v.astype(cache.v_ring.dtype)
    new_rot = attn.rope(k, index + jnp.arange(t)).astype(cache.k_ring.dtype)
    # Global slots: position s, from the cache if already seen, else from the new tokens.
    slots = jnp.arange(g)
    from_new = jnp.clip(slots - index, 0, max(t - 1, 0))
    seen = (slots < index)[None, :, None, None]
    k_glob = jnp.where(seen, cache.k_global, new_k[:, from_new])
    v_glob = jnp.where(seen, cache.v_global, new_v[:, from_new])
    if self.top_k:
      k_all = jax.lax.dynamic_update_slice_in_dim(cache.k_all, new_k, index, 1)
      v_all = jax.lax.dynamic_update_slice_in_dim(cache.v_all, new_v, index, 1)
    else:
      k_all, v_all = cache.k_all, cache.v_all
    middle = (k_all, v_all) if self.top_k and layer >= self.top_k_from_layer else None
    ring = cache.k_ring.shape[1]
    if t == 1 and not fresh:
      k_ring = jax.lax.dynamic_update_slice_in_dim(cache.k_ring, new_rot, index % ring, 1)
      v_ring = jax.lax.dynamic_update_slice_in_dim(cache.v_ring, new_v, index % ring, 1)
      o = self._decode(attn, q, k_ring, v_ring, k_glob, v_glob, index, middle)
    else:
      # Local keys in position order: the ring (positions index - L ..; a ring shorter than L
      # is padded in front), then the new tokens.
      front = ((0, 0), (big_l - ring, 0), (0, 0), (0, 0))
      local = lambda r, x: jnp.concatenate([jnp.pad(jnp.roll(r, -(index % ring), 1), front), x], 1)
      k_loc, v_loc = local(cache.k_ring, new_rot), local(cache.v_ring, new_v)
      o = self._blockwise(attn, q, k_loc, v_loc, k_glob, v_glob, index, middle)
      tail = slice(k_loc.shape[1] - ring, None)
      k_ring = jnp.roll(k_loc[:, tail], (index + t) % ring, axis=1)
      v_ring = jnp.roll(v_loc[:, tail], (index + t) % ring, axis=1)
    if fresh:
      return o, None
    return o, LMInfiniteCache(
      k_global=k_glob,
      v_global=v_glob,
      k_ring=k_ring,
      v_ring=v_ring,
      k_all=k_all,
      v_all=v_all,
      index=index + t,
    )

  def _decode(self, attn: Attention, q, k_ring, v_ring, k_glob, v_glob, index, middle):
    """One query at ``index`` against the ring (slot ``s`` holds position ``index - ((index - s)
    mod L)``), the global keys and the top-k middle; softmax terms merged by their maxima."""
    big_l, g = self.window, self.global_tokens
    ring = k_ring.shape[1]
    ring_pos = index - (index - jnp.arange(ring)) % ring
    q_rot = attn.rope(q, index[None])
    q_cap = attn.rope(q, jnp.minimum(self.distance_cap, index)[None])
    parts = [
      (scores(q_rot, k_ring), ring_pos >= 0, v_ring),
      (scores(q_cap, k_glob), jnp.arange(g) <= index - big_l, v_glob),
    ]
    if middle is not None:
      parts.append(self._middle(attn, q, index, middle))
    return merged_softmax_values(parts, q.dtype)

  def _middle(self, attn: Attention, q, index, middle):
    """``(scores [B, H, 1, k], mask, values [B, k, ...])`` of the last query's top-k middle keys
    (``G <= j <= i - L``) scored at distance ``top_k_insert_at``; per head, so values are
    gathered per query head."""
    k_all, v_all = middle
    h = q.shape[2]
    i = index + q.shape[1] - 1
    last = attn.rope(q[:, -1:], jnp.full((1,), self.top_k_insert_at))
    sm = scores(last, k_all)[:, :, 0]  # [B, H, S]
    j = jnp.arange(k_all.shape[1])
    candidate = (j >= self.global_tokens) & (j <= i - self.window)
    if self.prompt_length is not None:
      # Chunked prefill: inside the prompt only its last query takes the middle keys.
      candidate &= i >= self.prompt_length - 1
    top, idx = jax.lax.top_k(jnp.where(candidate, sm, -jnp.inf), min(self.top_k, k_all.shape[1]))
    vv = jnp.take_along_axis(repeat_kv(v_all, h), idx.transpose(0, 2, 1)[..., None], axis=1)
    return top[:, :, None], top[:, :, None] > -jnp.inf, vv

  def _blockwise(self, attn: Attention, q, k_loc, v_loc, k_glob, v_glob, index, middle):
    """Queries in blocks of ``min(T, L)``, each against its ``L + block`` local keys (``k_loc``,
    rotated: positions ``index - L ..``), the global keys and, for the last query, the top-k
    middle."""
    b, t, h, dim = q.shape
    big_l, g = self.window, self.global_tokens
    block = min(t, big_l)
    nb = -(-t // block)
    pad = nb * block - t
    q_pos = index + jnp.arange(nb * block)
    k_pos = index - big_l + jnp.arange(big_l + nb * block)
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_rot = attn.rope(qp, q_pos).astype(jnp.float32)
    q_cap = attn.rope(qp, jnp.minimum(self.distance_cap, q_pos)).astype(jnp.float32)
    kp = jnp.pad(k_loc, ((0, 0), (0, pad), (0, 0), (0, 0)))
    vp = jnp.pad(v_loc, ((0, 0), (0, pad), (0, 0), (0, 0)))
    k_rot = repeat_kv(kp, h).astype(jnp.float32)
    vp = repeat_kv(vp, h).astype(jnp.float32)
    take = jnp.arange(nb)[:, None] * block + jnp.arange(big_l + block)  # [nb, L + block]
    kb, vb, pb = k_rot[:, take], vp[:, take], k_pos[take]
    qb = q_rot.reshape(b, nb, block, h, dim)
    qpos = q_pos.reshape(nb, block)
    scale = 1 / jnp.sqrt(jnp.float32(dim))
    s_loc = jnp.einsum("bnqhk,bnshk->bnhqs", qb, kb) * scale
    dist = qpos[:, :, None] - pb[:, None, :]  # [nb, block, L + block]
    m_loc = (dist >= 0) & (dist < big_l) & (pb[:, None, :] >= 0)
    kg = repeat_kv(k_glob, h).astype(jnp.float32)
    s_glob = jnp.einsum("bnqhk,bghk->bnhqg", q_cap.reshape(b, nb, block, h, dim), kg) * scale
    m_glob = jnp.arange(g)[None, None, :] <= qpos[:, :, None] - big_l
    s = jnp.concatenate([s_loc, s_glob], axis=-1)
    m = jnp.concatenate([m_loc, m_glob], axis=-1)[None, :, None]
    vals = [vb, jnp.broadcast_to(repeat_kv(v_glob, h)[:, None], (b, nb, g, h, dim))]
    if middle is not None:
      s, m, vals = self._with_middle(attn, q, s, m, vals, middle, index, block, nb)
    p = jax.nn.softmax(jnp.where(m, s, -jnp.inf), axis=-1)
    v_all = jnp.concatenate([x.astype(jnp.float32) for x in vals], axis=2)
    o = jnp.einsum("bnhqs,bnshk->bnqhk", p, v_all).reshape(b, nb * block, h, dim)
    return o[:, :t].astype(q.dtype)

  def _with_middle(self, attn: Attention, q, s, m, vals, middle, index, block, nb):
    """Adds the top-k middle keys to the last query's row (in the last block)."""
    b, t = q.shape[:2]
    top, _, vv = self._middle(attn, q, index, middle)
    top = top[:, :, 0]
    row = (nb - 1, (t - 1) % block)
    extra_s = jnp.full((*s.shape[:-1], top.shape[-1]), -jnp.inf).at[:, row[0], :, row[1]].set(top)
    vv = jnp.broadcast_to(vv[:, None], (b, nb, *vv.shape[1:]))
    s = jnp.concatenate([s, extra_s], axis=-1)
    m = jnp.concatenate([jnp.broadcast_to(m, s.shape[:-1] + m.shape[-1:]), extra_s > -jnp.inf], -1)
    return s, m, [*vals, vv]
