"""``LMConfig``: the frozen description of a language model.

What every model has (sizes, dtypes, the mixer pattern, the Llama family's attention fields, the
feed-forward) are ``LMConfig`` fields. What one mixer alone reads is that mixer's options: a small
frozen dataclass registered with its builder (``jaxrec.models.registry``), held in
``LMConfig.mixer_options`` and read with ``cfg.options("gla")``. The mixture-of-experts
feed-forward's options are the one group that belongs to no mixer: the field ``moe``
(``jaxrec.models.ffn.MoEOptions``).

As a dict (``LMConfig.to_dict``: run records, exported ``config.json``, the experiment config's
``model`` section) the fields are keys and every group a nested dict under its name::

  {"d_model": 128, "mixer_pattern": ("gla", "attention"), ..., "moe": {"top_k": 2, ...},
   "attention": {"window": None}, "gla": {"chunk_size": 64, ...}}

Configs written before the options were grouped named them flat (``gla_chunk_size``,
``moe_top_k``, ``window``); ``LMConfig.from_dict`` and ``group_flat_names`` read those names.
"""

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp

from jaxrec.layers import rope
from jaxrec.models import _checks, registry
from jaxrec.models.ffn import FFNS, MoEOptions


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Configuration of ``LM``; every field and option is validated on construction.

  Only ``jaxrec.models`` reads it: the builders of ``jaxrec.models.mixers`` turn the fields and
  each mixer's options into the mixer layer's constructor arguments. The Llama family (Llama 2
  and 3, Qwen2) is an all-``"attention"`` pattern with its fields below (``num_kv_heads``,
  ``head_dim``, ``rope_theta``, ``rope_scaling``, ``qkv_bias``, ``norm_eps``, ``mlp_hidden``,
  ``tie_embeddings``); ``jaxrec.models.config_from_hf`` reads one from a Hugging Face config.

  Attributes:
    vocab_size: number of token ids.
    d_model: residual stream width ``D``.
    num_layers: number of blocks.
    mixer_pattern: token mixer names (``jaxrec.models.MIXERS``), repeated to ``num_layers``:
      layer ``i`` uses ``mixer_pattern[i % len(mixer_pattern)]``.
    num_heads: heads of every mixer that has heads (query heads of attention).
    num_kv_heads: key/value heads of attention and Liger attention (grouped-query when
      < ``num_heads``); ``None`` means ``num_heads``.
    head_dim: their head width; ``None`` means ``d_model // num_heads``.
    mlp_hidden: SwiGLU hidden width; ``None`` means ``mlp_ratio · d_model`` rounded up to a
      multiple of 64.
    mlp_ratio: see ``mlp_hidden``.
    rope_theta: RoPE base wavelength (attention, Liger attention, RAT).
    rope_scaling: RoPE frequency scaling as the ``rope_scaling`` dict of a Hugging Face config
      (Llama 3's, ``{"rope_type": "llama3", "factor": ..., ...}``, see ``jaxrec.layers.rope``),
      stored as its sorted items; ``None`` for plain RoPE.
    qkv_bias: the attention query, key and value projections have biases (Qwen2).
    max_seq_len: the longest sequence the model is meant for (training length; default cache
      size).
    dtype: compute dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"``; logits are always
      fp32.
    param_dtype: parameter storage dtype.
    scan_layers: store blocks stacked on a leading ``"layers"`` axis, one group per repetition of
      ``mixer_pattern`` (needs ``num_layers % len(mixer_pattern) == 0``), and run them with
      ``lax.scan``: one compiled group instead of ``num_layers`` blocks.
    remat: recompute each block (group, when scanning) in the backward pass instead of keeping its
      activations.
    tie_embeddings: the output head is the transposed embedding.
    norm_eps: RMSNorm epsilon (the blocks' norms and the mixers' output norms).
    init_std: standard deviation of embeddings and input projections; output projections use
      ``init_std / sqrt(2 num_layers)``.
    logit_soft_cap: logits become ``cap · tanh(logits / cap)`` (xLSTM 7B: 30); ``None`` for
      none.
    ffn: the feed-forward of every block, ``"mlp"`` (SwiGLU), ``"moe"`` (``layers.MoE``
      configured by ``moe``; not with ``scan_layers``, the routers' state and statistics run
      through the layer loop) or ``"none"`` (blocks of a mixer alone).
    moe: the MoE feed-forward's options (``MoEOptions``, or a mapping of the options that
      differ from its defaults); read only with ``ffn="moe"``.
    mixer_options: the mixers' options by mixer name, as a mapping of a name to its options
      class (``registry.get_mixer(name).options``) or to a mapping of the options that differ
      from its defaults: ``{"gla": {"chunk_size": 32}}``. Stored as the sorted ``(name,
      options)`` pairs of the options that differ from the registered defaults, so equal models
      have equal (and hashable) configs; read a mixer's options with ``options(name)``.
  """

  vocab_size: int = 256
  d_model: int = 128
  num_layers: int = 4
  mixer_pattern: tuple[str, ...] = ("gla",)
  num_heads: int = 4
  num_kv_heads: int | None = None
  head_dim: int | None = None
  mlp_hidden: int | None = None
  mlp_ratio: float = 8 / 3
  rope_theta: float = 10_000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  qkv_bias: bool = False
  max_seq_len: int = 1024
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat: bool = False
  tie_embeddings: bool = True
  norm_eps: float = 1e-6
  init_std: float = 0.02
  logit_soft_cap: float | None = None
  ffn: str = "mlp"
  moe: MoEOptions = dataclasses.field(default_factory=MoEOptions)
  mixer_options: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    if isinstance(self.mixer_pattern, str) or not isinstance(self.mixer_pattern, tuple):
      raise ValueError(
        f"mixer_pattern: expected a tuple of mixer names, got {self.mixer_pattern!r}"
      )
    if not self.mixer_pattern:
      raise ValueError("mixer_pattern: expected at least one mixer name, got ()")
    for name in self.mixer_pattern:
      if name not in registry.MIXERS:
        raise ValueError(
          f"mixer_pattern: unknown mixer {name!r} in {self.mixer_pattern}; "
          f"registered mixers: {registry.mixer_names()}"
        )
    for field in ("vocab_size", "d_model", "num_layers", "num_heads", "max_seq_len"):
      _checks.check_positive_int(field, getattr(self, field))
    for field in ("num_kv_heads", "head_dim", "mlp_hidden"):
      _checks.check_positive_int_or_none(field, getattr(self, field))
    _checks.check_positive_number("logit_soft_cap", self.logit_soft_cap, allow_none=True)
    for field in ("dtype", "param_dtype"):
      _checks.check_choice(field, getattr(self, field), ("float32", "bfloat16", "float16"))
    self._normalize_rope_scaling()
    if not isinstance(self.qkv_bias, bool):
      raise ValueError(f"qkv_bias: expected True or False, got {self.qkv_bias!r}")
    if self.scan_layers and self.num_layers % len(self.mixer_pattern):
      raise ValueError(
        f"num_layers: scan_layers=True needs a multiple of len(mixer_pattern)="
        f"{len(self.mixer_pattern)}, got {self.num_layers}"
      )
    _checks.check_choice("ffn", self.ffn, FFNS)
    if self.ffn == "moe" and self.scan_layers:
      raise ValueError(
        "scan_layers: not supported with ffn='moe' (the router state and routing statistics run "
        "through the unscanned layer loop); set scan_layers=False"
      )
    object.__setattr__(self, "moe", _make_options("moe", MoEOptions, self.moe))
    self._normalize_mixer_options()
    for name in dict.fromkeys(self.mixer_pattern):
      options = self.options(name)
      if callable(getattr(options, "check", None)):
        with _prefixed(name, options):
          options.check(self)

  def _normalize_rope_scaling(self) -> None:
    """``rope_scaling`` given as a mapping (or its items, as a run record's JSON lists) becomes
    its sorted items, so the config stays hashable."""
    scaling = self.rope_scaling
    if scaling is None:
      return
    try:
      items = dict(scaling) if isinstance(scaling, Mapping) else dict(map(tuple, scaling))
    except (TypeError, ValueError) as e:
      raise ValueError(
        f"rope_scaling: expected a mapping of RoPE scaling parameters or None, got {scaling!r}"
      ) from e
    rope.check_rope_scaling(items)
    object.__setattr__(self, "rope_scaling", tuple(sorted(items.items())))

  def _normalize_mixer_options(self) -> None:
    """``mixer_options`` as the sorted ``(name, options)`` pairs that differ from the defaults."""
    given = self.mixer_options
    try:
      given = dict(given) if isinstance(given, Mapping) else dict(map(tuple, given))
    except (TypeError, ValueError) as e:
      raise ValueError(
        f"mixer_options: expected a mapping of mixer names to their options, got {given!r}"
      ) from e
    pairs = []
    for name, value in sorted(given.items()):
      if name not in registry.MIXERS:
        raise ValueError(
          f"mixer_options: unknown mixer {name!r}; registered mixers: {registry.mixer_names()}"
        )
      cls = registry.MIXERS[name].options
      options = _make_options(name, cls, value)
      if options != cls():
        pairs.append((name, options))
    object.__setattr__(self, "mixer_options", tuple(pairs))

  def options(self, name: str) -> Any:
    """The options of mixer ``name``: those of ``mixer_options``, else its registered
    defaults."""
    cls = registry.get_mixer(name).options
    return dict(self.mixer_options).get(name, cls())

  def replace(self, **changes) -> "LMConfig":
    """A copy with ``changes``: a field by its name, an option group by its name (``moe``, a
    mixer's) with either its options object or a mapping of the options to change, the others
    kept: ``cfg.replace(num_layers=2, gla={"chunk_size": 32}, moe={"top_k": 1})``.

    Raises:
      ValueError: a name that is neither a field nor a registered mixer, an unknown option, or
        a value the new config rejects (naming ``group.option``).
    """
    fields = {f.name for f in dataclasses.fields(self)} - {"moe", "mixer_options"}
    direct = {k: v for k, v in changes.items() if k in fields}
    mixer_options = dict(self.mixer_options)
    if "mixer_options" in changes:
      mixer_options = dict(changes["mixer_options"])
    moe = _updated("moe", MoEOptions, self.moe, changes["moe"]) if "moe" in changes else self.moe
    for name, value in changes.items():
      if name in fields or name in ("moe", "mixer_options"):
        continue
      if name not in registry.MIXERS:
        raise ValueError(
          f"{name}: expected an LMConfig field or a registered mixer's options, got "
          f"{name}={value!r}; registered mixers: {registry.mixer_names()}"
        )
      current = mixer_options.get(name, registry.MIXERS[name].options())
      mixer_options[name] = _updated(name, registry.MIXERS[name].options, current, value)
    return dataclasses.replace(self, **direct, moe=moe, mixer_options=mixer_options)

  def to_dict(self) -> dict[str, Any]:
    """The fields by name and each option group as a dict under its name: ``moe``, and the
    options of every mixer in ``mixer_pattern`` or in ``mixer_options``, defaults written out.
    ``from_dict`` reads it back."""
    out = {
      f.name: getattr(self, f.name)
      for f in dataclasses.fields(self)
      if f.name not in ("moe", "mixer_options")
    }
    out["moe"] = dataclasses.asdict(self.moe)
    for name in sorted({*self.mixer_pattern, *dict(self.mixer_options)}):
      out[name] = dataclasses.asdict(self.options(name))
    return out

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> "LMConfig":
    """The config of a ``to_dict`` dict (JSON lists read as tuples); also reads the flat names
    of the configs written before the options were grouped (``group_flat_names``)."""
    fields = group_flat_names(fields)
    names = {f.name for f in dataclasses.fields(cls)} - {"mixer_options"}
    shared = {k: v for k, v in fields.items() if k in names}
    if isinstance(shared.get("mixer_pattern"), list):
      shared["mixer_pattern"] = tuple(shared["mixer_pattern"])
    mixer_options = {}
    for name, value in fields.items():
      if name in names:
        continue
      if name not in registry.MIXERS or not isinstance(value, Mapping):
        raise ValueError(
          f"{name}: expected an LMConfig field or a registered mixer's options, got "
          f"{name}={value!r}; registered mixers: {registry.mixer_names()}"
        )
      mixer_options[name] = value
    return cls(**shared, mixer_options=mixer_options)

  @property
  def kv_heads(self) -> int:
    """``num_kv_heads`` with its default resolved."""
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def attn_head_dim(self) -> int:
    """``head_dim`` with its default resolved."""
    return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

  @property
  def layer_mixers(self) -> tuple[str, ...]:
    """The mixer name of every layer."""
    return tuple(self.mixer_pattern[i % len(self.mixer_pattern)] for i in range(self.num_layers))

  @property
  def mlp_dim(self) -> int:
    """The SwiGLU hidden width."""
    if self.mlp_hidden is not None:
      return self.mlp_hidden
    return -(-int(self.mlp_ratio * self.d_model) // 64) * 64

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)


# A mixer's options are a group beside these fields (``to_dict``, ``--config.model.<name>``).
registry.reserve_names(f.name for f in dataclasses.fields(LMConfig))


def _make_options(group: str, cls: type, value) -> Any:
  """``value``, an instance of ``cls`` or a mapping of its options, as a ``cls``."""
  if isinstance(value, cls):
    return value
  if not isinstance(value, Mapping):
    raise ValueError(
      f"{group}: expected a {cls.__name__} or a mapping of its options, got {value!r}"
    )
  return _updated(group, cls, cls(), value)


def _updated(group: str, cls: type, current, value) -> Any:
  """``current`` (a ``cls``) with the options of the mapping ``value`` changed, or ``value``
  itself when it is a ``cls``; an error names ``group.option``."""
  if isinstance(value, cls):
    return value
  if not isinstance(value, Mapping):
    raise ValueError(
      f"{group}: expected a {cls.__name__} or a mapping of its options, got {value!r}"
    )
  names = tuple(f.name for f in dataclasses.fields(cls))
  unknown = [k for k in value if k not in names]
  if unknown:
    raise ValueError(f"{group}.{unknown[0]}: unknown option; {group} has options {names}")
  with _prefixed(group, current):
    return dataclasses.replace(current, **value)


@contextlib.contextmanager
def _prefixed(group: str, options) -> Iterator[None]:
  """An error that starts with one of ``options``' fields (``chunk_size: ...``) names it with
  its group (``gla.chunk_size: ...``), as the flag spells it; other errors (about a shared field,
  ``num_heads: ...``) pass unchanged."""
  try:
    yield
  except ValueError as e:
    field = str(e).split(":", 1)[0]
    if field in {f.name for f in dataclasses.fields(options)}:
      raise ValueError(f"{group}.{e}") from e
    raise


def _flat_names() -> dict[str, tuple[str, ...]]:
  """The flat ``LMConfig`` field names before the options were grouped, and the ``group.option``
  each became (the options ParaGRU and ParaLSTM, Based and PLA shared became each one's)."""
  groups = {
    "gla": ("expand_k", "expand_v", "gate_rank", "gate_normalizer", "chunk_size"),
    "liger": ("variant", "window", "gate_source", "chunk_size"),
    "baseconv": ("kernel_size",),
    "pla": ("prefix_len",),
    "mlstm": (
      "qk_dim_factor",
      "v_dim_factor",
      "gate_soft_cap",
      "igate_bias_init",
      "chunk_size",
      "eps",
    ),
    "rat": ("chunk_size", "qk_groups", "position"),
    "moe": (
      "num_experts",
      "top_k",
      "capacity_factor",
      "router",
      "router_dim",
      "hidden",
      "aux_weight",
    ),
  }
  names = {f"{g}_{o}": (f"{g}.{o}",) for g, options in groups.items() for o in options}
  names.update(
    window=("attention.window",),
    pararnn_heads=("paragru.heads", "paralstm.heads"),
    pararnn_max_iters=("paragru.max_iters", "paralstm.max_iters"),
    based_feature_dim=("based.feature_dim", "pla.feature_dim"),
  )
  return names


FLAT_NAMES: dict[str, tuple[str, ...]] = _flat_names()


def group_flat_names(fields: Mapping[str, Any]) -> dict[str, Any]:
  """``fields`` with the flat names of ``FLAT_NAMES`` (``gla_chunk_size``) moved into their
  groups (``{"gla": {"chunk_size": ...}}``); a group's options given nested win over flat ones.
  Fields in the grouped form pass unchanged."""
  out, flat = {}, {}
  for key, value in fields.items():
    if key in FLAT_NAMES:
      for target in FLAT_NAMES[key]:
        group, option = target.split(".")
        flat.setdefault(group, {})[option] = value
    else:
      out[key] = value
  for group, options in flat.items():
    nested = out.get(group)
    out[group] = {**options, **(nested if isinstance(nested, Mapping) else {})}
  return out
