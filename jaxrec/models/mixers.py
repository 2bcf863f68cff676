"""The built-in token mixers, each registered with the builder that makes it from an ``LMConfig``.

A builder is the one place where a mixer's ``LMConfig`` fields become its layer's constructor
arguments (how to add a mixer: ``jaxrec.models.registry``). Every mixer shares ``init_std``,
``num_layers`` (the depth scaling of its output projection), ``dtype`` and ``param_dtype``.
"""

import jax.numpy as jnp
from flax import nnx

from jaxrec import layers
from jaxrec.models.config import LMConfig
from jaxrec.models.registry import get_mixer, register_mixer


def build_mixer(name: str, cfg: LMConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """The mixer registered under ``name``, configured by ``cfg``."""
  return get_mixer(name).build(cfg, rngs=rngs)


def _shared(cfg: LMConfig) -> dict:
  return dict(
    init_std=cfg.init_std,
    num_layers=cfg.num_layers,
    dtype=jnp.dtype(cfg.dtype),
    param_dtype=jnp.dtype(cfg.param_dtype),
  )


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


@register_mixer("attention", layers.Attention)
def _attention(cfg: LMConfig, *, rngs: nnx.Rngs) -> layers.Attention:
  return layers.Attention(
    cfg.d_model, cfg.num_heads, window=cfg.window, **_attention_args(cfg), rngs=rngs
  )


@register_mixer("liger", layers.LigerAttention)
def _liger(cfg: LMConfig, *, rngs: nnx.Rngs) -> layers.LigerAttention:
  return layers.LigerAttention(
    cfg.d_model,
    cfg.num_heads,
    variant=cfg.liger_variant,
    window=cfg.liger_window,
    gate_source=cfg.liger_gate_source,
    chunk_size=cfg.liger_chunk_size,
    **_attention_args(cfg),
    rngs=rngs,
  )


@register_mixer("gla", layers.GatedLinearAttention)
def _gla(cfg: LMConfig, *, rngs: nnx.Rngs) -> layers.GatedLinearAttention:
  return layers.GatedLinearAttention(
    cfg.d_model,
    cfg.num_heads,
    expand_k=cfg.gla_expand_k,
    expand_v=cfg.gla_expand_v,
    gate_rank=cfg.gla_gate_rank,
    gate_normalizer=cfg.gla_gate_normalizer,
    chunk_size=cfg.gla_chunk_size,
    norm_eps=cfg.norm_eps,
    **_shared(cfg),
    rngs=rngs,
  )


def _pararnn_args(cfg: LMConfig) -> dict:
  """ParaGRU and ParaLSTM share their arguments; the state width is ``d_model``."""
  return dict(
    d_model=cfg.d_model,
    num_heads=cfg.rnn_heads,
    max_iters=cfg.pararnn_max_iters,
    norm_eps=cfg.norm_eps,
    **_shared(cfg),
  )


@register_mixer("paragru", layers.ParaGRU)
def _paragru(cfg: LMConfig, *, rngs: nnx.Rngs) -> layers.ParaGRU:
  return layers.ParaGRU(**_pararnn_args(cfg), rngs=rngs)


@register_mixer("paralstm", layers.ParaLSTM)
def _paralstm(cfg: LMConfig, *, rngs: nnx.Rngs) -> layers.ParaLSTM:
  return layers.ParaLSTM(**_pararnn_args(cfg), rngs=rngs)


@register_mixer("based", layers.BasedLinearAttention)
def _based(cfg: LMConfig, *, rngs: nnx.Rngs) -> layers.BasedLinearAttention:
  return layers.BasedLinearAttention(
    cfg.d_model, cfg.num_heads, feature_dim=cfg.based_feature_dim, **_shared(cfg), rngs=rngs
  )


@register_mixer("baseconv", layers.BaseConv)
def _baseconv(cfg: LMConfig, *, rngs: nnx.Rngs) -> layers.BaseConv:
  return layers.BaseConv(
    cfg.d_model, kernel_size=cfg.baseconv_kernel_size, **_shared(cfg), rngs=rngs
  )


@register_mixer("pla", layers.PrefixLinearAttention)
def _pla(cfg: LMConfig, *, rngs: nnx.Rngs) -> layers.PrefixLinearAttention:
  return layers.PrefixLinearAttention(
    cfg.d_model,
    cfg.num_heads,
    prefix_len=cfg.pla_prefix_len,
    feature_dim=cfg.based_feature_dim,
    **_shared(cfg),
    rngs=rngs,
  )


@register_mixer("mlstm", layers.MLSTM)
def _mlstm(cfg: LMConfig, *, rngs: nnx.Rngs) -> layers.MLSTM:
  return layers.MLSTM(
    cfg.d_model,
    cfg.num_heads,
    qk_dim_factor=cfg.mlstm_qk_dim_factor,
    v_dim_factor=cfg.mlstm_v_dim_factor,
    gate_soft_cap=cfg.mlstm_gate_soft_cap,
    igate_bias_init=cfg.mlstm_igate_bias_init,
    chunk_size=cfg.mlstm_chunk_size,
    eps=cfg.mlstm_eps,
    norm_eps=cfg.norm_eps,
    **_shared(cfg),
    rngs=rngs,
  )


@register_mixer("rat", layers.RAT)
def _rat(cfg: LMConfig, *, rngs: nnx.Rngs) -> layers.RAT:
  return layers.RAT(
    cfg.d_model,
    cfg.num_heads,
    chunk_size=cfg.rat_chunk_size,
    qk_groups=cfg.rat_qk_groups,
    position=cfg.rat_position,
    rope_theta=cfg.rope_theta,
    **_shared(cfg),
    rngs=rngs,
  )
