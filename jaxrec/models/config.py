"""``LMConfig``: the frozen description of a language model."""

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from jaxrec.layers import liger, rope
from jaxrec.layers.moe import ROUTERS
from jaxrec.models import registry


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Configuration of ``LM``; every field is validated on construction.

  Only ``jaxrec.models`` reads it: the builders of ``jaxrec.models.mixers`` turn the fields into
  each mixer layer's constructor arguments (``gla_*`` for GLA, ``pararnn_*`` for ParaGRU /
  ParaLSTM, ``liger_*`` for Liger attention, ``based_*`` for Based and PLA, ``baseconv_*``,
  ``pla_*``, ``mlstm_*``, ``rat_*``, ``moe_*``, the shared sizes and dtypes for all). The Llama
  family (Llama 2 and 3, Qwen2) is an all-``"attention"`` pattern with its options below
  (``rope_scaling``, ``qkv_bias``, ``norm_eps``, ``mlp_hidden``, ``head_dim``,
  ``tie_embeddings``); ``jaxrec.models.config_from_hf`` reads one from a Hugging Face config.

  Attributes:
    vocab_size: number of token ids.
    d_model: residual stream width ``D``.
    num_layers: number of blocks.
    mixer_pattern: token mixer names (``jaxrec.models.MIXERS``), repeated to ``num_layers``:
      layer ``i`` uses ``mixer_pattern[i % len(mixer_pattern)]``.
    num_heads: query heads (attention) and heads (GLA).
    num_kv_heads: key/value heads of attention (grouped-query when < ``num_heads``); ``None``
      means ``num_heads``.
    head_dim: attention head width; ``None`` means ``d_model // num_heads``.
    mlp_hidden: SwiGLU hidden width; ``None`` means ``mlp_ratio · d_model`` rounded up to a
      multiple of 64.
    mlp_ratio: see ``mlp_hidden``.
    window: attention sliding window (number of visible keys, the query's own included);
      ``None`` is full causal attention.
    rope_theta: RoPE base wavelength.
    rope_scaling: RoPE frequency scaling as the ``rope_scaling`` dict of a Hugging Face config
      (Llama 3's, ``{"rope_type": "llama3", "factor": ..., ...}``, see ``jaxrec.layers.rope``),
      stored as its sorted items; ``None`` for plain RoPE.
    qkv_bias: the attention query, key and value projections have biases (Qwen2).
    max_seq_len: the longest sequence the model is meant for (training length; default cache
      size).
    dtype: compute dtype, ``"float32"`` or ``"bfloat16"``; logits are always fp32.
    param_dtype: parameter storage dtype.
    scan_layers: store blocks stacked on a leading ``"layers"`` axis, one group per repetition of
      ``mixer_pattern`` (needs ``num_layers % len(mixer_pattern) == 0``), and run them with
      ``lax.scan``: one compiled group instead of ``num_layers`` blocks.
    remat: recompute each block (group, when scanning) in the backward pass instead of keeping its
      activations.
    tie_embeddings: the output head is the transposed embedding.
    norm_eps: RMSNorm epsilon.
    init_std: standard deviation of embeddings and input projections; output projections use
      ``init_std / sqrt(2 num_layers)``.
    logit_soft_cap: logits become ``cap · tanh(logits / cap)`` (xLSTM 7B: 30); ``None`` for
      none.
    gla_expand_k: GLA key width as a multiple of ``d_model`` (0.5 in the GLA paper).
    gla_expand_v: GLA value width as a multiple of ``d_model``.
    gla_gate_rank: rank of GLA's decay projection.
    gla_gate_normalizer: ``τ`` in ``log α = logsigmoid(·) / τ``.
    gla_chunk_size: chunk length of GLA's chunkwise-parallel form.
    pararnn_heads: heads of the block-diagonal input projections of ParaGRU / ParaLSTM (their
      state width is ``d_model``); ``None`` means ``num_heads``.
    pararnn_max_iters: Newton iterations at most in ParaGRU / ParaLSTM; sequences not converged
      by then are recomputed by the sequential scan, so this trades speed, never accuracy.
    liger_variant: the recurrence of ``"liger"`` layers (``jaxrec.layers.LigerAttention``):
      ``"gla"`` or ``"hgrn2"``.
    liger_window: keys seen by their sliding-window softmax branch; ``None`` drops the branch
      (``jaxrec.linearize.liger`` sets the paper's 64 unless told otherwise; a default of
      ``None`` lets run records restore either choice, as their unset fields keep defaults).
    liger_gate_source: ``"key"`` (the gate is the key projection) or ``"projection"`` (a new
      random projection, the paper's ablation).
    liger_chunk_size: chunk length of their recurrence's chunkwise-parallel form.
    based_feature_dim: query/key width per head of Based and PLA before the Taylor feature map
      (16 in Based and JRT-RNN; the state has ``1 + F + F²`` rows per head); their value width
      per head is ``d_model // num_heads``.
    baseconv_kernel_size: taps of BaseConv's causal short convolution (3 in Based and JRT-RNN).
    pla_prefix_len: ``M``, the tokens at the start of every document that prefix linear
      attention (JRT-RNN) reads non-causally (1024 in JRT-RNN). It is part of the model, like
      ``max_seq_len``: train with prompts whose prefix is ``M`` tokens (or documents shorter
      than ``M``, which are all prefix) and score no token inside a prefix by next-token loss, as
      the encoder sees it (``jaxrec.data.jrt_objective`` scores the prefix by masked-LM instead).
    mlstm_qk_dim_factor: mLSTM query/key width (all heads) as a multiple of ``d_model``.
    mlstm_v_dim_factor: mLSTM value width (all heads) as a multiple of ``d_model``.
    mlstm_gate_soft_cap: soft cap of the mLSTM gate pre-activations (xLSTM 7B: 15); ``None`` for
      none.
    mlstm_igate_bias_init: initial mLSTM input-gate bias (xLSTM 7B: -10).
    mlstm_chunk_size: chunk length of the mLSTM's chunkwise form.
    mlstm_eps: ``ε`` of the mLSTM's denominator.
    rat_chunk_size: RAT's chunk length ``L`` (1: attention; ``max_seq_len``: the gated RNN).
    rat_qk_groups: RAT's query/key groups tiled across the heads, a divisor of ``num_heads``
      (checked when ``mixer_pattern`` has ``"rat"``).
    rat_position: RAT's positions, ``"inter_rope"`` (chunk indices) or ``"nope"``.
    ffn: the feed-forward of every block, ``"mlp"`` (SwiGLU) or ``"moe"`` (``layers.MoE``, whose
      fields are the ``moe_*`` ones; not with ``scan_layers``, the routers' state and statistics
      run through the layer loop).
    moe_num_experts: experts per MoE layer.
    moe_top_k: experts per token, at most ``moe_num_experts``.
    moe_capacity_factor: expert capacity as a multiple of the balanced load; ``None``: no drops.
    moe_router: ``"linear" | "gru" | "gru_no_recurrence" | "gru_detached" | "mlp"``
      (``jaxrec.layers.moe``); the GRU routers share one ``GRURouterCell`` across layers.
    moe_router_dim: the router state width ``p``.
    moe_hidden: every expert's hidden width; ``None`` means ``mlp_dim``.
    moe_aux_weight: weight of the load-balancing loss added to the training loss.
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
  window: int | None = None
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
  gla_expand_k: float = 0.5
  gla_expand_v: float = 1.0
  gla_gate_rank: int = 16
  gla_gate_normalizer: float = 16.0
  gla_chunk_size: int = 64
  pararnn_heads: int | None = None
  pararnn_max_iters: int = 10
  liger_variant: str = "gla"
  liger_window: int | None = None
  liger_gate_source: str = "key"
  liger_chunk_size: int = 64
  based_feature_dim: int = 16
  baseconv_kernel_size: int = 3
  pla_prefix_len: int = 1024
  logit_soft_cap: float | None = None
  mlstm_qk_dim_factor: float = 0.5
  mlstm_v_dim_factor: float = 1.0
  mlstm_gate_soft_cap: float | None = 15.0
  mlstm_igate_bias_init: float = -10.0
  mlstm_chunk_size: int = 64
  mlstm_eps: float = 1e-6
  rat_chunk_size: int = 16
  rat_qk_groups: int = 2
  rat_position: str = "inter_rope"
  ffn: str = "mlp"
  moe_num_experts: int = 8
  moe_top_k: int = 2
  moe_capacity_factor: float | None = 1.25
  moe_router: str = "linear"
  moe_router_dim: int = 128
  moe_hidden: int | None = None
  moe_aux_weight: float = 0.01

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
      _check_positive(field, getattr(self, field))
    for field in (
      "num_kv_heads",
      "head_dim",
      "mlp_hidden",
      "window",
      "pararnn_heads",
      "liger_window",
    ):
      if getattr(self, field) is not None:
        _check_positive(field, getattr(self, field))
    if self.num_heads % self.kv_heads:
      raise ValueError(
        f"num_kv_heads: expected a divisor of num_heads={self.num_heads}, got {self.num_kv_heads}"
      )
    if self.attn_head_dim < 2 or self.attn_head_dim % 2:
      raise ValueError(
        f"head_dim: expected an even attention head width (RoPE), got {self.attn_head_dim} "
        f"(head_dim={self.head_dim}, d_model={self.d_model}, num_heads={self.num_heads})"
      )
    for field in ("pararnn_max_iters", "based_feature_dim", "baseconv_kernel_size"):
      _check_positive(field, getattr(self, field))
    if (
      isinstance(self.pla_prefix_len, bool)
      or not isinstance(self.pla_prefix_len, int)
      or self.pla_prefix_len < 0
    ):
      raise ValueError(f"pla_prefix_len: expected an int >= 0, got {self.pla_prefix_len!r}")
    if {"based", "pla"} & set(self.mixer_pattern) and self.d_model % self.num_heads:
      raise ValueError(
        f"num_heads: Based and PLA need a divisor of d_model={self.d_model} (value width "
        f"d_model // num_heads), got {self.num_heads}"
      )
    if self.d_model % self.rnn_heads:
      raise ValueError(
        f"pararnn_heads: expected a divisor of d_model={self.d_model}, got {self.rnn_heads} "
        f"(pararnn_heads={self.pararnn_heads}, num_heads={self.num_heads})"
      )
    for field in ("gla_expand_k", "gla_expand_v"):
      self._check_head_width(field)
    for field in ("logit_soft_cap", "mlstm_gate_soft_cap"):
      value = getattr(self, field)
      if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float) or not value > 0
      ):
        raise ValueError(f"{field}: expected a positive number or None, got {value!r}")
    if "mlstm" in self.mixer_pattern:
      self._check_mlstm()
    _check_rat(self)
    _check_moe(self)
    for field in ("dtype", "param_dtype"):
      if getattr(self, field) not in ("float32", "bfloat16", "float16"):
        raise ValueError(
          f"{field}: expected 'float32', 'bfloat16' or 'float16', got {getattr(self, field)!r}"
        )
    self._normalize_rope_scaling()
    if not isinstance(self.qkv_bias, bool):
      raise ValueError(f"qkv_bias: expected True or False, got {self.qkv_bias!r}")
    for field, allowed in (
      ("liger_variant", liger.VARIANTS),
      ("liger_gate_source", liger.GATE_SOURCES),
    ):
      if getattr(self, field) not in allowed:
        raise ValueError(f"{field}: expected one of {allowed}, got {getattr(self, field)!r}")
    _check_positive("liger_chunk_size", self.liger_chunk_size)
    if self.scan_layers and self.num_layers % len(self.mixer_pattern):
      raise ValueError(
        f"num_layers: scan_layers=True needs a multiple of len(mixer_pattern)="
        f"{len(self.mixer_pattern)}, got {self.num_layers}"
      )

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

  def _check_head_width(self, field: str) -> None:
    """``field · d_model`` must split over ``num_heads`` heads."""
    factor = getattr(self, field)
    width = int(factor * self.d_model) if isinstance(factor, int | float) else 0
    if width < self.num_heads or width % self.num_heads:
      raise ValueError(
        f"{field}: expected {field} * d_model to be a positive multiple of "
        f"num_heads={self.num_heads}, got {factor!r} * {self.d_model} = {width}"
      )

  def _check_mlstm(self) -> None:
    for field in ("mlstm_qk_dim_factor", "mlstm_v_dim_factor"):
      self._check_head_width(field)
    _check_positive("mlstm_chunk_size", self.mlstm_chunk_size)
    if self.mlstm_chunk_size & (self.mlstm_chunk_size - 1):
      raise ValueError(f"mlstm_chunk_size: expected a power of two, got {self.mlstm_chunk_size}")
    for field in ("mlstm_igate_bias_init", "mlstm_eps"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{field}: expected a number, got {value!r}")
    if not self.mlstm_eps >= 0:
      raise ValueError(f"mlstm_eps: expected a non-negative number, got {self.mlstm_eps!r}")

  @property
  def kv_heads(self) -> int:
    """``num_kv_heads`` with its default resolved."""
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def rnn_heads(self) -> int:
    """``pararnn_heads`` with its default resolved."""
    return self.num_heads if self.pararnn_heads is None else self.pararnn_heads

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


def _check_rat(cfg: LMConfig) -> None:
  _check_positive("rat_chunk_size", cfg.rat_chunk_size)
  _check_positive("rat_qk_groups", cfg.rat_qk_groups)
  if "rat" in cfg.mixer_pattern and cfg.num_heads % cfg.rat_qk_groups:
    raise ValueError(
      f"rat_qk_groups: expected a divisor of num_heads={cfg.num_heads}, got {cfg.rat_qk_groups}"
    )
  if cfg.rat_position not in ("inter_rope", "nope"):
    raise ValueError(f"rat_position: expected 'inter_rope' or 'nope', got {cfg.rat_position!r}")


def _check_moe(cfg: LMConfig) -> None:
  if cfg.ffn not in ("mlp", "moe"):
    raise ValueError(f"ffn: expected 'mlp' or 'moe', got {cfg.ffn!r}")
  for field in ("moe_num_experts", "moe_top_k", "moe_router_dim"):
    _check_positive(field, getattr(cfg, field))
  if cfg.moe_hidden is not None:
    _check_positive("moe_hidden", cfg.moe_hidden)
  if cfg.moe_top_k > cfg.moe_num_experts:
    raise ValueError(
      f"moe_top_k: expected at most moe_num_experts={cfg.moe_num_experts}, got {cfg.moe_top_k}"
    )
  factor = cfg.moe_capacity_factor
  if factor is not None and (isinstance(factor, bool) or not factor > 0):
    raise ValueError(f"moe_capacity_factor: expected a positive number or None, got {factor!r}")
  if cfg.moe_router not in ROUTERS:
    raise ValueError(f"moe_router: expected one of {ROUTERS}, got {cfg.moe_router!r}")
  if not cfg.moe_aux_weight >= 0:
    raise ValueError(f"moe_aux_weight: expected a non-negative number, got {cfg.moe_aux_weight!r}")
  if cfg.ffn == "moe" and cfg.scan_layers:
    raise ValueError(
      "scan_layers: not supported with ffn='moe' (the router state and routing statistics run "
      "through the unscanned layer loop); set scan_layers=False"
    )


def _check_positive(field: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{field}: expected a positive int, got {value!r}")
