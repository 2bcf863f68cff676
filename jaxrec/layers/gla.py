"""The gated linear attention block (Yang et al. 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training", §4.1), as a token mixer."""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrec.layers import _checks
from jaxrec.layers.linear import Dense
from jaxrec.layers.norms import RMSNorm
from jaxrec.ops import gla as gla_ops
from jaxrec.typing import Activations, MatrixState, SegmentIds


class GLACache(NamedTuple):
  """The recurrent state, ``[B, H, K, V]`` fp32: O(1) in the sequence length."""

  state: MatrixState


class GatedLinearAttention(nnx.Module):
  """GLA: ``S_t = diag(α_t) S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ q_t / sqrt(K)``, then
  ``y = W_o (RMSNorm(o) ⊙ swish(W_g x))`` with RMSNorm per head.

  The decay is low-rank and data dependent (paper eq. in §4.1):
  ``log α_t = logsigmoid(W_2 W_1 x_t + b) / τ``; ``τ = gate_normalizer`` (16) keeps ``α`` near 1
  at initialization so the state remembers far back.

  Args:
    d_model: width ``D`` of the input and output.
    num_heads: heads ``H``; the key width ``expand_k · D`` and the value width ``expand_v · D``
      are split over them.
    expand_k: key width as a multiple of ``d_model`` (0.5 in the GLA paper).
    expand_v: value width as a multiple of ``d_model``.
    gate_rank: rank ``r`` of the decay projection ``W_2 W_1``.
    gate_normalizer: ``τ`` in ``log α = logsigmoid(·) / τ``.
    chunk_size: chunk length of the chunkwise-parallel form (``jaxrec.ops.gated_linear_attention``).
    norm_eps: epsilon of the per-head output RMSNorm.
    init_std: standard deviation of the input projections.
    num_layers: depth of the model; the output projection starts at
      ``init_std / sqrt(2 num_layers)`` (as ``MLP``).
    dtype: compute dtype; the output comes back in it. The decay path is always fp32.
    param_dtype: parameter storage dtype.
    rngs: the ``params`` stream.
  """

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    *,
    expand_k: float = 0.5,
    expand_v: float = 1.0,
    gate_rank: int = 16,
    gate_normalizer: float = 16.0,
    chunk_size: int = 64,
    norm_eps: float = 1e-6,
    init_std: float = 0.02,
    num_layers: int = 1,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    dtype, param_dtype = _checks.check_mixer_args(
      d_model, num_heads, init_std, num_layers, dtype, param_dtype
    )
    d, h = d_model, num_heads
    key_dim = _checks.head_width("expand_k", expand_k, d, h)
    value_dim = _checks.head_width("expand_v", expand_v, d, h)
    _checks.check_positive_int("gate_rank", gate_rank)
    _checks.check_positive("gate_normalizer", gate_normalizer)
    _checks.check_positive_int("chunk_size", chunk_size)
    _checks.check_positive("norm_eps", norm_eps, allow_zero=True)
    self.num_heads, self.key_dim, self.value_dim = h, key_dim, value_dim
    self.gate_normalizer = gate_normalizer
    self.chunk_size = chunk_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    std = init_std
    self.q_proj = Dense(d, (h, key_dim), ("embed", "heads", "head_dim"), std=std, **kw)
    self.k_proj = Dense(d, (h, key_dim), ("embed", "heads", "head_dim"), std=std, **kw)
    self.v_proj = Dense(d, (h, value_dim), ("embed", "heads", "head_dim"), std=std, **kw)
    self.g_proj = Dense(d, (h, value_dim), ("embed", "heads", "head_dim"), std=std, **kw)
    r = gate_rank
    # The decay path is computed in fp32 (it is rank r, so cheap): log α is close to 0, and bf16
    # rounding of it would compound over the products of decays across many steps.
    fp32 = kw | dict(dtype=jnp.float32)
    self.decay_down = Dense(d, r, ("embed", "rank"), std=std, **fp32)
    self.decay_up = Dense(
      r, (h, key_dim), ("rank", "heads", "head_dim"), std=r**-0.5, use_bias=True, **fp32
    )
    self.out_norm = RMSNorm(
      value_dim, eps=norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    out_std = std / math.sqrt(2 * num_layers)
    self.o_proj = Dense((h, value_dim), d, ("heads", "head_dim", "embed"), std=out_std, **kw)

  def __call__(
    self,
    x: Activations,
    *,
    segment_ids: SegmentIds | None = None,
    cache: GLACache | None = None,
  ) -> tuple[Activations, GLACache | None]:
    """Mixes ``x [B, T, D]``; a cache is the state before ``x`` and comes back advanced."""
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    log_decay = jax.nn.log_sigmoid(self.decay_up(self.decay_down(x))) / self.gate_normalizer
    if cache is None:
      o, _ = gla_ops.gated_linear_attention(
        q, k, v, log_decay, segment_ids=segment_ids, chunk_size=self.chunk_size
      )
    elif x.shape[1] == 1:
      # Decoding: one step of the recurrence; a single token never crosses a segment boundary.
      o, state = gla_ops.gated_linear_attention_step(
        q[:, 0], k[:, 0], v[:, 0], log_decay[:, 0], cache.state
      )
      o, cache = o[:, None], GLACache(state)
    else:
      o, state = gla_ops.gated_linear_attention(
        q,
        k,
        v,
        log_decay,
        initial_state=cache.state,
        output_final_state=True,
        segment_ids=segment_ids,
        chunk_size=self.chunk_size,
      )
      cache = GLACache(state)
    o = self.out_norm(o) * jax.nn.silu(self.g_proj(x))
    return self.o_proj(o), cache

  def init_cache(self, batch_size: int, max_length: int, dtype: jnp.dtype) -> GLACache:
    """A zero state; ``max_length`` and ``dtype`` do not matter, the state is always fp32."""
    del max_length, dtype
    shape = (batch_size, self.num_heads, self.key_dim, self.value_dim)
    return GLACache(jnp.zeros(shape, jnp.float32))
