"""The mixer registry: names to layers and builders, the builders' reading of ``LMConfig``, and a
mixer registered from outside the package working in an LM. Abstract models only (no compiles)."""

import dataclasses

import jax.numpy as jnp
import pytest
from flax import nnx

from jaxrec import layers
from jaxrec.models import (
  LM,
  MIXERS,
  LMConfig,
  NoOptions,
  build_mixer,
  get_mixer,
  mixer_names,
  register_mixer,
)

CFG = LMConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2, init_std=0.1)


def _abstract(name, cfg):
  return nnx.eval_shape(lambda: build_mixer(name, cfg, rngs=nnx.Rngs(0)))


def test_built_in_mixers_are_registered_with_their_layers():
  assert mixer_names() == (
    "attention",
    "baseconv",
    "based",
    "gla",
    "liger",
    "mlstm",
    "paragru",
    "paralstm",
    "pla",
    "rat",
  )
  assert get_mixer("rat").module is layers.RAT
  assert get_mixer("liger").module is layers.LigerAttention
  assert get_mixer("attention").module is layers.Attention
  assert get_mixer("gla").module is layers.GatedLinearAttention
  assert get_mixer("mlstm").module is layers.MLSTM
  assert get_mixer("paragru").module is layers.ParaGRU
  assert get_mixer("paralstm").module is layers.ParaLSTM
  assert get_mixer("based").module is layers.BasedLinearAttention
  assert get_mixer("baseconv").module is layers.BaseConv
  assert get_mixer("pla").module is layers.PrefixLinearAttention
  for name in mixer_names():
    assert isinstance(_abstract(name, CFG), get_mixer(name).module), name


def test_builders_pass_the_config_fields_on():
  cfg = CFG.replace(
    num_heads=4,
    num_kv_heads=1,
    head_dim=6,
    attention={"window": 3},
    rope_theta=500.0,
    gla=dict(expand_k=1.0, expand_v=2.0, gate_rank=5, gate_normalizer=8.0, chunk_size=32),
    paragru={"heads": 8, "max_iters": 3},
    paralstm={"heads": 8, "max_iters": 3},
    mlstm=dict(qk_dim_factor=1.0, v_dim_factor=2.0, gate_soft_cap=7.0, chunk_size=8, eps=1e-4),
    norm_eps=1e-3,
    param_dtype="bfloat16",
    qkv_bias=True,
    rope_scaling={
      "rope_type": "llama3",
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64,
    },
    liger=dict(variant="hgrn2", window=5, gate_source="projection", chunk_size=8),
  )
  attention = _abstract("attention", cfg)
  assert (attention.num_heads, attention.num_kv_heads, attention.head_dim) == (4, 1, 6)
  assert (attention.window, attention.rope_theta) == (3, 500.0)
  assert attention.k_proj.kernel.shape == (16, 1, 6) and attention.k_proj.bias.shape == (1, 6)
  assert dict(attention.rope_scaling)["original_max_position_embeddings"] == 64
  liger = _abstract("liger", cfg)
  assert (liger.variant, liger.window, liger.gate_source, liger.chunk_size) == (
    "hgrn2",
    5,
    "projection",
    8,
  )
  assert liger.g_proj.kernel.shape == (16, 1, 6) and liger.rope_scaling == attention.rope_scaling
  gla = _abstract("gla", cfg)
  assert (gla.key_dim, gla.value_dim, gla.chunk_size, gla.gate_normalizer) == (4, 8, 32, 8.0)
  assert gla.decay_down.kernel.shape == (16, 5) and gla.out_norm.eps == 1e-3
  mlstm = _abstract("mlstm", cfg)
  assert (mlstm.key_dim, mlstm.value_dim, mlstm.chunk_size, mlstm.eps) == (4, 8, 8, 1e-4)
  assert mlstm.gate_soft_cap == 7.0 and mlstm.out_norm.eps == 1e-3
  for name in ("paragru", "paralstm"):
    rnn = _abstract(name, cfg)
    assert (rnn.num_heads, rnn.max_iters, rnn.width) == (8, 3, 16), name
    assert rnn.recurrent.dtype == jnp.bfloat16, name
  based_cfg = CFG.replace(
    num_heads=4,
    based={"feature_dim": 3},
    baseconv={"kernel_size": 5},
    pla={"prefix_len": 7, "feature_dim": 3},
  )
  for name in ("based", "pla"):
    mixer = _abstract(name, based_cfg)
    assert (mixer.num_heads, mixer.feature_dim, mixer.head_dim) == (4, 3, 4), name
  assert _abstract("pla", based_cfg).prefix_len == 7
  assert _abstract("baseconv", based_cfg).conv_kernel.shape == (5, 16)
  # heads defaults to num_heads.
  assert _abstract("paragru", cfg.replace(paragru={"heads": None})).num_heads == 4


def test_unknown_and_taken_names_are_errors():
  with pytest.raises(ValueError, match=r"unknown mixer 'lstm'; registered mixers: \('attention'"):
    get_mixer("lstm")
  with pytest.raises(ValueError, match=r"mixer_pattern: unknown mixer 'lstm'.*'paralstm'"):
    dataclasses.replace(CFG, mixer_pattern=("gla", "lstm"))
  with pytest.raises(ValueError, match="'gla' is already registered to GatedLinearAttention"):
    register_mixer("gla", layers.Attention)
  with pytest.raises(ValueError, match=r"module: expected an nnx\.Module class"):
    register_mixer("identity", lambda x: x)
  assert get_mixer("gla").module is layers.GatedLinearAttention


@dataclasses.dataclass
class _Mutable:
  scale: float = 0.5


@dataclasses.dataclass(frozen=True)
class _NoDefault:
  scale: float


@pytest.mark.parametrize(
  "name, options, message",
  [
    ("d_model", NoOptions, r"name: 'd_model' is an LMConfig field or reserved"),
    ("moe", NoOptions, r"name: 'moe' is an LMConfig field or reserved"),
    ("preset", NoOptions, r"name: 'preset' is an LMConfig field or reserved"),
    ("my-mixer", NoOptions, r"name: expected an identifier"),
    ("scale", _Mutable, r"options: expected a frozen dataclass class"),
    ("scale", _NoDefault(1.0), r"options: expected a frozen dataclass class"),
    ("scale", _NoDefault, r"options: expected defaults for every field of _NoDefault"),
  ],
)
def test_a_mixer_name_is_a_flag_group_and_its_options_a_frozen_dataclass(name, options, message):
  with pytest.raises(ValueError, match=message):
    register_mixer(name, _Scale, options=options)
  assert name not in MIXERS


class _Scale(nnx.Module):
  """A stand-in mixer with plain arguments: ``y = scale · x``, no state."""

  def __init__(self, d_model: int, *, rngs: nnx.Rngs):
    del rngs
    self.scale = nnx.Param(jnp.full((d_model,), 0.5))

  def __call__(self, x, *, segment_ids=None, cache=None):
    return x * self.scale[...], cache

  def init_cache(self, batch_size, max_length, dtype):
    return ()


def test_a_mixer_registered_outside_the_package_builds_in_an_lm():
  """A mixer without options of its own gets ``NoOptions``. (A mixer with options, trained
  through the launcher: ``tests/train/new_mixer_test.py``.)"""
  built = []

  @register_mixer("scale", _Scale)
  def _build(cfg: LMConfig, options: NoOptions, *, rngs: nnx.Rngs) -> _Scale:
    built.append((cfg, options))
    return _Scale(cfg.d_model, rngs=rngs)

  try:
    cfg = dataclasses.replace(CFG, mixer_pattern=("scale", "gla"))
    model = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
    assert isinstance(model.layers[0].mixer, _Scale)
    assert isinstance(model.layers[1].mixer, layers.GatedLinearAttention)
    assert built == [(cfg, NoOptions())]
    assert cfg.to_dict()["scale"] == {}
  finally:
    del MIXERS["scale"]
