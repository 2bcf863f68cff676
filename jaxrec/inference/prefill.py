"""How prompts enter the caches: bucketed left padding, chunked prefill, the trained-context check.

**Ragged batches.** Prompts of different lengths share a batch left-padded to one length, the
padding as a document of its own: ``segment_ids`` is 0 on the padding and 1 on the prompt. Every
mixer restarts where the id changes (a recurrent state starts from zero at the prompt, attention
never crosses into the padding, a convolution's window is cut), so each row computes what it
computes alone; only the positions shift by the padding, which RoPE's relative scores do not see
(up to rounding). All rows end at the same column, so decoding runs them in lock-step and every
decoded token continues its row's last document (``segment_ids=None``).

**Buckets.** The padded length is rounded up to a bucket (by default a power of two, at least
``MIN_BUCKET``), and so is the number of new tokens, so that a session of prompts of many lengths
compiles one program per bucket rather than one per length.

**Chunked prefill.** A prompt longer than ``prefill_chunk`` tokens enters the caches in
consecutive calls of at most that many tokens. A cached call continues exactly where the previous
one stopped (the state hand-over every mixer keeps), so the result equals one call, while what a
call holds at once (attention's ``[B, H, C, S]`` scores, the ``[B, C, V]`` logits) grows with the
chunk ``C``, not with the prompt: ``O(C · S)`` instead of ``O(S²)``. The full chunks run as one
``lax.scan`` (one compiled body).

A cached call's first token always continues the document of the cache's last token
(``segment_starts`` never marks step 0), so a prompt whose padding ended exactly at a chunk
boundary would be read as a continuation of the padding. The schedule therefore shifts its
boundaries by a short head chunk of ``r`` tokens, the smallest ``r`` at which no row's prompt
starts on a boundary (``r = 0``, no shift, unless some padding is a multiple of the chunk).

One mixer reads a chunked prefill differently from one call, by its definition: prefix linear
attention (``"pla"``) reads a document's prefix non-causally only within the call where the
document starts (prefix tokens in a later call are read causally, as decoding reads them);
``check_prefix_chunks`` warns when a prefix crosses a chunk boundary. RAT's chunk grid runs over
the row rather than from each document's start, so left padding moves a ragged row's RAT chunks
(a chunked prefill is exact for it: its cached form counts positions over the row too).
"""

import warnings
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrec.inference.longctx.substitution import policy_of

MIN_BUCKET = 16
DEFAULT_PREFILL_CHUNK = 2048

Buckets = Literal["pow2"] | Sequence[int] | None


def check_buckets(buckets: Buckets) -> None:
  """Raises ``ValueError`` unless ``buckets`` is ``"pow2"``, ``None`` or increasing lengths."""
  if buckets is None or (isinstance(buckets, str) and buckets == "pow2"):
    return
  if (
    isinstance(buckets, str)
    or not isinstance(buckets, Sequence)
    or not buckets
    or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets)
    or list(buckets) != sorted(set(buckets))
  ):
    raise ValueError(
      f"buckets: expected 'pow2', None (no bucketing) or increasing positive lengths, got "
      f"{buckets!r}"
    )


def bucket_length(n: int, buckets: Buckets) -> int:
  """The bucket of a length ``n``: ``n`` itself with ``buckets=None``; the next power of two (at
  least ``MIN_BUCKET``) with ``"pow2"``; the first listed length ``>= n`` otherwise, or past the
  list the next power of two."""
  pow2 = max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())
  if buckets is None:
    return n
  if isinstance(buckets, str):
    return pow2
  return next((b for b in buckets if b >= n), 1 << max(n - 1, 0).bit_length())


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int):
  """``(tokens, segment_ids)``, int32 ``[B, length]`` numpy arrays: each prompt right-aligned after
  ``pad_id`` padding; ``segment_ids`` 0 on the padding, 1 on the prompt."""
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  segment_ids = np.zeros((len(prompts), length), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, length - len(prompt) :] = prompt
    segment_ids[row, length - len(prompt) :] = 1
  return tokens, segment_ids


class ChunkSchedule(NamedTuple):
  """The calls of a prefill: a ``head`` chunk, ``count`` chunks of ``size`` tokens (one
  ``lax.scan``), a ``tail`` chunk; ``head`` and ``tail`` may be 0."""

  head: int
  size: int
  count: int
  tail: int

  @property
  def length(self) -> int:
    return self.head + self.size * self.count + self.tail

  @property
  def calls(self) -> int:
    return (self.head > 0) + self.count + (self.tail > 0)


def chunk_schedule(length: int, chunk: int | None, starts: Sequence[int] = ()) -> ChunkSchedule:
  """The calls that prefill ``length`` tokens in chunks of at most ``chunk`` (``None``: one call).

  ``starts`` are the columns where a row's prompt starts after its padding: no chunk boundary
  falls on one (see the module docstring), by a head chunk of the smallest length ``r`` that no
  ``start`` is congruent to modulo ``chunk``. Without a head, a one-token remainder goes first
  rather than last, where a long-context policy would read it as a decoding step.
  """
  if chunk is None or length <= chunk:
    return ChunkSchedule(length, chunk or length, 0, 0)
  taken = {s % chunk for s in starts if 0 < s < length}
  head = next(r for r in range(chunk) if r not in taken)
  count, tail = divmod(length - head, chunk)
  if (head, tail) == (0, 1):
    # A long-context policy reads a one-token call as a decoding step: the prompt's last call
    # has more tokens.
    head, tail = 1, 0
  return ChunkSchedule(head, chunk, count, tail)


def check_prefill_chunk(prefill_chunk: int | None) -> None:
  if prefill_chunk is not None and (
    isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1
  ):
    raise ValueError(f"prefill_chunk: expected a positive int or None, got {prefill_chunk!r}")


def same_structure(a, b) -> bool:
  """Whether two pytrees have the same structure, leaf shapes and dtypes (a loop carry)."""
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  return all(
    x.shape == y.shape and x.dtype == y.dtype
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def scan_chunks(step: Callable, carry, xs, schedule: ChunkSchedule):
  """``step(carry, chunk) -> (carry, ys)`` over consecutive time chunks of ``xs`` (a pytree of
  ``[B, T, ...]`` arrays) in the calls of ``schedule``; returns the last carry and the ``ys``
  (pytrees of ``[B, t, ...]``) concatenated along time.

  The full chunks run in one ``lax.scan``. A carry whose structure the first call changes (a
  long-context cache that an empty one becomes, e.g. LongHeads') has that call run before the
  scan.
  """
  head, size, count, tail = schedule
  cut = lambda start, n: jax.tree.map(lambda x: lax.slice_in_dim(x, start, start + n, axis=1), xs)
  outs = []
  if head:
    carry, y = step(carry, cut(0, head))
    outs.append(y)
  start = head
  if count and not head:
    after = jax.eval_shape(step, carry, cut(0, size))[0]
    if not same_structure(after, carry):
      carry, y = step(carry, cut(0, size))
      outs.append(y)
      start, count = size, count - 1
  if count:
    b = jax.tree.leaves(xs)[0].shape[0]

    def chunks(x):
      x = lax.slice_in_dim(x, start, start + count * size, axis=1)
      return jnp.swapaxes(x.reshape(b, count, size, *x.shape[2:]), 0, 1)

    carry, ys = lax.scan(step, carry, jax.tree.map(chunks, xs))
    outs.append(jax.tree.map(lambda y: jnp.swapaxes(y, 0, 1).reshape(b, -1, *y.shape[3:]), ys))
    start += count * size
  if tail:
    carry, y = step(carry, cut(start, tail))
    outs.append(y)
  return carry, jax.tree.map(lambda *ys: jnp.concatenate(ys, axis=1), *outs)


def check_context(model, tokens: int, *, stacklevel: int = 3) -> None:
  """Warns when ``tokens`` (prompt and new tokens) pass the context the model was trained for
  (``cfg.max_seq_len``) and no long-context policy is applied to ``model``."""
  cfg = getattr(model, "cfg", None)
  limit = getattr(cfg, "max_seq_len", None)
  if limit is None or tokens <= limit or policy_of(model) is not None:
    return
  warnings.warn(
    f"prompt: {tokens} tokens pass the model's trained context (max_seq_len={limit}) without a "
    "long-context policy; attention past it sees distances it never trained on. Apply one, "
    "jaxrec.inference.longctx.apply(model, jaxrec.inference.longctx.lm_infinite(...)) (or "
    "another policy of jaxrec.inference.longctx), or shorten the prompt.",
    stacklevel=stacklevel,
  )


def check_prefix_chunks(
  model, schedule: ChunkSchedule, starts: Sequence[int], *, stacklevel: int = 4
) -> None:
  """Warns when a prefix-linear-attention layer's document prefix (``pla.prefix_len`` tokens from
  a prompt's start, ``starts``) crosses a boundary of the prefill's chunks: that prefix is then
  read in part causally (see the module docstring)."""
  cfg = getattr(model, "cfg", None)
  if schedule.calls == 1 or "pla" not in getattr(cfg, "mixer_pattern", ()):
    return
  prefix = cfg.options("pla").prefix_len
  if not prefix:
    return
  first = schedule.head or schedule.size
  bounds = range(first, schedule.length, schedule.size)
  crossed = [s for s in starts if any(s < b < min(s + prefix, schedule.length) for b in bounds)]
  if crossed:
    warnings.warn(
      f"prefill_chunk: the prefix of pla.prefix_len={prefix} tokens of a prompt starting at "
      f"column {crossed[0]} crosses a boundary of the {schedule.size}-token prefill chunks, so "
      "prefix linear attention reads part of it causally; pass a larger prefill_chunk or None "
      "for the one-call prefill.",
      stacklevel=stacklevel,
    )
