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
``O(T·(L + G))`` time. The cache is head-major (``[B, Gk, S, K]``, ``jaxrec.layers.KVCache``'s
layout): decoding one token reads the ring and the global keys where they lie (with ``top_k``
also scores every key there and gathers the chosen ones), its own key as a set of its own, under
one softmax (``merged_grouped_attention``), and writes the token into the ring in place
afterwards, so that a step copies nothing of the cache.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrec.inference.longctx.policy import Policy, check_int, repeat_kv
from jaxrec.layers import Attention
from jaxrec.ops.attention import KeySet, merged_grouped_attention, written_after


class LMInfiniteCache(NamedTuple):
  """Pre-RoPE keys and values of an LM-Infinite layer, head-major (``jaxrec.layers.KVCache``'s
  layout: a decoding step reads each key/value head's keys where they lie).

  Attributes:
    k_global, v_global: ``[B, Gk, G, K]``, the first ``G`` tokens (slot = position), keys
      un-rotated.
    k_ring, v_ring: ``[B, Gk, R, K]``, ``R = min(L, S)``, the last ``R`` tokens (slot = position
      mod ``R``), keys rotated at their positions.
    k_all, v_all: ``[B, Gk, S, K]`` every token (slot = position) with ``top_k``, else ``[B, Gk,
      0, K]``.
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
    zeros = lambda n: jnp.zeros((batch_size, attn.num_kv_heads, n, attn.head_dim), dtype)
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
    # The new tokens head-major, as the cache stores them.
    head_major = lambda x: jnp.swapaxes(x, 1, 2).astype(cache.k_ring.dtype)
    new_k, new_v = head_major(k), head_major(v)
    new_rot = head_major(attn.rope(k, index + jnp.arange(t)))
    middle = bool(self.top_k) and layer >= self.top_k_from_layer
    if t == 1 and not fresh:
      o = self._decode(attn, q, cache, new_rot, new_v, middle)
      # Written after the products that read the cache as it was, so that XLA writes in place.
      return o, self._written(cache, *(written_after(x, o) for x in (new_k, new_rot, new_v)))
    # The blockwise pass reads the global keys and k_all with the new tokens written.
    written = self._written(cache, new_k, new_rot, new_v)
    seq = lambda x: jnp.swapaxes(x, 1, 2)
    # Local keys seq-major in position order: the ring (positions index - L ..; a ring shorter
    # than L is padded in front), then the new tokens.
    ring = cache.k_ring.shape[2]
    front = ((0, 0), (self.window - ring, 0), (0, 0), (0, 0))
    roll = lambda r: jnp.roll(seq(r), -(index % ring), 1)
    local = lambda r, x: jnp.concatenate([jnp.pad(roll(r), front), seq(x)], 1)
    o = self._blockwise(
      attn,
      q,
      local(cache.k_ring, new_rot),
      local(cache.v_ring, new_v),
      seq(written.k_global),
      seq(written.v_global),
      index,
      (written.k_all, written.v_all) if middle else None,
    )
    return o, None if fresh else written

  def _written(self, cache, k, k_rot, v):
    """``cache`` advanced by ``T`` new tokens (head-major ``[B, Gk, T, K]``; ``k`` un-rotated,
    ``k_rot`` rotated at their positions): the global slots they reach, their slots of ``k_all``
    (with ``top_k``) and the ring slots of the last ``min(T, R)``."""
    index, t = cache.index, k.shape[2]
    slots = jnp.arange(self.global_tokens)
    # A global slot not seen yet takes the new token at its position, or the last one (a
    # placeholder, replaced when its own token comes).
    from_new = jnp.clip(slots - index, 0, t - 1)
    seen = (slots < index)[:, None]
    glob = lambda c, x: jnp.where(seen, c, x[:, :, from_new])
    ring = cache.k_ring.shape[2]
    if t == 1:
      put = lambda c, x: jax.lax.dynamic_update_slice_in_dim(c, x, index % ring, 2)
    else:
      n = min(t, ring)
      at = (index + jnp.arange(t - n, t)) % ring
      put = lambda c, x: c.at[:, :, at].set(x[:, :, t - n :])
    update = jax.lax.dynamic_update_slice_in_dim
    full = lambda c, x: update(c, x, index, 2) if self.top_k else c
    return LMInfiniteCache(
      k_global=glob(cache.k_global, k),
      v_global=glob(cache.v_global, v),
      k_ring=put(cache.k_ring, k_rot),
      v_ring=put(cache.v_ring, v),
      k_all=full(cache.k_all, k),
      v_all=full(cache.v_all, v),
      index=index + t,
    )

  def _decode(self, attn: Attention, q, cache, k_rot, v, middle: bool):
    """One query at ``index`` against the cache as it was and its own key and value ``k_rot, v
    [B, Gk, 1, K]``: the ring (true RoPE scores), the global keys (the query turned by the capped
    distance) and, with ``middle``, the top-k middle keys, under one softmax
    (``merged_grouped_attention``: every set read where it lies, none copied).

    The query heads of a key/value group go in as query rows of one head (``[B, R, Gk, K]``, the
    same products), so that each head's middle keys can be masked for it alone.
    """
    b, _, h, dim = q.shape
    g, ring = cache.k_ring.shape[1:3]
    r = h // g
    index, big_l = cache.index, self.window
    # [B, 1, H, K] -> [B, R, Gk, K]: query head j * R + i is row i of key/value head j.
    rows = lambda x: x.reshape(b, g, r, dim).transpose(0, 2, 1, 3)
    mask = lambda m: jnp.broadcast_to(m, (b, 1, r, m.shape[-1]))
    # Ring slot s holds position index - 1 - ((index - 1 - s) mod R), negative if not written.
    held = index - 1 - (index - 1 - jnp.arange(ring)) % ring
    q_cap = rows(attn.rope(q, jnp.minimum(self.distance_cap, index)[None]))
    sets = [
      KeySet(cache.k_ring, cache.v_ring, mask((held >= 0) & (index - held < big_l))),
      KeySet(k_rot, v, mask(jnp.ones(1, bool))),
      KeySet(
        cache.k_global, cache.v_global, mask(jnp.arange(self.global_tokens) <= index - big_l), q_cap
      ),
    ]
    if middle:
      _, slots, count = self._middle(attn, q, index, cache.k_all)
      n = slots.shape[2] // r
      pick = lambda x: jnp.take_along_axis(x, slots[..., None], axis=2)  # [B, Gk, R·n, K]
      # Row i sees the keys its own head chose, those that were candidates.
      own = jnp.eye(r, dtype=bool)[:, :, None] & (jnp.arange(n) < count)
      q_mid = rows(attn.rope(q, jnp.full((1,), self.top_k_insert_at)))
      sets.append(KeySet(pick(cache.k_all), pick(cache.v_all), mask(own.reshape(r, r * n)), q_mid))
    o = merged_grouped_attention(rows(attn.rope(q, index[None])), sets)
    return o.transpose(0, 2, 1, 3).reshape(b, 1, h, dim)

  def _middle(self, attn: Attention, q, index, k_all):
    """The last query's top-k middle keys (``G <= j <= i - L``) scored at distance
    ``top_k_insert_at``, each query head its own: ``(scores [B, H, n], slots [B, Gk, R·n],
    count)``, ``n = min(top_k, S)``, the slots of a group's ``R`` heads in turn. Each head's first
    ``count`` are candidates (``top_k`` ranks them first), its others score ``-inf``."""
    b, t, h, dim = q.shape
    g = k_all.shape[1]
    i = index + t - 1
    last = attn.rope(q[:, -1:], jnp.full((1,), self.top_k_insert_at))
    qg = last.reshape(b, g, h // g, dim).astype(k_all.dtype)
    sm = jnp.einsum("bgrk,bgsk->bgrs", qg, k_all, preferred_element_type=jnp.float32)
    sm = sm / jnp.sqrt(jnp.float32(dim))
    j = jnp.arange(k_all.shape[2])
    candidate = (j >= self.global_tokens) & (j <= i - self.window)
    if self.prompt_length is not None:
      # Chunked prefill: inside the prompt only its last query takes the middle keys.
      candidate &= i >= self.prompt_length - 1
    top, slots = jax.lax.top_k(jnp.where(candidate, sm, -jnp.inf), min(self.top_k, k_all.shape[2]))
    return top.reshape(b, h, -1), slots.reshape(b, g, -1), candidate.sum()

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
    b, t, h, dim = q.shape
    k_all, v_all = middle
    top, slots, _ = self._middle(attn, q, index, k_all)
    # Each query head's chosen values, [B, n, H, K].
    vv = jnp.take_along_axis(v_all, slots[..., None], axis=2)
    vv = vv.reshape(b, h, -1, dim).transpose(0, 2, 1, 3)
    row = (nb - 1, (t - 1) % block)
    extra_s = jnp.full((*s.shape[:-1], top.shape[-1]), -jnp.inf).at[:, row[0], :, row[1]].set(top)
    vv = jnp.broadcast_to(vv[:, None], (b, nb, *vv.shape[1:]))
    s = jnp.concatenate([s, extra_s], axis=-1)
    m = jnp.concatenate([jnp.broadcast_to(m, s.shape[:-1] + m.shape[-1:]), extra_s > -jnp.inf], -1)
    return s, m, [*vals, vv]
