"""The LM stack: configuration, the mixer registry, model, presets, and xLSTM 7B's weights.

This package is the only reader of ``LMConfig``: ``registry`` maps mixer names to the layers of
``jaxrec.layers`` and to the builders (``mixers``) that configure them from an ``LMConfig``.
"""

from jaxrec.models.config import LMConfig
from jaxrec.models.lm import LM, Block, BlockGroup, param_count_of
from jaxrec.models.mixers import build_mixer
from jaxrec.models.presets import PRESETS, get_preset, param_count
from jaxrec.models.registry import MIXERS, MixerEntry, get_mixer, mixer_names, register_mixer
from jaxrec.models.xlstm import config_from_hf, load_xlstm

__all__ = [
  "LM",
  "MIXERS",
  "PRESETS",
  "Block",
  "BlockGroup",
  "LMConfig",
  "MixerEntry",
  "build_mixer",
  "config_from_hf",
  "get_mixer",
  "get_preset",
  "load_xlstm",
  "mixer_names",
  "param_count",
  "param_count_of",
  "register_mixer",
]
