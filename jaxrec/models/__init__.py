"""The LM stack: configuration, model, presets."""

from jaxrec.models.config import LMConfig
from jaxrec.models.lm import LM, Block, BlockGroup, param_count_of
from jaxrec.models.presets import PRESETS, get_preset, param_count

__all__ = [
  "LM",
  "PRESETS",
  "Block",
  "BlockGroup",
  "LMConfig",
  "get_preset",
  "param_count",
  "param_count_of",
]
