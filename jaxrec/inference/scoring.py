"""Scoring: the log-likelihood a model gives each next token of a sequence (under a long-context
policy when one is applied to the model, ``jaxrec.inference.longctx.apply``).

Only the log-probabilities of the target tokens are kept: ``log p(y) = logit_y - logsumexp(logits)``
per position, so a long sequence never holds its ``[T, V]`` log-softmax beside the logits. A
sequence longer than ``prefill_chunk`` is read in chunks through a cache (as
``jaxrec.inference.prefill`` describes): the same numbers, with memory that grows with the chunk
(``[B, C, V]`` logits, ``[B, H, C, S]`` attention scores) instead of the sequence.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxrec.inference import prefill as prefill_lib
from jaxrec.inference.longctx import substitution


def loglikelihood(
  model: nnx.Module,
  tokens: jax.Array,
  prefill: int | None = None,
  *,
  prefill_chunk: int | None = prefill_lib.DEFAULT_PREFILL_CHUNK,
) -> jax.Array:
  """``log p(tokens[:, t + 1] | tokens[:, :t + 1])`` for every ``t``: fp32 ``[B, T - 1]``.

  With ``prefill=None``, one parallel pass over ``tokens`` without a cache: a policy's prefill
  rule decides what each position attends to (LM-Infinite's Λ-mask, LongHeads' chunks, Set-Based
  Prompting's 2-D mask); policies that only change decoding (Recycled Attention, ThinK) score as
  plain attention there. With ``prefill=P`` the first ``P`` tokens fill a cache and the rest are
  fed one at a time, as generation reads them (teacher-forced decoding), which is how those
  policies are scored.

  Args:
    model: an ``LM`` (``model(tokens, cache=...) -> (logits, cache)``), possibly with a
      long-context policy applied (``jaxrec.inference.longctx.apply``); a chunked prefill runs
      ``longctx.chunked(model, prefill_length)``.
    tokens: int ``[B, T]``, ``T >= 2``.
    prefill: ``None`` or the tokens of the prefill, ``1 <= prefill < T``.
    prefill_chunk: a pass (``prefill=None``) or a prefill longer than this runs in chunks of this
      many tokens through a cache; equal up to rounding, with memory bounded by the chunk.
      ``None``: one call.
  """
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2 or tokens.shape[1] < 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(
      f"tokens: expected an integer [B, T] array with T >= 2, got {tokens.dtype} "
      f"shape {tokens.shape}"
    )
  if prefill is not None and (
    isinstance(prefill, bool) or not isinstance(prefill, int) or not 1 <= prefill < tokens.shape[1]
  ):
    raise ValueError(f"prefill: expected None or an int in [1, {tokens.shape[1]}), got {prefill!r}")
  prefill_lib.check_prefill_chunk(prefill_chunk)
  prefill_lib.check_context(model, tokens.shape[1] - 1)
  inputs = tokens.shape[1] - 1
  chunked = prefill if prefill is not None else inputs
  schedule = prefill_lib.chunk_schedule(chunked, prefill_chunk)
  prefill_lib.check_prefix_chunks(model, schedule, [0], stacklevel=3)
  if schedule.calls == 1 and prefill is None:
    schedule = None  # one pass without a cache
  elif schedule.calls > 1:
    model = substitution.chunked(model, chunked)
  graphdef, state = nnx.split(model)
  return _loglikelihood(graphdef, state, tokens, prefill, schedule)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _loglikelihood(graphdef, state, tokens, prefill, schedule):
  model = nnx.merge(graphdef, state)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  if schedule is None:
    logits, _ = model(inputs)
    return _target_logp(logits, targets)
  cache = model.init_cache(tokens.shape[0], inputs.shape[1])

  def chunk_step(cache, chunk):
    logits, cache = model(chunk["inputs"], cache=cache)
    return cache, _target_logp(logits, chunk["targets"])

  n = schedule.length
  xs = {"inputs": inputs[:, :n], "targets": targets[:, :n]}
  cache, first = prefill_lib.scan_chunks(chunk_step, cache, xs, schedule)
  if prefill is None or n == inputs.shape[1]:
    return first

  def step(cache, token_target):
    token, target = token_target
    logits, cache = model(token[:, None], cache=cache)
    return cache, _target_logp(logits, target[:, None])[:, 0]

  rest = (inputs[:, n:].T, targets[:, n:].T)
  after = jax.eval_shape(step, cache, jax.tree.map(lambda x: x[0], rest))[0]
  peeled = []
  if not prefill_lib.same_structure(after, cache):
    # The first decoding step changes the cache's structure (ThinK compresses a chunked
    # prefill's cache there): it runs before the scan.
    cache, logp = step(cache, jax.tree.map(lambda x: x[0], rest))
    peeled, rest = [logp[:, None]], jax.tree.map(lambda x: x[1:], rest)
  _, logp = lax.scan(step, cache, rest)
  return jnp.concatenate([first, *peeled, logp.T], axis=1)


def _target_logp(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """fp32 ``[B, T]`` log-probabilities of ``targets [B, T]`` under ``logits [B, T, V]``."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)
