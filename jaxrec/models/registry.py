"""Token mixers by name: the registry from which an ``LM`` builds its layers.

An LM is configured by a per-layer pattern of mixer names (``LMConfig.mixer_pattern``). Each name
maps to a ``MixerEntry``: the module class, a layer of ``jaxrec.layers`` built from plain
arguments; its options, a small frozen dataclass of what only this mixer reads (GLA's
``chunk_size``, ...); and its builder ``(cfg: LMConfig, options, *, rngs) -> module``, which turns
the fields every model has (``d_model``, ``num_heads``, dtypes, ...) and the options into the
layer's arguments. ``LMConfig`` holds the options of its mixers (``cfg.options("gla")``, the
registered defaults unless given) and checks them when it is made; only ``jaxrec.models`` reads
``LMConfig``, a layer never sees it.

Adding a mixer is a change in two places:

1. The layer, ``jaxrec/layers/<mixer>.py``: an ``nnx.Module`` with plain constructor arguments
   (``d_model``, ``num_heads``, its options, ``init_std``, ``num_layers``, ``dtype``,
   ``param_dtype``, ``rngs``) and the mixer interface of ``jaxrec.layers``
   (``__call__(x, *, segment_ids=None, cache=None) -> (y, cache)``, ``init_cache``), exported
   from ``jaxrec.layers``.
2. Its options and builder in ``jaxrec/models/mixers.py``, registered under its name::

     @dataclasses.dataclass(frozen=True)
     class MLSTMOptions:
       chunk_size: int = 64  # defaults: what a model gets when nothing is given

       def __post_init__(self):  # each option on its own; errors start with its name
         _checks.check_positive_int("chunk_size", self.chunk_size)

       def check(self, cfg):  # optional: the options against the model's shared fields
         ...

     @register_mixer("mlstm", layers.MLSTM, options=MLSTMOptions)
     def _mlstm(cfg: LMConfig, options: MLSTMOptions, *, rngs) -> layers.MLSTM:
       return layers.MLSTM(cfg.d_model, cfg.num_heads, chunk_size=options.chunk_size, ...)

The name then works everywhere: in ``mixer_pattern`` and the presets, its options in
``LMConfig(mixer_options={"mlstm": {"chunk_size": 32}})``, ``cfg.replace(mlstm={...})`` and on
the command line (``--config.model.mixer_pattern=mlstm --config.model.mlstm.chunk_size=32``), in
run records and exported configs. A mixer registered from outside the package (a test, a user's
module) works the same once its module has run ``register_mixer``.

Import order inside ``jaxrec.models``: this module imports nothing from it, so ``config`` can
validate names and options against ``MIXERS`` (and reserve its field names); ``mixers`` (the
built-in options and builders) imports ``config`` and this module; ``lm`` builds every mixer
through ``mixers``, so the built-in mixers are registered before any model (or preset) exists.
"""

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

from flax import nnx

# (cfg: LMConfig, options, *, rngs: nnx.Rngs) -> the mixer; LMConfig is not named here because
# config.py imports this module to validate mixer names.
MixerBuilder = Callable[..., nnx.Module]

# Names a mixer cannot take: a mixer's options are a group beside LMConfig's fields (in its dict
# form and the experiment config's model section, ``--config.model.<name>``), which config.py
# reserves with ``reserve_names`` (this module cannot import it: config imports this module);
# ``preset`` is the model section's own.
_RESERVED = {"preset"}


@dataclasses.dataclass(frozen=True)
class NoOptions:
  """The options of a mixer that has none of its own."""


class MixerEntry(NamedTuple):
  """A registered mixer.

  Attributes:
    module: the ``nnx.Module`` class (from ``jaxrec.layers``).
    build: ``build(cfg, options, *, rngs)`` returns a ``module`` configured by the ``LMConfig``
      ``cfg`` and this mixer's ``options``.
    options: the frozen dataclass of the mixer's options; ``options()`` are the defaults.
  """

  module: type[nnx.Module]
  build: MixerBuilder
  options: type = NoOptions


MIXERS: dict[str, MixerEntry] = {}


def register_mixer(
  name: str, module: type[nnx.Module], *, options: type = NoOptions
) -> Callable[[MixerBuilder], MixerBuilder]:
  """Decorator registering a builder ``(cfg: LMConfig, options, *, rngs) -> module`` under
  ``name``.

  Args:
    name: the mixer's name in ``LMConfig.mixer_pattern`` and its options' group
      (``--config.model.<name>.<option>``): an identifier that is no ``LMConfig`` field.
    module: the class the builder returns.
    options: a frozen dataclass whose fields all have defaults (the mixer's options); its
      ``__post_init__`` checks each option, raising ``ValueError`` s that start with the option's
      name, and an optional method ``check(cfg)`` checks them against the model's shared fields.

  Raises:
    ValueError: ``name`` is taken by another module or is no valid group name, or ``options``
      is not a frozen dataclass with defaults (registering the same module again, e.g. on a
      reload of the builders' module, replaces its builder and options).
  """
  if not isinstance(name, str) or not name.isidentifier():
    raise ValueError(f"name: expected an identifier (a flag's part), got {name!r}")
  if name in _RESERVED:
    raise ValueError(f"name: {name!r} is an LMConfig field or reserved; expected another name")
  if not (isinstance(module, type) and issubclass(module, nnx.Module)):
    raise ValueError(f"module: expected an nnx.Module class, got {module!r}")
  if not (
    isinstance(options, type)
    and dataclasses.is_dataclass(options)
    and options.__dataclass_params__.frozen
  ):
    raise ValueError(f"options: expected a frozen dataclass class, got {options!r}")
  try:
    options()
  except (TypeError, ValueError) as e:
    raise ValueError(
      f"options: expected defaults for every field of {options.__name__}, got the error {e}"
    ) from e
  if name in MIXERS and MIXERS[name].module is not module:
    raise ValueError(
      f"name: mixer {name!r} is already registered to {MIXERS[name].module.__name__}, "
      f"cannot register {module.__name__}"
    )

  def register(build: MixerBuilder) -> MixerBuilder:
    MIXERS[name] = MixerEntry(module, build, options)
    return build

  return register


def reserve_names(names) -> None:
  """Names no mixer may take (``LMConfig``'s fields, which ``config`` reserves)."""
  _RESERVED.update(names)


def get_mixer(name: str) -> MixerEntry:
  """The module, builder and options class registered under ``name``."""
  if name not in MIXERS:
    raise ValueError(f"name: unknown mixer {name!r}; registered mixers: {mixer_names()}")
  return MIXERS[name]


def mixer_names() -> tuple[str, ...]:
  """The registered mixer names, sorted (for error messages)."""
  return tuple(sorted(MIXERS))
