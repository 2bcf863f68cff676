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

  def layout(self) -> tuple[np.ndarray, np.ndarray]:
    """``(mask [T, T] bool, positions [T] int32)`` of the prompt."""
    group = [0] * self.prefix  # 0: shared, a: option a
    positions = list(range(self.prefix))
    for a, n in enumerate(self.options, start=1):
      group += [a] * n
      positions += range(self.prefix, self.prefix + n)
    start = self.prefix + max(self.options)
    group += [0] * self.suffix
    positions += range(start, start + self.suffix)
    group, t = np.array(group), self.length
    causal = np.tril(np.ones((t, t), bool))
    apart = (group[:, None] > 0) & (group[None, :] > 0) & (group[:, None] != group[None, :])
    return causal & ~apart, np.array(positions, np.int32)

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
