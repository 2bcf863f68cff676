"""Set-Based Prompting (McIlroy-Young et al., NeurIPS'24, arXiv 2406.06581): order-free options.

The prompt is ``A B_1 … B_n C``: a prefix, ``n`` options given as a set, a suffix. Starting from
the causal mask, a token of option ``B_a`` does not see the tokens of another option ``B_b``; the
prefix, the suffix and every generated token see everything before them. Positions: ``A`` takes
``0 .. |A| - 1``, every option restarts at ``|A|``, ``C`` continues from ``|A| + max_a |B_a|`` and
each generated token takes the previous position plus one.

Each option then depends only on ``A`` and itself at order-free positions, and the softmax sums
over keys without regard to their order: the suffix and everything generated are invariant under
any permutation of the options. Keys are cached after RoPE with their positions; a cached call
reads the layout at its slots, so the prompt may arrive in several calls (a chunked prefill).
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.inference.longctx.policy import Policy, check_int, scores, softmax_values
from jaxrec.layers import Attention


class SetBasedCache(NamedTuple):
  """Rotated keys ``k``, values ``v`` ``[B, S, G, K]``; int32 ``positions [S]`` of the written
  slots; int32 ``index``, the number of tokens written."""

  k: jax.Array
  v: jax.Array
  positions: jax.Array
  index: jax.Array


@dataclasses.dataclass(frozen=True)
class SetBased(Policy):
  """Set-Based Prompting over a prompt of ``prefix + sum(options) + suffix`` tokens.

  Attributes:
    prefix: ``|A|`` tokens before the options.
    options: ``(|B_1|, …, |B_n|)``, the lengths of the options (each ``>= 1``).
    suffix: ``|C|`` tokens after them.
  """

  prefix: int
  options: tuple[int, ...]
  suffix: int = 0

  def __post_init__(self):
    check_int("prefix", self.prefix, 0)
    check_int("suffix", self.suffix, 0)
    if not isinstance(self.options, tuple) or not self.options:
      raise ValueError(f"options: expected a non-empty tuple of lengths, got {self.options!r}")
    for n in self.options:
      check_int("options", n, 1)

  @property
  def length(self) -> int:
    """Tokens in the prompt."""
    return self.prefix + sum(self.options) + self.suffix

  def groups(self) -> tuple[np.ndarray, np.ndarray]:
    """``(groups [T], positions [T])`` int32 of the prompt: each token's group (0 shared, ``a``
    for option ``a``) and position; the per-row form of ``SetBasedRows``."""
    group = [0] * self.prefix
    positions = list(range(self.prefix))
    for a, n in enumerate(self.options, start=1):
      group += [a] * n
      positions += range(self.prefix, self.prefix + n)
    start = self.prefix + max(self.options)
    group += [0] * self.suffix
    positions += range(start, start + self.suffix)
    return np.array(group, np.int32), np.array(positions, np.int32)

  def layout(self) -> tuple[np.ndarray, np.ndarray]:
    """``(mask [T, T] bool, positions [T] int32)`` of the prompt."""
    group, positions = self.groups()
    t = self.length
    causal = np.tril(np.ones((t, t), bool))
    apart = (group[:, None] > 0) & (group[None, :] > 0) & (group[:, None] != group[None, :])
    return causal & ~apart, positions

  def init_cache(self, attn: Attention, batch_size: int, max_length: int, dtype):
    shape = (batch_size, max_length, attn.num_kv_heads, attn.head_dim)
    return SetBasedCache(
      k=jnp.zeros(shape, dtype),
      v=jnp.zeros(shape, dtype),
      positions=jnp.zeros((max_length,), jnp.int32),
      index=jnp.zeros((), jnp.int32),
    )

  def attend(self, attn: Attention, q, k, v, *, cache, layer: int):
    t = q.shape[1]
    if cache is None:
      # The prompt in one pass, with its 2-D mask and positions.
      if t != self.length:
        raise ValueError(
          f"tokens: expected the prompt of prefix + options + suffix = {self.length} tokens "
          f"under set_based{(self.prefix, self.options, self.suffix)}, got {t}"
        )
      mask, positions = (jnp.asarray(a) for a in self.layout())
      qr, kr = attn.rope(q, positions), attn.rope(k, positions)
      return softmax_values(scores(qr, kr), mask[None, None], v, q.dtype), None
    # Through a cache, in calls of any length (a chunked prefill, then decoding): a slot of the
    # prompt takes its layout's row and position; a later one sees every key before it, at the
    # position after the one before.
    mask, positions = self.layout()
    room, n = cache.k.shape[1], self.length
    positions = np.concatenate([positions, positions[-1] + 1 + np.arange(max(room - n, 0))])
    slots = cache.index + jnp.arange(t)
    q_pos = jnp.take(jnp.asarray(positions, jnp.int32), slots)
    qr, kr = attn.rope(q, q_pos), attn.rope(k, q_pos)
    cache = SetBasedCache(
      k=jax.lax.dynamic_update_slice_in_dim(cache.k, kr.astype(cache.k.dtype), cache.index, 1),
      v=jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), cache.index, 1),
      positions=jax.lax.dynamic_update_slice_in_dim(cache.positions, q_pos, cache.index, 0),
      index=cache.index + t,
    )
    k_slots = jnp.arange(room)
    rows = jnp.take(jnp.asarray(mask), jnp.clip(slots, 0, n - 1), axis=0)  # [T, n]
    rows = jnp.pad(rows, ((0, 0), (0, max(room - n, 0))))[:, :room]
    in_prompt = (slots[:, None] < n) & (k_slots[None, :] < n)
    visible = jnp.where(in_prompt, rows, k_slots[None, :] <= slots[:, None])
    return softmax_values(scores(qr, cache.k), visible[None, None], cache.v, q.dtype), cache


class SetBasedRowsCache(NamedTuple):
  """Rotated keys ``k``, values ``v`` ``[B, S, G, K]``; int32 ``groups [B, S]`` and ``positions
  [B, S]``, the layout of every slot (written by ``write_layout``); int32 ``index``, the number of
  tokens written."""

  k: jax.Array
  v: jax.Array
  groups: jax.Array
  positions: jax.Array
  index: jax.Array


@dataclasses.dataclass(frozen=True)
class SetBasedRows(Policy):
  """Set-Based Prompting with each row's layout given at run time rather than in the policy.

  ``SetBased`` fixes one prompt layout in the (static) policy, so every layout compiles its own
  program. Here the layout is data in the cache: after ``model.init_cache``, ``write_layout(cache,
  groups, positions)`` sets each row's group and position of every prompt slot, so prompts of
  different layouts run as one batch in one compiled program. A group is ``0`` for shared tokens
  (prefix, suffix), ``a >= 1`` for option ``a`` and ``-1`` for padding, which no token sees
  (prompts padded to one length, on either side); ``SetBased.groups()`` gives one prompt's
  groups and positions. Slots past the written layout are shared tokens at the positions after
  the row's last. A row of shared tokens at positions ``0 ..`` is plain causal attention.

  The rule is ``SetBased``'s: a token of option ``a`` does not see a token of option ``b != a``;
  every other token sees every key before it (padding excepted). Runs through a cache only.
  """

  def init_cache(self, attn: Attention, batch_size: int, max_length: int, dtype):
    shape = (batch_size, max_length, attn.num_kv_heads, attn.head_dim)
    return SetBasedRowsCache(
      k=jnp.zeros(shape, dtype),
      v=jnp.zeros(shape, dtype),
      groups=jnp.zeros((batch_size, max_length), jnp.int32),
      positions=jnp.broadcast_to(jnp.arange(max_length, dtype=jnp.int32), (batch_size, max_length)),
      index=jnp.zeros((), jnp.int32),
    )

  def attend(self, attn: Attention, q, k, v, *, cache, layer: int):
    if cache is None:
      raise ValueError(
        "cache: set_based_rows reads each row's layout from the cache; expected a cache from "
        "init_cache with write_layout, got None"
      )
    t, room = q.shape[1], cache.k.shape[1]
    slots = cache.index + jnp.arange(t)
    q_pos = jnp.take(cache.positions, slots, axis=1)  # [B, T]
    q_grp = jnp.take(cache.groups, slots, axis=1)
    qr, kr = attn.rope(q, q_pos), attn.rope(k, q_pos)
    cache = cache._replace(
      k=jax.lax.dynamic_update_slice_in_dim(cache.k, kr.astype(cache.k.dtype), cache.index, 1),
      v=jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), cache.index, 1),
      index=cache.index + t,
    )
    k_slots = jnp.arange(room)
    k_grp = cache.groups[:, None, :]  # [B, 1, S]
    qg = q_grp[:, :, None]
    apart = (qg > 0) & (k_grp > 0) & (qg != k_grp)
    visible = (k_slots <= slots[:, None]) & (k_grp >= 0) & ~apart  # [B, T, S]
    # A padding query sees nothing else; its own slot keeps its softmax finite (no token reads it).
    visible = visible | (k_slots == slots[:, None])
    return softmax_values(scores(qr, cache.k), visible[:, None], cache.v, q.dtype), cache


def write_layout(cache, groups, positions):
  """``cache`` (a model's, from ``init_cache`` under ``SetBasedRows``) with every
  ``SetBasedRowsCache`` given the prompt layout ``groups, positions`` (int ``[B, N]``, see
  ``SetBasedRows``); slots from ``N`` on become shared tokens at the positions after each row's
  last non-padding one. Other caches (other mixers) are returned as they are."""
  groups, positions = jnp.asarray(groups, jnp.int32), jnp.asarray(positions, jnp.int32)
  if groups.ndim != 2 or groups.shape != positions.shape:
    raise ValueError(
      f"groups, positions: expected int [B, N] arrays of one shape, got {groups.shape} and "
      f"{positions.shape}"
    )
  n = groups.shape[1]

  def write(c):
    if not isinstance(c, SetBasedRowsCache):
      return c
    b, room = c.groups.shape
    if groups.shape[0] != b or n > room:
      raise ValueError(
        f"groups: expected [{b}, <= {room}] for a cache of {b} rows and {room} slots, got "
        f"{groups.shape}"
      )
    last = jnp.max(jnp.where(groups >= 0, positions, -1), axis=1, keepdims=True)
    after = last + 1 + jnp.arange(room - n, dtype=jnp.int32)
    return c._replace(
      groups=jnp.concatenate([groups, jnp.zeros((b, room - n), jnp.int32)], axis=1),
      positions=jnp.concatenate([positions, after], axis=1),
    )

  return jax.tree.map(write, cache, is_leaf=lambda c: isinstance(c, SetBasedRowsCache))
