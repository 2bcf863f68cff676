"""The long-context policy protocol: how an attention layer (``jaxrec.layers.Attention``) reads
its keys.

A policy is a frozen (hashable, static) dataclass with the paper's defaults. Applied to a model
(``jaxrec.inference.longctx.apply(model, policy)``, which wraps each attention layer in a
``PolicyAttention``), it takes over the attention of the layer after the projections:

* ``init_cache(attn, batch_size, max_length, dtype)`` builds the layer's cache: what it holds
  (pre-RoPE keys and their positions where the method rotates keys at attention time, pruned
  channels, recycled indices ...);
* ``attend(attn, q, k, v, cache=..., layer=...)`` gets the layer's un-rotated queries ``[B, T, H,
  K]`` and keys and values ``[B, T, G, K]`` and returns the heads' outputs ``[B, T, H, K]`` and
  the advanced cache; ``cache=None`` is a one-shot pass over the whole sequence (scoring),
  ``layer`` the depth of the layer (LM-Infinite's top-k starts at layer 4). With a cache, a
  multi-token call continues after earlier ones (a chunked prefill, ``jaxrec.inference.
  prefill``), and a chunked prefill equals one call;
* ``chunked(prompt_length)`` is the policy for such a chunked prefill and the decoding after it
  (itself, unless the method decides something from the end of the prompt); ``longctx.chunked(
  model, prompt_length)`` puts it into a model's wrappers.

``attn`` lends the layer's RoPE (``attn.rope``) and head counts. Packed sequences
(``segment_ids``) are not supported by policies.

A decoding step costs what reading its cache costs only if it reads the cache where it lies:
the policies store what a step reads head-major (``[B, G, S, K]``, as ``KVCache``), attend over
the cache as it was and the new token as separate key sets
(``jaxrec.ops.attention.merged_grouped_attention``), and write the token after the products
(``written_after``), so that XLA updates the cache in place instead of copying it every step.
"""

import abc
import dataclasses

import jax
import jax.numpy as jnp

from jaxrec.layers import Attention


@dataclasses.dataclass(frozen=True)
class Policy(abc.ABC):
  """Base class of the long-context policies (see the module docstring)."""

  @abc.abstractmethod
  def init_cache(self, attn: Attention, batch_size: int, max_length: int, dtype: jnp.dtype):
    """The layer's empty cache, with room for ``max_length`` tokens where it keeps them all."""

  @abc.abstractmethod
  def attend(self, attn: Attention, q, k, v, *, cache, layer: int):
    """``(heads [B, T, H, K], cache)`` for un-rotated ``q [B, T, H, K]`` and ``k, v [B, T, G,
    K]``."""

  def chunked(self, prompt_length: int) -> "Policy":
    """The policy for a prompt of ``prompt_length`` tokens prefilled in several calls, and for
    the decoding after it.

    A method that reads a chunk after earlier ones as one call would read them returns itself
    (the default). One whose prefill decides something from the end of the prompt (ThinK's
    pruning, LM-Infinite's top-k for the last query) returns a variant that knows where the
    prompt ends, so that the chunked prefill equals one call.
    """
    del prompt_length
    return self


def check_policy(policy) -> None:
  """Raises ``ValueError`` unless ``policy`` is a ``Policy``."""
  if not isinstance(policy, Policy):
    raise ValueError(
      "policy: expected a jaxrec.inference.longctx policy (lm_infinite, recycled, "
      f"longheads, think, set_based), got {policy!r}"
    )


def cache_bytes(cache) -> int:
  """Bytes held by the arrays of a cache (any pytree of arrays, e.g. ``LM.init_cache``'s)."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(cache))


def check_int(name: str, value, minimum: int) -> None:
  """Raises ``ValueError`` naming ``name`` unless ``value`` is an int ``>= minimum``."""
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def repeat_kv(x: jax.Array, heads: int) -> jax.Array:
  """``[B, S, G, K]`` -> ``[B, S, H, K]``: each key/value head serves ``H / G`` query heads."""
  return jnp.repeat(x, heads // x.shape[2], axis=2)


def scores(q: jax.Array, k: jax.Array) -> jax.Array:
  """fp32 ``q·k / sqrt(K)`` ``[B, H, T, S]`` for ``q [B, T, H, K]``, ``k [B, S, G, K]`` (each key
  head serving its ``H / G`` query heads, without copying the keys)."""
  b, t, h, dim = q.shape
  g = k.shape[2]
  qg = q.astype(jnp.float32).reshape(b, t, g, h // g, dim)
  s = jnp.einsum("btgrk,bsgk->bgrts", qg, k.astype(jnp.float32))
  return s.reshape(b, h, t, k.shape[1]) / jnp.sqrt(jnp.float32(dim))


def weighted_values(p: jax.Array, v: jax.Array) -> jax.Array:
  """fp32 ``p v`` ``[B, T, H, K]`` for weights ``p [B, H, T, S]`` and ``v [B, S, G, K]``."""
  b, h, t, n = p.shape
  g = v.shape[2]
  out = jnp.einsum("bgrts,bsgk->btgrk", p.reshape(b, g, h // g, t, n), v.astype(jnp.float32))
  return out.reshape(b, t, h, v.shape[-1])


def softmax_values(s: jax.Array, mask: jax.Array, v: jax.Array, dtype) -> jax.Array:
  """``softmax(s where mask) v`` -> ``[B, T, H, K]`` for ``s [B, H, T, S]``, ``v [B, S, G, K]``;
  the softmax in fp32, the output in ``dtype``."""
  p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
  return weighted_values(p, v).astype(dtype)
