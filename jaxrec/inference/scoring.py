"""Scoring: the log-likelihood a model gives each next token of a sequence, under a policy."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxrec.inference.longctx.policy import check_policy


def loglikelihood(
  model: nnx.Module, tokens: jax.Array, policy=None, prefill: int | None = None
) -> jax.Array:
  """``log p(tokens[:, t + 1] | tokens[:, :t + 1])`` for every ``t``: fp32 ``[B, T - 1]``.

  With ``prefill=None``, one parallel pass over ``tokens`` without a cache: the policy's prefill
  rule decides what each position attends to (LM-Infinite's Λ-mask, LongHeads' chunks, Set-Based
  Prompting's 2-D mask); policies that only change decoding (Recycled Attention, ThinK) score as
  plain attention there. With ``prefill=P`` the first ``P`` tokens fill a cache in one call and
  the rest are fed one at a time, as generation reads them (teacher-forced decoding), which is
  how those policies are scored.

  Args:
    model: an ``LM`` (``model(tokens, cache=..., policy=...) -> (logits, cache)``).
    tokens: int ``[B, T]``, ``T >= 2``.
    policy: a ``jaxrec.inference.longctx`` policy, or ``None`` for plain attention.
    prefill: ``None`` or the tokens of the prefill call, ``1 <= prefill < T``.
  """
  check_policy(policy)
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
  graphdef, state = nnx.split(model)
  return _loglikelihood(graphdef, state, tokens, policy, prefill)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _loglikelihood(graphdef, state, tokens, policy, prefill):
  model = nnx.merge(graphdef, state)
  kw = {} if policy is None else dict(policy=policy)
  inputs = tokens[:, :-1]
  if prefill is None:
    logits, _ = model(inputs, **kw)
  else:
    cache = model.init_cache(tokens.shape[0], inputs.shape[1], **kw)
    first, cache = model(inputs[:, :prefill], cache=cache, **kw)

    def step(cache, token):
      logits, cache = model(token[:, None], cache=cache, **kw)
      return cache, logits[:, 0]

    _, rest = lax.scan(step, cache, inputs[:, prefill:].T)
    logits = jnp.concatenate([first, rest.transpose(1, 0, 2)], axis=1)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
