"""Hugging Face ``config.json`` of the Llama family to ``LMConfig``, and back.

The Llama family on jaxrec's ``LM`` is a configuration, not another model: every layer an
``"attention"`` mixer (grouped-query attention with RoPE), a SwiGLU MLP, RMSNorm before each, a
final norm and a tied or untied head. Read from ``LlamaConfig`` and ``Qwen2Config`` fields:

=============================  =====================================================
Hugging Face                   ``LMConfig``
=============================  =====================================================
``vocab_size``                 ``vocab_size``
``hidden_size``                ``d_model``
``intermediate_size``          ``mlp_hidden``
``num_hidden_layers``          ``num_layers``
``num_attention_heads``        ``num_heads``
``num_key_value_heads``        ``num_kv_heads`` (default: ``num_attention_heads``)
``head_dim``                   ``head_dim`` (default: ``hidden_size / heads``)
``rope_theta``                 ``rope_theta`` (transformers 5: in ``rope_parameters``)
``rope_scaling``               ``rope_scaling`` (Llama 3's; transformers 5: ``rope_parameters``)
``rms_norm_eps``               ``norm_eps``
``tie_word_embeddings``        ``tie_embeddings`` (default ``False``)
``max_position_embeddings``    ``max_seq_len``
``model_type == "qwen2"``      ``qkv_bias=True``
=============================  =====================================================

Anything the ``LM`` cannot express is refused with the field named: another activation than
SiLU, MLP biases, an output-projection bias (Llama's ``attention_bias``), Qwen2's sliding window.

A converted model (``jaxrec.linearize.liger``) keeps the Llama weights, so it is written with the
same tensor names; its ``config.json`` then says ``"model_type": "jaxrec"`` (transformers cannot
run it, and refuses it rather than build the wrong model) and holds the whole ``LMConfig`` under
``"jaxrec"`` (``LMConfig.to_dict``), from which ``config_from_hf`` rebuilds it.
"""

from collections.abc import Mapping
from typing import Any

from jaxrec.models.config import LMConfig

MODEL_TYPES = ("llama", "qwen2")
JAXREC_MODEL_TYPE = "jaxrec"
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_DTYPES = ("float32", "bfloat16", "float16")


def config_from_hf(hf: Mapping[str, Any], *, dtype: str | None = None) -> LMConfig:
  """The ``LMConfig`` of a Hugging Face Llama or Qwen2 ``config.json`` (or of one written by
  ``hf_config_of`` for a converted model).

  Args:
    hf: the parsed ``config.json``.
    dtype: compute and parameter dtype; ``None`` takes the config's ``torch_dtype`` (``dtype``
      in transformers 5) when it is float32, bfloat16 or float16, else float32.

  Raises:
    ValueError: naming the ``config.json`` field the ``LM`` cannot express.
  """
  dtype = _dtype(hf) if dtype is None else dtype
  if hf.get("model_type") == JAXREC_MODEL_TYPE:
    # Written by this version (options grouped) or an earlier one (flat names): from_dict reads
    # both.
    return LMConfig.from_dict({**hf["jaxrec"], "dtype": dtype, "param_dtype": dtype})
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(
      f"config.json: model_type: expected one of {(*MODEL_TYPES, JAXREC_MODEL_TYPE)}, "
      f"got {model_type!r}"
    )
  _refuse(hf, "hidden_act", lambda v: v not in ("silu", None), "'silu' (SwiGLU)")
  _refuse(hf, "mlp_bias", bool, "false (the MLP has no biases)")
  if model_type == "llama":
    _refuse(hf, "attention_bias", bool, "false (o_proj has no bias)")
  else:
    _refuse(hf, "use_sliding_window", bool, "false (full attention in every layer)")
  theta, scaling = _rope(hf)
  heads = hf["num_attention_heads"]
  return LMConfig(
    vocab_size=hf["vocab_size"],
    d_model=hf["hidden_size"],
    num_layers=hf["num_hidden_layers"],
    mixer_pattern=("attention",),
    num_heads=heads,
    num_kv_heads=hf.get("num_key_value_heads") or heads,
    head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
    mlp_hidden=hf["intermediate_size"],
    rope_theta=float(theta),
    rope_scaling=scaling,
    qkv_bias=model_type == "qwen2",
    max_seq_len=hf.get("max_position_embeddings", 2048),
    norm_eps=hf.get("rms_norm_eps", 1e-6),
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    dtype=dtype,
    param_dtype=dtype,
  )


def hf_config_of(cfg: LMConfig, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The ``config.json`` of a model with config ``cfg``: a Llama (Qwen2 with ``qkv_bias``)
  config when every layer is full ``"attention"``, a ``"jaxrec"`` one for ``"liger"`` layers.

  Args:
    cfg: the model's config.
    base: a source ``config.json`` whose other fields (token ids, ...) are kept.

  Raises:
    ValueError: ``cfg`` has mixers (or a sliding window) with no Llama weights.
  """
  mixers = set(cfg.layer_mixers)
  window = cfg.options("attention").window
  if not mixers <= {"attention", "liger"} or ("attention" in mixers and window is not None):
    raise ValueError(
      f"cfg: expected 'attention' or 'liger' layers without an attention window to write a "
      f"Hugging Face checkpoint, got mixers {sorted(mixers)} and attention.window={window}"
    )
  model_type = "qwen2" if cfg.qkv_bias else "llama"
  out = {k: v for k, v in (base or {}).items() if k not in ("rope_parameters", "jaxrec", "dtype")}
  out.update(
    architectures=[_ARCHITECTURES[model_type]],
    model_type=model_type,
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.d_model,
    intermediate_size=cfg.mlp_dim,
    num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.kv_heads,
    head_dim=cfg.attn_head_dim,
    hidden_act="silu",
    max_position_embeddings=cfg.max_seq_len,
    rms_norm_eps=cfg.norm_eps,
    rope_theta=cfg.rope_theta,
    rope_scaling=None if cfg.rope_scaling is None else dict(cfg.rope_scaling),
    tie_word_embeddings=cfg.tie_embeddings,
    mlp_bias=False,
    torch_dtype=cfg.param_dtype,
  )
  if model_type == "llama":
    out["attention_bias"] = False
  else:
    out["use_sliding_window"] = False
  if mixers != {"attention"}:
    out.update(architectures=["JaxrecLM"], model_type=JAXREC_MODEL_TYPE)
    out["jaxrec"] = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_dict().items()}
  return out


def _dtype(hf: Mapping[str, Any]) -> str:
  dtype = hf.get("torch_dtype", hf.get("dtype"))
  return dtype if dtype in _DTYPES else "float32"


def _refuse(hf, field, bad, expected):
  if field in hf and bad(hf[field]):
    raise ValueError(f"config.json: {field}: expected {expected}, got {hf[field]!r}")


def _rope(hf: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
  """``(rope_theta, rope_scaling)`` from transformers 4's fields or 5's ``rope_parameters``."""
  params = dict(hf.get("rope_parameters") or {})
  theta = params.pop("rope_theta", hf.get("rope_theta", 10_000.0))
  scaling = params or hf.get("rope_scaling")
  if scaling is None or scaling.get("rope_type", scaling.get("type")) in (None, "default"):
    return theta, None
  if scaling.get("rope_type", scaling.get("type")) != "llama3":
    raise ValueError(
      f"config.json: rope_scaling: expected Llama 3's scaling (rope_type 'llama3') or none, "
      f"got {scaling!r}"
    )
  return theta, {k: v for k, v in scaling.items() if k != "type"} | {"rope_type": "llama3"}
