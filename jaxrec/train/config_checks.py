"""Validation of an experiment config before anything is built.

Every error is a ``ConfigError`` whose message starts with the flag to fix, as the launcher spells
it (``--config.mesh.fsdp: ...``), then what was expected and what was given.

Lists in experiment configs are comma-separated strings (``--config.model.mixer_pattern=gla,
attention``, ``--config.lengths=128,256``), read by one parser, ``parse_list``. The ``model``
section holds the ``LMConfig`` fields and, nested, its option groups
(``--config.model.gla.chunk_size``, ``--config.model.moe.top_k``).
"""

import ast
import dataclasses
import re
import types
import typing

import ml_collections
from ml_collections import config_dict

from jaxrec import data as data_lib
from jaxrec import sharding
from jaxrec.models import MIXERS, PRESETS, LMConfig, MoEOptions, get_preset, mixer_names
from jaxrec.train import optim

SCHEDULES = ("cosine", "wsd")


class ConfigError(ValueError):
  """An experiment config field holds a bad value; the message names its flag."""


def model_config_dict(preset: str) -> ml_collections.ConfigDict:
  """The ``model`` section of an experiment config: ``preset``, every ``LMConfig`` field and
  every option group (``moe`` and each registered mixer's) as a nested section.

  Every field but ``vocab_size`` (the tokenizer's) and every option is an unset placeholder, so
  ``model_config`` gives exactly the preset, and a field or option set on the command line
  (``--config.model.num_layers=12``, ``--config.model.gla.chunk_size=32``) replaces the preset's
  value. A mixer registered before this is called has its group too.
  """
  section = ml_collections.ConfigDict({"preset": preset})
  for name, annotation in _shared_fields().items():
    section[name] = config_dict.placeholder(_value_type(annotation))
  for group, cls in _groups().items():
    hints = typing.get_type_hints(cls)
    options = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    if options:
      section[group] = ml_collections.ConfigDict(
        {
          name: config_dict.placeholder(_value_type(annotation))
          for name, annotation in options.items()
        }
      )
  return section


def model_section(cfg: LMConfig) -> dict:
  """``cfg`` as the ``model`` section holds it (``LMConfig.to_dict`` but ``vocab_size``): a list
  of names comma-separated (``parse_list``), each option group a nested dict, every other value
  as it is; ``model_config`` reads it back to ``cfg``."""
  out = cfg.to_dict()
  del out["vocab_size"]
  out["mixer_pattern"] = ",".join(cfg.mixer_pattern)
  return out


def _shared_fields() -> dict[str, typing.Any]:
  """``LMConfig``'s fields but ``vocab_size`` and the option groups, with their types."""
  hints = typing.get_type_hints(LMConfig)
  return {
    f.name: hints[f.name]
    for f in dataclasses.fields(LMConfig)
    if f.name not in ("vocab_size", "moe", "mixer_options")
  }


def _groups() -> dict[str, type]:
  """The option groups of the ``model`` section by name: ``moe`` and every registered mixer's."""
  return {"moe": MoEOptions, **{name: MIXERS[name].options for name in mixer_names()}}


def _is_name_list(annotation) -> bool:
  return typing.get_origin(annotation) is tuple and typing.get_args(annotation) == (str, ...)


def _value_type(annotation) -> type:
  """``int`` for ``int | None``; ``str`` (a comma-separated list, ``parse_list``) for
  ``tuple[str, ...]``; ``tuple`` for other tuples; else the annotation."""
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
  if _is_name_list(annotation):
    return str
  return typing.get_origin(annotation) or annotation


def parse_list(value, flag: str, item: type = str) -> tuple:
  """A list-valued config field as a tuple of ``item`` s.

  Lists are written comma-separated, in config files and on the command line alike
  (``--config.mixers=attention,gla``, ``--config.d_models=32,64``); spaces around items are
  dropped. Also read: the Python spelling of a tuple or list, quoted on the command line
  (``--config.lengths="(128, 256)"``, as ``ml_collections`` wrote tuple fields), and a tuple or
  list given in Python (a run record's JSON list).

  Args:
    value: the field's value.
    flag: the field's flag (``--config.mixers``), for the error.
    item: the items' type (``str``, ``int``, ``float``).

  Raises:
    ConfigError: naming ``flag``, when the list is empty or an item is not an ``item``.
  """
  expected = f"expected comma-separated {item.__name__} values, got {value!r}"
  items = value
  if isinstance(value, str):
    text = value.strip()
    try:
      items = ast.literal_eval(text) if text[:1] in "([" else text.split(",")
    except (ValueError, SyntaxError):
      raise ConfigError(f"{flag}: {expected}") from None
  if isinstance(items, int | float | str):  # "(128)" is 128
    items = (items,)
  if not isinstance(items, list | tuple) or not items:
    raise ConfigError(f"{flag}: {expected}")
  out = []
  for x in items:
    if isinstance(x, str):
      x = x.strip()
    bad = x == "" or isinstance(x, bool) or not isinstance(x, int | float | str)
    if bad or (item is int and isinstance(x, float)):
      raise ConfigError(f"{flag}: {expected}")
    try:
      out.append(item(x))
    except ValueError:
      raise ConfigError(f"{flag}: {expected}") from None
  return tuple(out)


def parse_int_pairs(value, flag: str, sep: str = "x", example: str = "4x12,12x4") -> tuple:
  """A list of int pairs written ``AxB`` (or ``A-B``, with ``sep="-"``), comma-separated, as
  ``((A, B), ...)``: set sizes, MQAR settings, length ranges.

  Raises:
    ConfigError: naming ``flag`` and showing ``example``, when an item is not two ints.
  """
  out = []
  for item in parse_list(value, flag):
    parts = item.split(sep)
    try:
      pair = tuple(int(p) for p in parts)
    except ValueError:
      pair = ()
    if len(pair) != 2:
      raise ConfigError(f"{flag}: expected pairs like {example}, got {value!r}")
    out.append(pair)
  return tuple(out)


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> LMConfig:
  """The ``LMConfig`` of ``config.model``: the preset with every non-``None`` field and option
  replaced (``LMConfig.replace``: an option given replaces that one option of the preset's).

  Raises:
    ConfigError: unknown preset, unknown mixer, or a field or option ``LMConfig`` rejects.
  """
  cfg = config.model
  if cfg.preset not in PRESETS:
    raise ConfigError(
      f"--config.model.preset: expected one of {tuple(PRESETS)}, got {cfg.preset!r}"
    )
  overrides = {k: cfg[k] for k in _shared_fields() if k in cfg and cfg[k] is not None}
  for group in _groups():
    if group in cfg:
      given = {k: v for k, v in cfg[group].items() if v is not None}
      if given:
        overrides[group] = given
  if "mixer_pattern" in overrides:
    pattern = parse_list(overrides["mixer_pattern"], "--config.model.mixer_pattern")
    unknown = [m for m in pattern if m not in MIXERS]
    if unknown:
      raise ConfigError(
        f"--config.model.mixer_pattern: unknown mixer {unknown[0]!r} in {pattern}; registered "
        f"mixers: {mixer_names()} (write e.g. "
        "--config.model.mixer_pattern=gla,gla,attention)"
      )
    overrides["mixer_pattern"] = pattern
  try:
    return get_preset(cfg.preset, **overrides, vocab_size=vocab_size)
  except ValueError as e:
    # LMConfig's messages start with the offending field or group.option; point at its flag.
    field = str(e).split(":", 1)[0]
    flag = f"--config.model.{field}" if _has_path(cfg, field) else "--config.model"
    raise ConfigError(f"{flag}: {e}") from e


def _has_path(section: ml_collections.ConfigDict, dotted: str) -> bool:
  for name in dotted.split("."):
    if not isinstance(section, ml_collections.ConfigDict) or name not in section:
      return False
    section = section[name]
  return True


def validate_config(
  config: ml_collections.ConfigDict, num_devices: int, num_processes: int
) -> None:
  """Checks the fields that can be checked without building anything.

  Raises:
    ConfigError: naming the flag of the first bad field.
  """
  for name in ("steps", "batch_size", "grad_accum_steps", "log_every"):
    _check_positive(f"--config.{name}", config[name])
  for name in ("eval_every", "checkpoint_every"):
    _check_non_negative(f"--config.{name}", config[name])
  if "profile_steps" in config:
    _check_non_negative("--config.profile_steps", config.profile_steps)
  if "tensorboard" in config and not isinstance(config.tensorboard, bool):
    raise ConfigError(f"--config.tensorboard: expected True or False, got {config.tensorboard!r}")
  _check_positive("--config.eval_batches", config.eval_batches)
  _check_positive("--config.max_to_keep", config.max_to_keep)
  _check_positive("--config.data.seq_len", config.data.seq_len)
  model = model_config(config, vocab_size=256)
  _validate_tokenizer(config.data.tokenizer)
  try:
    data, fsdp, _, expert = sharding.mesh_shape(dict(config.mesh), num_devices, "--config.mesh")
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if model.ffn == "moe" and model.moe.num_experts % expert:
    raise ConfigError(
      f"--config.mesh.expert: expected a divisor of the {model.moe.num_experts} experts "
      f"(--config.model.moe.num_experts), got {expert}"
    )
  shards = data * fsdp * expert
  if config.batch_size % shards:
    raise ConfigError(
      f"--config.batch_size: expected a multiple of the batch shards --config.mesh.data × "
      f"--config.mesh.fsdp × --config.mesh.expert = {data} × {fsdp} × {expert} = {shards}, "
      f"got {config.batch_size}"
    )
  if config.batch_size % num_processes:
    raise ConfigError(
      f"--config.batch_size: expected a multiple of the {num_processes} processes, "
      f"got {config.batch_size}"
    )
  if config.batch_size % (shards * config.grad_accum_steps):
    raise ConfigError(
      f"--config.grad_accum_steps: expected a divisor of batch_size / (data × fsdp) = "
      f"{config.batch_size // shards}, got {config.grad_accum_steps}"
    )
  _validate_optim(config)


def _validate_tokenizer(spec: str) -> None:
  try:
    data_lib.load_tokenizer(spec)
  except (FileNotFoundError, ImportError, ValueError) as e:
    # load_tokenizer names its argument ``spec``; the user's name for it is the flag.
    message = re.sub(r"^spec: ", "", str(e))
    raise ConfigError(f"--config.data.tokenizer: {message}") from e


def _validate_optim(config: ml_collections.ConfigDict) -> None:
  opt = config.optim
  if opt.schedule not in SCHEDULES:
    raise ConfigError(f"--config.optim.schedule: expected one of {SCHEDULES}, got {opt.schedule!r}")
  if opt.schedule == "wsd" and opt.decay_shape not in optim.DECAY_SHAPES:
    raise ConfigError(
      f"--config.optim.decay_shape: expected one of {optim.DECAY_SHAPES}, got {opt.decay_shape!r}"
    )
  if not opt.learning_rate > 0:
    raise ConfigError(f"--config.optim.learning_rate: expected > 0, got {opt.learning_rate}")
  _check_non_negative("--config.optim.warmup_steps", opt.warmup_steps)
  decay = decay_steps(config) if opt.schedule == "wsd" else 0
  _check_non_negative("--config.optim.decay_steps", decay)
  if opt.warmup_steps + decay > config.steps:
    raise ConfigError(
      f"--config.optim.warmup_steps: warmup ({opt.warmup_steps}) plus decay ({decay}) steps "
      f"must fit in --config.steps={config.steps}"
    )
  if opt.schedule == "cosine" and opt.warmup_steps >= config.steps:
    raise ConfigError(
      f"--config.optim.warmup_steps: the cosine schedule needs steps left to decay over, "
      f"expected < --config.steps={config.steps}, got {opt.warmup_steps}"
    )
  if opt.clip_norm is not None and not opt.clip_norm > 0:
    raise ConfigError(f"--config.optim.clip_norm: expected > 0 or None, got {opt.clip_norm}")


def decay_steps(config: ml_collections.ConfigDict) -> int:
  """WSD cooldown length: ``optim.decay_steps``, or a fifth of the run when unset."""
  return optim.wsd_decay_steps(config.steps, config.optim.decay_steps)


def _check_positive(flag: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ConfigError(f"{flag}: expected a positive integer, got {value!r}")


def _check_non_negative(flag: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ConfigError(f"{flag}: expected a non-negative integer, got {value!r}")
