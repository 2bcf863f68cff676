"""ThinK (Xu et al., ICLR'25, arXiv 2407.21018): prune the least important key channels, composable
with SnapKV-style token eviction.

At prefill (full attention, outputs unchanged) the prompt's keys are split into the last
``observation`` tokens, kept whole, and the older ones. Optionally the older ones are first
evicted SnapKV-style: the attention of the ``observation`` last queries (summed over them and over
the query heads of each key head, max-pooled over ``kernel`` neighbouring positions) keeps the
``capacity - observation`` best per key head. Then for every key head ``g`` and channel ``c`` of the
(rotated) older keys::

  score[c] = sum_{h in g} ||Q_obs,h[:, c] K_g[:, c]^T||_F = sum_h ||Q_obs,h[:, c]|| ||K_g[:, c]||

and the ``floor(channel_ratio · K)`` lowest channels are dropped: older keys are stored as
``K[:, keep]`` with the kept channel indices per head. Values, the observation window and every
generated token keep all channels. Decoding scores an older key as ``q[keep]·k[keep] / sqrt(K)``
(the scale of the full width; equal to zero-filling the pruned channels).

The paper scores each query head after ``repeat_kv`` and stores per query head; scoring per key
head (summing its query heads) keeps grouped-query caches at ``G`` heads and is the same method
when ``H == G``.

A prompt prefilled in several calls (``chunked``, ``jaxrec.inference.prefill``) keeps every key
whole (``ThinKFilling``) with the queries of its last ``observation`` tokens; the first decoding
step then evicts and prunes exactly as the one-call prefill of the whole prompt does, so the two
agree.
"""

import dataclasses
import math
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
from jaxrec.ops.attention import KeySet, merged_grouped_attention, written_after


class ThinKEmpty(NamedTuple):
  """A ThinK cache before its prefill: ``room [S, 0]`` only records the capacity ``S``."""

  room: jax.Array


class ThinKFilling(NamedTuple):
  """A ThinK cache during a chunked prefill.

  Attributes:
    k, v: rotated keys and values ``[B, S, G, K]`` of the tokens so far (slot = position).
    q_obs: rotated queries ``[B, observation, H, K]`` of the last ``observation`` tokens, oldest
      first.
    index: int32, the tokens written.
  """

  k: jax.Array
  v: jax.Array
  q_obs: jax.Array
  index: jax.Array


class ThinKCache(NamedTuple):
  """A prefilled ThinK cache, head-major (``jaxrec.layers.KVCache``'s layout): a decoding step
  reads each key/value head's keys where they lie, with no copy or transpose.

  Attributes:
    k_old: rotated older keys ``[B, G, P, K - pruned]``, channels ``keep``.
    v_old: their values ``[B, G, P, K]``.
    keep: int32 ``[B, G, K - pruned]``, the kept channels of each key head.
    k_new, v_new: ``[B, G, R, K]``, the observation window and the generated tokens.
    filled: int32, slots of ``k_new`` written.
    position: int32, the position of the next token.
  """

  k_old: jax.Array
  v_old: jax.Array
  keep: jax.Array
  k_new: jax.Array
  v_new: jax.Array
  filled: jax.Array
  position: jax.Array

  def key_bytes(self) -> tuple[int, int]:
    """``(bytes of the pruned older keys, bytes they would take unpruned)``."""
    full = self.k_old.size // max(self.k_old.shape[-1], 1) * self.v_old.shape[-1]
    return self.k_old.nbytes, full * self.k_old.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class SnapKV:
  """SnapKV token eviction for ``think(..., eviction=...)``: keep ``capacity`` prompt tokens per
  key head (the observation window included), chosen by the pooled attention of the window."""

  capacity: int = 512
  kernel: int = 7

  def __post_init__(self):
    check_int("capacity", self.capacity, 1)
    check_int("kernel", self.kernel, 1)
    if self.kernel % 2 == 0:
      raise ValueError(f"kernel: expected an odd pooling width, got {self.kernel}")


@dataclasses.dataclass(frozen=True)
class ThinK(Policy):
  """ThinK key-channel pruning (see the module docstring).

  Attributes:
    channel_ratio: ``λ in [0, 1)``, the fraction of key channels dropped (0.4 in the paper).
    observation: the last prompt tokens whose queries score the channels, kept whole (32).
    eviction: ``SnapKV`` token eviction applied first, or ``None``.
    prompt_length: set by ``chunked`` for a prompt prefilled in several calls: keys stay whole
      until the first decoding step, which evicts and prunes as a one-call prefill of
      ``prompt_length`` tokens does; ``None``: the prefill call prunes.
  """

  channel_ratio: float = 0.4
  observation: int = 32
  eviction: SnapKV | None = None
  prompt_length: int | None = None

  def __post_init__(self):
    r = self.channel_ratio
    if isinstance(r, bool) or not isinstance(r, int | float) or not 0 <= r < 1:
      raise ValueError(f"channel_ratio: expected a number in [0, 1), got {r!r}")
    check_int("observation", self.observation, 1)
    if self.eviction is not None and not isinstance(self.eviction, SnapKV):
      raise ValueError(f"eviction: expected None or a SnapKV, got {self.eviction!r}")
    if self.eviction is not None and self.eviction.capacity <= self.observation:
      raise ValueError(
        f"eviction: expected a capacity above observation={self.observation}, got "
        f"{self.eviction.capacity}"
      )
    if self.prompt_length is not None:
      check_int("prompt_length", self.prompt_length, 1)

  def chunked(self, prompt_length: int) -> "ThinK":
    return dataclasses.replace(self, prompt_length=prompt_length)

  def init_cache(self, attn: Attention, batch_size: int, max_length: int, dtype):
    return ThinKEmpty(room=jnp.zeros((max_length, 0), dtype))

  def attend(self, attn: Attention, q, k, v, *, cache, layer: int):
    if self.prompt_length is not None and isinstance(cache, ThinKEmpty):
      b, h, dim = q.shape[0], q.shape[2], q.shape[3]
      shape = (b, cache.room.shape[0], *k.shape[2:])
      zeros = lambda shape: jnp.zeros(shape, cache.room.dtype)
      cache = ThinKFilling(
        zeros(shape), zeros(shape), zeros((b, self.observation, h, dim)), jnp.zeros((), jnp.int32)
      )
      return self._fill(attn, q, k, v, cache)  # even one token: the prompt's first
    if isinstance(cache, ThinKFilling):
      if q.shape[1] > 1:
        return self._fill(attn, q, k, v, cache)
      # The first decoding step: the prompt is complete.
      cache = self._finish(cache)
    if cache is None or isinstance(cache, ThinKEmpty):
      return self._prefill(attn, q, k, v, cache)
    if q.shape[1] != 1:
      raise ValueError(
        f"tokens: after its prefill a ThinK cache decodes one token at a time, got {q.shape[1]}"
      )
    return self._decode(attn, q, k, v, cache)

  def _decode(self, attn: Attention, q, k, v, cache):
    """One decoding step: the new token attends over the pruned older keys (scored by its kept
    channels at the full width's scale ``K ** -0.5``), the written slots of ``k_new`` and itself,
    read where they lie as three key sets; it is written into ``k_new`` after the products
    (``written_after``), so that XLA updates the cache in place instead of copying it."""
    position = cache.position[None]
    qr, kr = attn.rope(q, position), attn.rope(k, position)
    b, h = q.shape[0], q.shape[2]
    keep = repeat_kv(cache.keep[:, None], h)[:, 0]  # [B, H, kept]
    q_kept = jnp.take_along_axis(qr[:, 0], keep, axis=-1)[:, None]  # [B, 1, H, kept]
    # The new token head-major, [B, G, 1, K], in the cache's dtype as it is stored.
    k_tok, v_tok = (jnp.swapaxes(a, 1, 2).astype(cache.k_new.dtype) for a in (kr, v))
    every = lambda n: jnp.ones((b, 1, 1, n), bool)
    room = cache.k_new.shape[2]
    filled = jnp.broadcast_to(jnp.arange(room) < cache.filled, (b, 1, 1, room))
    o = merged_grouped_attention(
      qr,
      [
        KeySet(cache.k_old, cache.v_old, every(cache.k_old.shape[2]), q=q_kept),
        KeySet(cache.k_new, cache.v_new, filled),
        KeySet(k_tok, v_tok, every(1)),
      ],
    )
    write = lambda x, new: jax.lax.dynamic_update_slice_in_dim(
      x, written_after(new, o), cache.filled, 2
    )
    return o, cache._replace(
      k_new=write(cache.k_new, k_tok),
      v_new=write(cache.v_new, v_tok),
      filled=cache.filled + 1,
      position=cache.position + 1,
    )

  def _prefill(self, attn: Attention, q, k, v, cache):
    t = q.shape[1]
    positions = jnp.arange(t)
    qr, kr = attn.rope(q, positions), attn.rope(k, positions)
    s = scores(qr, kr)
    causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
    o = softmax_values(s, causal, v, q.dtype)
    if cache is None:
      return o, None
    old = t - min(self.observation, t)
    obs = slice(old, None)
    room, dtype = cache.room.shape[0], cache.room.dtype
    return o, self._compress(qr[:, obs], kr, v, s[:, :, obs], causal[:, :, obs], room, dtype)

  def _fill(self, attn: Attention, q, k, v, cache):
    """A chunk of a chunked prefill: full causal attention over every key so far."""
    t = q.shape[1]
    positions = cache.index + jnp.arange(t)
    qr, kr = attn.rope(q, positions), attn.rope(k, positions)
    k_all = jax.lax.dynamic_update_slice_in_dim(cache.k, kr.astype(cache.k.dtype), cache.index, 1)
    v_all = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), cache.index, 1)
    mask = (jnp.arange(k_all.shape[1])[None, :] <= positions[:, None])[None, None]
    o = softmax_values(scores(qr, k_all), mask, v_all, q.dtype)
    q_obs = jnp.concatenate([cache.q_obs, qr.astype(cache.q_obs.dtype)], axis=1)
    q_obs = q_obs[:, -self.observation :]
    return o, ThinKFilling(k_all, v_all, q_obs, cache.index + t)

  def _finish(self, cache):
    """The compressed cache of a chunked prefill of ``prompt_length`` tokens, as one call."""
    t = self.prompt_length
    recent = min(self.observation, t)
    kr, v = cache.k[:, :t], cache.v[:, :t]
    q_obs = cache.q_obs[:, self.observation - recent :]
    rows = (t - recent + jnp.arange(recent))[:, None]
    mask = (jnp.arange(t)[None, :] <= rows)[None, None]
    s = scores(q_obs, kr)
    return self._compress(q_obs, kr, v, s, mask, cache.k.shape[1], cache.k.dtype)

  def _compress(self, q_obs, kr, v, s_obs, mask_obs, room, dtype):
    """The ``ThinKCache`` of a prompt: its rotated keys ``kr`` and values ``v`` ``[B, T, G,
    K]``, the rotated queries ``q_obs [B, R, H, K]`` of its last ``R`` tokens and their scores
    ``s_obs [B, H, R, T]`` (visible where ``mask_obs``); ``room`` slots in all. The keys and
    values are made head-major here, once per prompt."""
    b, t, g = kr.shape[:3]
    recent = q_obs.shape[1]
    old = t - recent
    kr, v = jnp.swapaxes(kr, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, G, T, K]
    rows = jnp.broadcast_to(jnp.arange(old), (b, g, old))  # [B, G, P]
    if self.eviction is not None and old > self.eviction.capacity - recent:
      rows = self._evict(s_obs, mask_obs, old, recent, g)
    pick = lambda x: jnp.take_along_axis(x[:, :, :old], rows[..., None], axis=2)
    k_old, v_old = pick(kr), pick(v)
    keep = self._channels(q_obs, k_old)
    k_old = jnp.take_along_axis(k_old, keep[:, :, None], axis=-1)
    room = room - old
    pad = lambda x: jnp.pad(x[:, :, old:], ((0, 0), (0, 0), (0, room - recent), (0, 0)))
    return ThinKCache(
      k_old=k_old.astype(dtype),
      v_old=v_old.astype(dtype),
      keep=keep,
      k_new=pad(kr).astype(dtype),
      v_new=pad(v).astype(dtype),
      filled=jnp.asarray(recent, jnp.int32),
      position=jnp.asarray(t, jnp.int32),
    )

  def _evict(self, s_obs, mask_obs, old, recent, kv_heads):
    """SnapKV: ``[B, G, capacity - recent]`` older rows (sorted) kept per key head."""
    p = jax.nn.softmax(jnp.where(mask_obs, s_obs, -jnp.inf), axis=-1)[..., :old]
    votes = p.sum(axis=2)  # [B, H, P]
    b, h = votes.shape[:2]
    votes = votes.reshape(b, kv_heads, h // kv_heads, old).sum(axis=2)
    width = self.eviction.kernel
    votes = jax.lax.reduce_window(
      votes, -jnp.inf, jax.lax.max, (1, 1, width), (1, 1, 1), [(0, 0), (0, 0), (width // 2,) * 2]
    )
    _, rows = jax.lax.top_k(votes, self.eviction.capacity - recent)
    return jnp.sort(rows, axis=-1)

  def _channels(self, q_obs, k_old):
    """``[B, G, K - pruned]`` kept channels (ascending) by the query-driven score of the older keys
    ``k_old [B, G, P, K]``."""
    dim = k_old.shape[-1]
    pruned = math.floor(self.channel_ratio * dim)
    q_norm = jnp.sqrt(jnp.sum(jnp.square(q_obs.astype(jnp.float32)), axis=1))  # [B, H, K]
    b, h = q_norm.shape[:2]
    g = k_old.shape[1]
    q_norm = q_norm.reshape(b, g, h // g, dim)
    k_norm = jnp.sqrt(jnp.sum(jnp.square(k_old.astype(jnp.float32)), axis=2))  # [B, G, K]
    score = jnp.sum(q_norm * k_norm[:, :, None], axis=2)
    _, keep = jax.lax.top_k(score, dim - pruned)
    return jnp.sort(keep, axis=-1)
