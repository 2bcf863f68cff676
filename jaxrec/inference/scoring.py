"""Scoring: the log-likelihood a model gives each next token of a sequence, under a policy."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrec.inference.longctx.policy import check_policy


def loglikelihood(model: nnx.Module, tokens: jax.Array, policy=None) -> jax.Array:
  """``log p(tokens[:, t + 1] | tokens[:, :t + 1])`` for every ``t``: fp32 ``[B, T - 1]``.

  One parallel pass over ``tokens`` (no cache): the policy's prefill rule decides what each
  position attends to (LM-Infinite's Λ-mask, LongHeads' chunks, Set-Based Prompting's 2-D mask).
  Policies that only change decoding (Recycled Attention, ThinK) score as plain attention here.

  Args:
    model: an ``LM`` (``model(tokens, policy=...) -> (logits, cache)``).
    tokens: int ``[B, T]``, ``T >= 2``.
    policy: a ``jaxrec.inference.longctx`` policy, or ``None`` for plain attention.
  """
  check_policy(policy)
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2 or tokens.shape[1] < 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(
      f"tokens: expected an integer [B, T] array with T >= 2, got {tokens.dtype} "
      f"shape {tokens.shape}"
    )
  graphdef, state = nnx.split(model)
  return _loglikelihood(graphdef, state, tokens, policy)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _loglikelihood(graphdef, state, tokens, policy):
  model = nnx.merge(graphdef, state)
  logits, _ = model(tokens[:, :-1], **({} if policy is None else dict(policy=policy)))
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
