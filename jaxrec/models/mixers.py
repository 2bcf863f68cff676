"""The built-in token mixers: each one's options, and the builder that makes it from an
``LMConfig`` and those options, registered under its name.

A builder is the one place where a mixer's options and the model's shared fields become its
layer's constructor arguments (how to add a mixer: ``jaxrec.models.registry``). An options class
is a frozen dataclass whose defaults are what a model gets when nothing is given; its
``__post_init__`` checks each option, and its ``check(cfg)`` what depends on the model's shared
fields (``num_heads``, ``d_model``). ``LMConfig`` names an option's errors with its group
(``gla.chunk_size: ...``), which is its flag (``--config.model.gla.chunk_size``). Every mixer
shares ``init_std``, ``num_layers`` (the depth scaling of its output projection), ``dtype`` and
``param_dtype``.
"""

import dataclasses

import jax.numpy as jnp
from flax import nnx

from jaxrec import layers
from jaxrec.models import _checks
from jaxrec.models.config import LMConfig
from jaxrec.models.registry import get_mixer, register_mixer


def build_mixer(name: str, cfg: LMConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """The mixer registered under ``name``, configured by ``cfg`` and its options there."""
  return get_mixer(name).build(cfg, cfg.options(name), rngs=rngs)


def _shared(cfg: LMConfig) -> dict:
  return dict(
    init_std=cfg.init_std,
    num_layers=cfg.num_layers,
    dtype=jnp.dtype(cfg.dtype),
    param_dtype=jnp.dtype(cfg.param_dtype),
  )


# ----------------------------------------------------------------------------------------------
# Softmax attention and Liger attention: the Llama family's fields.


def _attention_args(cfg: LMConfig) -> dict:
  """Attention and Liger attention share their projections and RoPE."""
  return dict(
    num_kv_heads=cfg.kv_heads,
    head_dim=cfg.attn_head_dim,
    rope_theta=cfg.rope_theta,
    rope_scaling=cfg.rope_scaling,
    qkv_bias=cfg.qkv_bias,
    **_shared(cfg),
  )


def _check_attention_heads(cfg: LMConfig) -> None:
  if cfg.num_heads % cfg.kv_heads:
    raise ValueError(
      f"num_kv_heads: expected a divisor of num_heads={cfg.num_heads}, got {cfg.num_kv_heads}"
    )
  if cfg.attn_head_dim < 2 or cfg.attn_head_dim % 2:
    raise ValueError(
      f"head_dim: expected an even attention head width (RoPE), got {cfg.attn_head_dim} "
      f"(head_dim={cfg.head_dim}, d_model={cfg.d_model}, num_heads={cfg.num_heads})"
    )


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
  """Softmax attention (``layers.Attention``).

  Attributes:
    window: sliding window (number of visible keys, the query's own included); ``None`` is full
      causal attention.
  """

  window: int | None = None

  def __post_init__(self):
    _checks.check_positive_int_or_none("window", self.window)

  def check(self, cfg: LMConfig) -> None:
    _check_attention_heads(cfg)


@register_mixer("attention", layers.Attention, options=AttentionOptions)
def _attention(cfg: LMConfig, options: AttentionOptions, *, rngs: nnx.Rngs) -> layers.Attention:
  return layers.Attention(
    cfg.d_model, cfg.num_heads, window=options.window, **_attention_args(cfg), rngs=rngs
  )


@dataclasses.dataclass(frozen=True)
class LigerOptions:
  """Liger attention (``layers.LigerAttention``), what ``jaxrec.linearize.liger`` turns attention
  into.

  Attributes:
    variant: the recurrence, ``"gla"`` or ``"hgrn2"``.
    window: keys seen by its sliding-window softmax branch; ``None`` drops the branch
      (``jaxrec.linearize.liger`` sets the paper's 64 unless told otherwise; a default of
      ``None`` lets run records restore either choice, as their unset fields keep defaults).
    recurrence: ``False`` drops the recurrent branch (sliding-window attention alone).
    gate_source: ``"key"`` (the gate is the key projection) or ``"projection"`` (a new random
      projection, the paper's ablation).
    chunk_size: chunk length of the recurrence's chunkwise-parallel form.
  """

  variant: str = "gla"
  window: int | None = None
  recurrence: bool = True
  gate_source: str = "key"
  chunk_size: int = 64

  def __post_init__(self):
    _checks.check_choice("variant", self.variant, layers.liger.VARIANTS)
    _checks.check_positive_int_or_none("window", self.window)
    if not isinstance(self.recurrence, bool) or (not self.recurrence and self.window is None):
      raise ValueError(
        f"recurrence: expected True, or False with a window, got {self.recurrence!r} with "
        f"window={self.window!r}"
      )
    _checks.check_choice("gate_source", self.gate_source, layers.liger.GATE_SOURCES)
    _checks.check_positive_int("chunk_size", self.chunk_size)

  def check(self, cfg: LMConfig) -> None:
    _check_attention_heads(cfg)


@register_mixer("liger", layers.LigerAttention, options=LigerOptions)
def _liger(cfg: LMConfig, options: LigerOptions, *, rngs: nnx.Rngs) -> layers.LigerAttention:
  return layers.LigerAttention(
    cfg.d_model,
    cfg.num_heads,
    variant=options.variant,
    window=options.window,
    recurrence=options.recurrence,
    gate_source=options.gate_source,
    chunk_size=options.chunk_size,
    **_attention_args(cfg),
    rngs=rngs,
  )


# ----------------------------------------------------------------------------------------------
# Gated linear attention.


@dataclasses.dataclass(frozen=True)
class GLAOptions:
  """Gated linear attention (``layers.GatedLinearAttention``).

  Attributes:
    expand_k: key width as a multiple of ``d_model`` (0.5 in the GLA paper).
    expand_v: value width as a multiple of ``d_model``.
    gate_rank: rank of the decay projection.
    gate_normalizer: ``τ`` in ``log α = logsigmoid(·) / τ``.
    chunk_size: chunk length of the chunkwise-parallel form.
  """

  expand_k: float = 0.5
  expand_v: float = 1.0
  gate_rank: int = 16
  gate_normalizer: float = 16.0
  chunk_size: int = 64

  def __post_init__(self):
    for field in ("expand_k", "expand_v", "gate_normalizer"):
      _checks.check_positive_number(field, getattr(self, field))
    for field in ("gate_rank", "chunk_size"):
      _checks.check_positive_int(field, getattr(self, field))

  def check(self, cfg: LMConfig) -> None:
    for field in ("expand_k", "expand_v"):
      _checks.check_head_width(field, getattr(self, field), cfg.d_model, cfg.num_heads)


@register_mixer("gla", layers.GatedLinearAttention, options=GLAOptions)
def _gla(cfg: LMConfig, options: GLAOptions, *, rngs: nnx.Rngs) -> layers.GatedLinearAttention:
  return layers.GatedLinearAttention(
    cfg.d_model,
    cfg.num_heads,
    expand_k=options.expand_k,
    expand_v=options.expand_v,
    gate_rank=options.gate_rank,
    gate_normalizer=options.gate_normalizer,
    chunk_size=options.chunk_size,
    norm_eps=cfg.norm_eps,
    **_shared(cfg),
    rngs=rngs,
  )


# ----------------------------------------------------------------------------------------------
# ParaRNN: nonlinear recurrences solved by Newton's method.


@dataclasses.dataclass(frozen=True)
class ParaRNNOptions:
  """ParaGRU and ParaLSTM (``layers.ParaGRU``, ``layers.ParaLSTM``; each has its own group,
  ``paragru`` and ``paralstm``). Their state width is ``d_model``.

  Attributes:
    heads: heads of the block-diagonal input projections, a divisor of ``d_model``; ``None``
      means ``num_heads``.
    max_iters: Newton iterations at most; sequences not converged by then are recomputed by the
      sequential scan, so this trades speed, never accuracy.
  """

  heads: int | None = None
  max_iters: int = 10

  def __post_init__(self):
    _checks.check_positive_int_or_none("heads", self.heads)
    _checks.check_positive_int("max_iters", self.max_iters)

  def num_heads(self, cfg: LMConfig) -> int:
    """``heads`` with its default resolved."""
    return cfg.num_heads if self.heads is None else self.heads

  def check(self, cfg: LMConfig) -> None:
    if cfg.d_model % self.num_heads(cfg):
      raise ValueError(
        f"heads: expected a divisor of d_model={cfg.d_model}, got {self.num_heads(cfg)} "
        f"(heads={self.heads}, num_heads={cfg.num_heads})"
      )


def _pararnn_args(cfg: LMConfig, options: ParaRNNOptions) -> dict:
  return dict(
    d_model=cfg.d_model,
    num_heads=options.num_heads(cfg),
    max_iters=options.max_iters,
    norm_eps=cfg.norm_eps,
    **_shared(cfg),
  )


@register_mixer("paragru", layers.ParaGRU, options=ParaRNNOptions)
def _paragru(cfg: LMConfig, options: ParaRNNOptions, *, rngs: nnx.Rngs) -> layers.ParaGRU:
  return layers.ParaGRU(**_pararnn_args(cfg, options), rngs=rngs)


@register_mixer("paralstm", layers.ParaLSTM, options=ParaRNNOptions)
def _paralstm(cfg: LMConfig, options: ParaRNNOptions, *, rngs: nnx.Rngs) -> layers.ParaLSTM:
  return layers.ParaLSTM(**_pararnn_args(cfg, options), rngs=rngs)


# ----------------------------------------------------------------------------------------------
# Based, BaseConv and prefix linear attention (JRT-RNN).


def _check_value_heads(cfg: LMConfig, mixer: str) -> None:
  if cfg.d_model % cfg.num_heads:
    raise ValueError(
      f"num_heads: {mixer} needs a divisor of d_model={cfg.d_model} (value width "
      f"d_model // num_heads), got {cfg.num_heads}"
    )


@dataclasses.dataclass(frozen=True)
class BasedOptions:
  """Based linear attention (``layers.BasedLinearAttention``); its value width per head is
  ``d_model // num_heads``.

  Attributes:
    feature_dim: query/key width per head before the Taylor feature map (16 in Based and
      JRT-RNN; the state has ``1 + F + F²`` rows per head).
  """

  feature_dim: int = 16

  def __post_init__(self):
    _checks.check_positive_int("feature_dim", self.feature_dim)

  def check(self, cfg: LMConfig) -> None:
    _check_value_heads(cfg, "Based")


@register_mixer("based", layers.BasedLinearAttention, options=BasedOptions)
def _based(cfg: LMConfig, options: BasedOptions, *, rngs: nnx.Rngs) -> layers.BasedLinearAttention:
  return layers.BasedLinearAttention(
    cfg.d_model, cfg.num_heads, feature_dim=options.feature_dim, **_shared(cfg), rngs=rngs
  )


@dataclasses.dataclass(frozen=True)
class BaseConvOptions:
  """BaseConv (``layers.BaseConv``).

  Attributes:
    kernel_size: taps of its causal short convolution (3 in Based and JRT-RNN).
  """

  kernel_size: int = 3

  def __post_init__(self):
    _checks.check_positive_int("kernel_size", self.kernel_size)


@register_mixer("baseconv", layers.BaseConv, options=BaseConvOptions)
def _baseconv(cfg: LMConfig, options: BaseConvOptions, *, rngs: nnx.Rngs) -> layers.BaseConv:
  return layers.BaseConv(cfg.d_model, kernel_size=options.kernel_size, **_shared(cfg), rngs=rngs)


@dataclasses.dataclass(frozen=True)
class PLAOptions:
  """Prefix linear attention of JRT-RNN (``layers.PrefixLinearAttention``); its value width per
  head is ``d_model // num_heads``.

  Attributes:
    prefix_len: ``M``, the tokens at the start of every document that it reads non-causally
      (1024 in JRT-RNN). It is part of the model, like ``max_seq_len``: train with prompts whose
      prefix is ``M`` tokens (or documents shorter than ``M``, which are all prefix) and score
      no token inside a prefix by next-token loss, as the encoder sees it
      (``jaxrec.data.jrt_objective`` scores the prefix by masked-LM instead).
    feature_dim: query/key width per head before the Taylor feature map, as Based's.
  """

  prefix_len: int = 1024
  feature_dim: int = 16

  def __post_init__(self):
    prefix_len = self.prefix_len
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 0:
      raise ValueError(f"prefix_len: expected an int >= 0, got {self.prefix_len!r}")
    _checks.check_positive_int("feature_dim", self.feature_dim)

  def check(self, cfg: LMConfig) -> None:
    _check_value_heads(cfg, "PLA")


@register_mixer("pla", layers.PrefixLinearAttention, options=PLAOptions)
def _pla(cfg: LMConfig, options: PLAOptions, *, rngs: nnx.Rngs) -> layers.PrefixLinearAttention:
  return layers.PrefixLinearAttention(
    cfg.d_model,
    cfg.num_heads,
    prefix_len=options.prefix_len,
    feature_dim=options.feature_dim,
    **_shared(cfg),
    rngs=rngs,
  )


# ----------------------------------------------------------------------------------------------
# mLSTM (xLSTM 7B).


@dataclasses.dataclass(frozen=True)
class MLSTMOptions:
  """The mLSTM (``layers.MLSTM``).

  Attributes:
    qk_dim_factor: query/key width (all heads) as a multiple of ``d_model``.
    v_dim_factor: value width (all heads) as a multiple of ``d_model``.
    gate_soft_cap: soft cap of the gate pre-activations (xLSTM 7B: 15); ``None`` for none.
    igate_bias_init: initial input-gate bias (xLSTM 7B: -10).
    chunk_size: chunk length of the chunkwise form, a power of two.
    eps: ``ε`` of the denominator.
  """

  qk_dim_factor: float = 0.5
  v_dim_factor: float = 1.0
  gate_soft_cap: float | None = 15.0
  igate_bias_init: float = -10.0
  chunk_size: int = 64
  eps: float = 1e-6

  def __post_init__(self):
    for field in ("qk_dim_factor", "v_dim_factor"):
      _checks.check_positive_number(field, getattr(self, field))
    _checks.check_positive_number("gate_soft_cap", self.gate_soft_cap, allow_none=True)
    _checks.check_number("igate_bias_init", self.igate_bias_init)
    _checks.check_positive_int("chunk_size", self.chunk_size)
    if self.chunk_size & (self.chunk_size - 1):
      raise ValueError(f"chunk_size: expected a power of two, got {self.chunk_size}")
    _checks.check_non_negative_number("eps", self.eps)

  def check(self, cfg: LMConfig) -> None:
    for field in ("qk_dim_factor", "v_dim_factor"):
      _checks.check_head_width(field, getattr(self, field), cfg.d_model, cfg.num_heads)


@register_mixer("mlstm", layers.MLSTM, options=MLSTMOptions)
def _mlstm(cfg: LMConfig, options: MLSTMOptions, *, rngs: nnx.Rngs) -> layers.MLSTM:
  return layers.MLSTM(
    cfg.d_model,
    cfg.num_heads,
    qk_dim_factor=options.qk_dim_factor,
    v_dim_factor=options.v_dim_factor,
    gate_soft_cap=options.gate_soft_cap,
    igate_bias_init=options.igate_bias_init,
    chunk_size=options.chunk_size,
    eps=options.eps,
    norm_eps=cfg.norm_eps,
    **_shared(cfg),
    rngs=rngs,
  )


# ----------------------------------------------------------------------------------------------
# RAT: recurrence within chunks, attention across them.


@dataclasses.dataclass(frozen=True)
class RATOptions:
  """RAT (``layers.RAT``).

  Attributes:
    chunk_size: the chunk length ``L`` (1: attention; ``max_seq_len``: the gated RNN).
    qk_groups: query/key groups tiled across the heads, a divisor of ``num_heads``.
    position: ``"inter_rope"`` (RoPE over chunk indices) or ``"nope"``.
  """

  chunk_size: int = 16
  qk_groups: int = 2
  position: str = "inter_rope"

  def __post_init__(self):
    _checks.check_positive_int("chunk_size", self.chunk_size)
    _checks.check_positive_int("qk_groups", self.qk_groups)
    _checks.check_choice("position", self.position, layers.rat.POSITIONS)

  def check(self, cfg: LMConfig) -> None:
    if cfg.d_model % cfg.num_heads:
      raise ValueError(
        f"num_heads: RAT needs a divisor of d_model={cfg.d_model}, got {cfg.num_heads}"
      )
    if self.position == "inter_rope" and (cfg.d_model // cfg.num_heads) % 2:
      raise ValueError(
        f"num_heads: RAT's InterRoPE needs an even head width d_model // num_heads, got "
        f"{cfg.d_model} // {cfg.num_heads}"
      )
    if cfg.num_heads % self.qk_groups:
      raise ValueError(
        f"qk_groups: expected a divisor of num_heads={cfg.num_heads}, got {self.qk_groups}"
      )


@register_mixer("rat", layers.RAT, options=RATOptions)
def _rat(cfg: LMConfig, options: RATOptions, *, rngs: nnx.Rngs) -> layers.RAT:
  return layers.RAT(
    cfg.d_model,
    cfg.num_heads,
    chunk_size=options.chunk_size,
    qk_groups=options.qk_groups,
    position=options.position,
    rope_theta=cfg.rope_theta,
    **_shared(cfg),
    rngs=rngs,
  )
