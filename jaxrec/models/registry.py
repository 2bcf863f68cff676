"""Token mixers by name: the registry from which an ``LM`` builds its layers.

An LM is configured by a per-layer pattern of mixer names (``LMConfig.mixer_pattern``). Each name
maps to a ``MixerEntry``: the module class, a layer of ``jaxrec.layers`` built from plain
arguments, and its builder ``(cfg: LMConfig, *, rngs) -> module``, which turns the ``LMConfig``
fields the mixer needs into those arguments. Only ``jaxrec.models`` reads ``LMConfig``; a layer
never sees it.

Adding a mixer is a change in two places:

1. The layer, ``jaxrec/layers/<mixer>.py``: an ``nnx.Module`` with plain constructor arguments
   (``d_model``, ``num_heads``, its options, ``init_std``, ``num_layers``, ``dtype``,
   ``param_dtype``, ``rngs``) and the mixer interface of ``jaxrec.layers``
   (``__call__(x, *, segment_ids=None, cache=None) -> (y, cache)``, ``init_cache``), exported
   from ``jaxrec.layers``.
2. Its builder in ``jaxrec/models/mixers.py``, registered under its name::

     @register_mixer("mlstm", layers.MLSTM)
     def _mlstm(cfg: LMConfig, *, rngs: nnx.Rngs) -> layers.MLSTM:
       return layers.MLSTM(cfg.d_model, cfg.num_heads, chunk_size=cfg.mlstm_chunk_size, ...)

   with the ``LMConfig`` fields it reads that no other mixer has, named after the mixer
   (``mlstm_chunk_size``), documented and validated in ``LMConfig``.

The name then works everywhere: in ``mixer_pattern``, the presets and ``--config.model.
mixer_pattern``.

Import order inside ``jaxrec.models``: this module imports nothing from it, so ``config`` can
validate names against ``MIXERS``; ``mixers`` (the builders) imports ``config`` and this module;
``lm`` builds every mixer through ``mixers``, so the built-in mixers are registered before any
model (or preset) exists.
"""

from collections.abc import Callable
from typing import NamedTuple

from flax import nnx

# (cfg: LMConfig, *, rngs: nnx.Rngs) -> the mixer; LMConfig is not named here because config.py
# imports this module to validate mixer names.
MixerBuilder = Callable[..., nnx.Module]


class MixerEntry(NamedTuple):
  """A registered mixer.

  Attributes:
    module: the ``nnx.Module`` class (from ``jaxrec.layers``).
    build: ``build(cfg, *, rngs)`` returns a ``module`` configured by the ``LMConfig`` ``cfg``.
  """

  module: type[nnx.Module]
  build: MixerBuilder


MIXERS: dict[str, MixerEntry] = {}


def register_mixer(name: str, module: type[nnx.Module]) -> Callable[[MixerBuilder], MixerBuilder]:
  """Decorator registering a builder ``(cfg: LMConfig, *, rngs) -> module`` under ``name``.

  Args:
    name: the mixer's name in ``LMConfig.mixer_pattern``.
    module: the class the builder returns.

  Raises:
    ValueError: ``name`` is taken by another module (registering the same module again, e.g. on
      a reload of the builders' module, replaces its builder).
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"name: expected a non-empty string, got {name!r}")
  if not (isinstance(module, type) and issubclass(module, nnx.Module)):
    raise ValueError(f"module: expected an nnx.Module class, got {module!r}")
  if name in MIXERS and MIXERS[name].module is not module:
    raise ValueError(
      f"name: mixer {name!r} is already registered to {MIXERS[name].module.__name__}, "
      f"cannot register {module.__name__}"
    )

  def register(build: MixerBuilder) -> MixerBuilder:
    MIXERS[name] = MixerEntry(module, build)
    return build

  return register


def get_mixer(name: str) -> MixerEntry:
  """The module and builder registered under ``name``."""
  if name not in MIXERS:
    raise ValueError(f"name: unknown mixer {name!r}; registered mixers: {mixer_names()}")
  return MIXERS[name]


def mixer_names() -> tuple[str, ...]:
  """The registered mixer names, sorted (for error messages)."""
  return tuple(sorted(MIXERS))
