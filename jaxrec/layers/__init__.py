"""Flax NNX layers: token mixers (by name, see ``registry``), the SwiGLU MLP, norms."""

from jaxrec.layers.attention import Attention, KVCache
from jaxrec.layers.gla import GatedLinearAttention, GLACache
from jaxrec.layers.linear import Dense
from jaxrec.layers.mlp import MLP
from jaxrec.layers.norms import RMSNorm
from jaxrec.layers.pararnn import ParaGRU, ParaLSTM, ParaRNNCache
from jaxrec.layers.registry import MIXERS, get_mixer, register_mixer
from jaxrec.layers.rope import apply_rope

__all__ = [
  "MIXERS",
  "MLP",
  "Attention",
  "Dense",
  "GLACache",
  "GatedLinearAttention",
  "KVCache",
  "ParaGRU",
  "ParaLSTM",
  "ParaRNNCache",
  "RMSNorm",
  "apply_rope",
  "get_mixer",
  "register_mixer",
]
