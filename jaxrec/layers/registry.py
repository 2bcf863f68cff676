"""Token mixers by name, so an LM is configured by a per-layer pattern of names.

A mixer is an ``nnx.Module`` built as ``Mixer(cfg, *, rngs)`` from an ``LMConfig`` with::

  __call__(x [B, T, D], *, segment_ids=None, cache=None) -> (y [B, T, D], cache)
  init_cache(batch_size, max_length, dtype) -> cache

``cache`` is a pytree (the mixer's decoding state); ``None`` in means no state is kept and
``None`` comes back. Decoding is the same call with ``T = 1``.
"""

from collections.abc import Callable

from flax import nnx

MIXERS: dict[str, type[nnx.Module]] = {}


def register_mixer(name: str) -> Callable[[type[nnx.Module]], type[nnx.Module]]:
  """Class decorator that registers a mixer under ``name``."""

  def register(cls: type[nnx.Module]) -> type[nnx.Module]:
    if name in MIXERS and MIXERS[name] is not cls:
      raise ValueError(f"name: mixer {name!r} is already registered to {MIXERS[name].__name__}")
    MIXERS[name] = cls
    return cls

  return register


def get_mixer(name: str) -> type[nnx.Module]:
  """The mixer class registered under ``name``."""
  if name not in MIXERS:
    raise ValueError(f"name: unknown mixer {name!r}; registered mixers: {tuple(sorted(MIXERS))}")
  return MIXERS[name]
