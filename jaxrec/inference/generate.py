"""Autoregressive sampling: a parallel prefill that fills the caches, then a jitted decode loop.

Recurrent mixers decode from their O(1) state (GLA's ``[B, H, K, V]``), attention from a KV cache
sized for the prompt plus the new tokens.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxrec.inference.longctx.policy import check_policy


def generate(
  model: nnx.Module,
  prompt: jax.Array | Sequence[int] | Sequence[Sequence[int]],
  max_new_tokens: int,
  temperature: float = 1.0,
  top_k: int | None = None,
  top_p: float | None = None,
  seed: int = 0,
  policy=None,
) -> jax.Array:
  """Samples ``max_new_tokens`` continuations of ``prompt``.

  Args:
    model: an ``LM`` (anything with ``model(tokens, cache=...) -> (logits, cache)`` and
      ``model.init_cache(batch_size, max_length)``).
    prompt: int ``[B, T0]`` array, or a list of ids (one sequence) or of equal-length lists.
    max_new_tokens: number of tokens to generate, ``>= 0``.
    temperature: softmax temperature; ``0`` is greedy decoding (argmax).
    top_k: sample only among the ``k`` most likely tokens.
    top_p: nucleus sampling: only among the most likely tokens whose probabilities sum to
      ``top_p`` (the most likely token is always kept).
    seed: PRNG seed; the same seed gives the same tokens.
    policy: a long-context policy (``jaxrec.inference.longctx``) for the attention layers, at
      prefill and at every decoding step; ``None`` is plain attention.

  Returns:
    int32 ``[B, T0 + max_new_tokens]``: the prompt followed by the generated tokens.
  """
  prompt = _as_prompt(prompt)
  _validate(max_new_tokens, temperature, top_k, top_p)
  check_policy(policy)
  if max_new_tokens == 0:
    return prompt
  graphdef, state = nnx.split(model)
  sampling = (float(temperature), top_k, None if top_p is None else float(top_p))
  key = jax.random.key(seed)
  return _generate(graphdef, state, prompt, key, max_new_tokens, sampling, policy)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _generate(graphdef, state, prompt, key, max_new_tokens, sampling, policy):
  model = nnx.merge(graphdef, state)
  batch, t0 = prompt.shape
  kw = {} if policy is None else dict(policy=policy)
  cache = model.init_cache(batch, t0 + max_new_tokens, **kw)
  # Prefill: one parallel pass over the prompt fills every cache.
  logits, cache = model(prompt, cache=cache, **kw)
  keys = jax.random.split(key, max_new_tokens)
  token = sample_logits(logits[:, -1], keys[0], *sampling)
  out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(token)

  def step(i, carry):
    out, token, cache = carry
    logits, cache = model(token[:, None], cache=cache, **kw)
    token = sample_logits(logits[:, -1], keys[i], *sampling)
    return out.at[:, i].set(token), token, cache

  out, _, _ = lax.fori_loop(1, max_new_tokens, step, (out, token, cache))
  return jnp.concatenate([prompt, out], axis=1)


def sample_logits(
  logits: jax.Array,
  key: jax.Array,
  temperature: float = 1.0,
  top_k: int | None = None,
  top_p: float | None = None,
) -> jax.Array:
  """One token per row of ``logits [B, V]`` (int32 ``[B]``); see ``generate`` for the options."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None and top_k < logits.shape[-1]:
    kth = lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    # Keep the shortest prefix of the sorted distribution whose mass reaches top_p: a token
    # stays if the mass strictly before it is below top_p.
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _as_prompt(prompt) -> jax.Array:
  if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], int):
    prompt = [prompt]
  try:
    prompt = jnp.asarray(prompt)
  except (TypeError, ValueError) as e:
    raise ValueError(f"prompt: expected an int [B, T0] array or list of ids, got {e}") from e
  if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(
      f"prompt: expected a non-empty integer [B, T0] array, got {prompt.dtype} shape {prompt.shape}"
    )
  return prompt.astype(jnp.int32)


def _validate(max_new_tokens, temperature, top_k, top_p):
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
  if temperature < 0:
    raise ValueError(f"temperature: expected >= 0, got {temperature!r}")
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
    raise ValueError(f"top_k: expected a positive int or None, got {top_k!r}")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"top_p: expected a float in (0, 1] or None, got {top_p!r}")
