"""A long-context policy applied to a model by module substitution.

``apply(model, policy)`` returns a copy of an ``LM`` whose attention mixers are each wrapped in a
``PolicyAttention``: the same projections (the very parameter ``Variable`` objects of ``model``,
so no array is copied and an update of ``model``'s parameters shows in the copy), read through the
policy after them. The wrapper is an ordinary mixer (``__call__(x, *, segment_ids=None,
cache=None) -> (y, cache)``, ``init_cache(batch_size, max_length, dtype)``), so the copy is a
plain ``LM``: ``model(tokens, cache=...)``, ``init_cache``, ``jaxrec.generate``, ``Sampler``,
``loglikelihood``, remat and jit run on it unchanged. The policy is a static attribute of the
wrapper; it lives in the model's graph definition, so a jitted function over ``nnx.split`` of the
copy compiles once per policy.

**Chunked prefill.** A policy whose prefill decides something from the end of the prompt
(``Policy.chunked``) must know where the prompt ends when the prompt enters the cache in several
calls. ``chunked(model, prompt_length)`` returns the model whose wrappers hold
``policy.chunked(prompt_length)``; ``jaxrec.generate`` and ``loglikelihood`` call it when their
prefill takes more than one call, and a hand-written chunked prefill should do the same.
"""

from typing import TYPE_CHECKING

import jax.numpy as jnp
from flax import nnx

from jaxrec.inference.longctx.policy import Policy, check_int, check_policy
from jaxrec.layers import Attention
from jaxrec.typing import Activations

if TYPE_CHECKING:
  from jaxrec.models import LM


class PolicyAttention(nnx.Module):
  """``attention``'s projections with ``policy`` deciding, between them, what the cache holds and
  which keys each query sees at which positions.

  Args:
    attention: the wrapped layer; its parameters are used as they are, not copied.
    policy: a ``jaxrec.inference.longctx`` policy.
    layer: the depth of ``attention`` in its model (LM-Infinite's top-k starts at a depth).
  """

  def __init__(self, attention: Attention, policy: Policy, *, layer: int):
    if not isinstance(attention, Attention):
      raise ValueError(
        f"attention: expected a jaxrec.layers.Attention, got {type(attention).__name__}"
      )
    check_policy(policy)
    check_int("layer", layer, 0)
    self.attention = attention
    self.policy = policy
    self.layer = layer

  def __call__(self, x: Activations, *, segment_ids=None, cache=None):
    """``(y [B, T, D], cache)``: ``x [B, T, D]`` attended under the policy, continuing ``cache``
    (from ``init_cache``; ``None`` is one pass over the whole sequence)."""
    if segment_ids is not None:
      raise ValueError(
        "segment_ids: packed sequences are not supported under a long-context policy "
        f"({type(self.policy).__name__}); expected None"
      )
    attn = self.attention
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    o, cache = self.policy.attend(attn, q, k, v, cache=cache, layer=self.layer)
    return attn.o_proj(o), cache

  def init_cache(self, batch_size: int, max_length: int, dtype: jnp.dtype):
    """The policy's empty cache for this layer (room for ``max_length`` tokens where it keeps
    them all)."""
    return self.policy.init_cache(self.attention, batch_size, max_length, dtype)


def apply(model: "LM", policy: Policy) -> "LM":
  """A copy of ``model`` whose attention layers read their keys through ``policy``.

  Every mixer that is a ``jaxrec.layers.Attention`` attending with its own call is wrapped in
  ``PolicyAttention(mixer, policy, layer=i)``, ``i`` its depth; other mixers (recurrent ones,
  Liger's attention, which attends its own way) are left as they are. The copy shares ``model``'s
  parameter variables (no array is copied) and ``model`` is left as it was.

  Raises:
    ValueError: ``model`` is not an ``LM`` with its blocks in a list (``scan_layers`` stacks
      them, and a policy needs each layer's depth), has no attention layer, or already has a
      policy; ``policy`` is not a policy.
  """
  check_policy(policy)
  blocks = _blocks(model)
  if policy_of(model) is not None:
    raise ValueError(
      f"model: already has the long-context policy {policy_of(model)!r}; apply {policy!r} to the "
      "model without one"
    )
  wrapped = [i for i, block in enumerate(blocks) if _attends_itself(block.mixer)]
  if not wrapped:
    raise ValueError(
      f"model: has no attention layer for the policy to govern (mixers {model.cfg.layer_mixers})"
    )
  new = nnx.clone(model, variables=False)
  for i in wrapped:
    new.layers[i].mixer = PolicyAttention(new.layers[i].mixer, policy, layer=i)
  return new


def policy_of(model: nnx.Module) -> Policy | None:
  """The policy of ``model``'s ``PolicyAttention`` layers (``apply`` gives them all one), or
  ``None`` for a model without one."""
  return next((m.policy for m in _wrappers(model)), None)


def chunked(model: "LM", prompt_length: int) -> "LM":
  """The model for a prompt of ``prompt_length`` tokens prefilled in several calls and for the
  decoding after it: each wrapper's policy becomes ``policy.chunked(prompt_length)`` (see the
  module docstring). ``model`` itself when that changes nothing (no policy, or one that reads a
  chunk after earlier ones as one call would); otherwise a copy sharing its variables."""
  check_int("prompt_length", prompt_length, 1)
  if all(m.policy.chunked(prompt_length) == m.policy for m in _wrappers(model)):
    return model
  new = nnx.clone(model, variables=False)
  for m in _wrappers(new):
    m.policy = m.policy.chunked(prompt_length)
  return new


def _wrappers(model: nnx.Module) -> list[PolicyAttention]:
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, PolicyAttention)]


def _attends_itself(mixer: nnx.Module) -> bool:
  """An ``Attention`` whose call is ``Attention``'s own: what a policy takes over after the
  projections (a subclass with its own call, Liger's, attends its own way)."""
  return isinstance(mixer, Attention) and type(mixer).__call__ is Attention.__call__


def _blocks(model) -> nnx.List:
  """``model``'s blocks, checked to be an ``LM``'s list of blocks (the models package is not
  imported here: ``import jaxrec`` loads generation, not the models)."""
  cfg = getattr(model, "cfg", None)
  if not isinstance(model, nnx.Module) or cfg is None or not hasattr(model, "layers"):
    raise ValueError(f"model: expected a jaxrec.models.LM, got {type(model).__name__}")
  if cfg.scan_layers:
    raise ValueError(
      "model: long-context policies wrap each attention layer with its depth; build the model "
      "with scan_layers=False (got scan_layers=True)"
    )
  return model.layers
