"""Flax NNX layers: token mixers, the SwiGLU MLP, norms, dense projections.

Every layer takes plain constructor arguments (sizes, options, dtypes, ``rngs``) and works on its
own; ``jaxrec.models`` maps mixer names to these modules and builds them from an ``LMConfig``. A
token mixer has::

  __call__(x [B, T, D], *, segment_ids=None, cache=None) -> (y [B, T, D], cache)
  init_cache(batch_size, max_length, dtype) -> cache

``cache`` is a pytree (the mixer's decoding state); ``None`` in means no state is kept and
``None`` comes back. Decoding is the same call with ``T = 1``. Shapes are annotated with the
aliases of ``jaxrec.typing``. ``logical_param`` is the parameter constructor every layer (and the
model's embedding) uses: it names each axis for the sharding rules. What a layer observes (MoE
routing, Newton iterations) it reports with ``observe.sow``, for whoever runs the model under
``nnx.capture``.
"""

from jaxrec.layers._params import logical_param
from jaxrec.layers.attention import Attention, KVCache
from jaxrec.layers.baseconv import BaseConv, BaseConvCache
from jaxrec.layers.based import BasedCache, BasedLinearAttention, PLACache, PrefixLinearAttention
from jaxrec.layers.gla import GatedLinearAttention, GLACache
from jaxrec.layers.liger import LigerAttention, LigerCache
from jaxrec.layers.linear import Dense
from jaxrec.layers.mlp import MLP
from jaxrec.layers.mlstm import MLSTM, soft_cap
from jaxrec.layers.moe import (
  GRURouterCell,
  MoE,
  RoutingStats,
  load_balancing_loss,
  pooled_routing_statistics,
  routing_mutual_information,
)
from jaxrec.layers.norms import LayerNorm, RMSNorm
from jaxrec.layers.pararnn import ParaGRU, ParaLSTM, ParaRNNCache
from jaxrec.layers.rat import RAT, RATCache
from jaxrec.layers.rope import apply_rope, rope_frequencies

__all__ = [
  "MLP",
  "MLSTM",
  "RAT",
  "Attention",
  "BaseConv",
  "BaseConvCache",
  "BasedCache",
  "BasedLinearAttention",
  "Dense",
  "GLACache",
  "GRURouterCell",
  "GatedLinearAttention",
  "KVCache",
  "LayerNorm",
  "LigerAttention",
  "LigerCache",
  "MoE",
  "PLACache",
  "ParaGRU",
  "ParaLSTM",
  "ParaRNNCache",
  "PrefixLinearAttention",
  "RATCache",
  "RMSNorm",
  "RoutingStats",
  "apply_rope",
  "load_balancing_loss",
  "logical_param",
  "pooled_routing_statistics",
  "rope_frequencies",
  "routing_mutual_information",
  "soft_cap",
]
