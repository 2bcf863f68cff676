"""The RAT token mixer (arXiv 2507.04416): recurrence inside chunks, attention across them.

One projection per stream: the output gate ``z = σ(W_z x)``, values ``v``, the forget gate
``g = σ(W_g x + b_g)``, and queries and keys in ``qk_groups`` groups tiled across the heads (two
in the paper). ``y = W_o (z ⊙ rat(q, k, v, g))`` with ``jaxrec.ops.rat`` (equations there); the
model's block supplies the pre-norm and the residual.

The gate bias starts "chrono" (``b_g = log U(1, L - 1)``) so each channel's memory spans a
random fraction of the chunk, and is never weight-decayed (it sets time scales).
"""

import math
from typing import Literal, get_args

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrec.layers import _checks
from jaxrec.layers._params import logical_param
from jaxrec.layers.linear import Dense
from jaxrec.ops.rat import RATState, rat, rat_init_state
from jaxrec.typing import Activations, SegmentIds

RATPosition = Literal["inter_rope", "nope"]
POSITIONS = get_args(RATPosition)
RATCache = RATState


class RAT(nnx.Module):
  """RAT mixer.

  Args:
    d_model: width ``D`` of the input and output.
    num_heads: heads ``H``; each of width ``D / H`` (even under InterRoPE).
    chunk_size: ``L``; 1 is attention, ``max_seq_len`` the gated RNN.
    qk_groups: query/key groups tiled across the heads, a divisor of ``num_heads``.
    position: ``"inter_rope"`` (RoPE at chunk indices) or ``"nope"``.
    rope_theta: RoPE base wavelength.
    init_std: standard deviation of the input projections.
    num_layers: depth of the model; the output projection starts at
      ``init_std / sqrt(2 num_layers)``.
    dtype: compute dtype; states and the softmax are fp32.
    param_dtype: parameter storage dtype.
    rngs: the ``params`` stream.
  """

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    *,
    chunk_size: int = 16,
    qk_groups: int = 2,
    position: RATPosition = "inter_rope",
    rope_theta: float = 10_000.0,
    init_std: float = 0.02,
    num_layers: int = 1,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    dtype, param_dtype = _checks.check_mixer_args(
      d_model, num_heads, init_std, num_layers, dtype, param_dtype
    )
    _checks.check_positive_int("chunk_size", chunk_size)
    _checks.check_positive_int("qk_groups", qk_groups)
    if num_heads % qk_groups:
      raise ValueError(f"qk_groups: expected a divisor of num_heads={num_heads}, got {qk_groups}")
    if position not in POSITIONS:
      raise ValueError(f"position: expected one of {POSITIONS}, got {position!r}")
    if d_model % num_heads:
      raise ValueError(f"num_heads: expected a divisor of d_model={d_model}, got {num_heads}")
    width = d_model // num_heads
    if position == "inter_rope" and width % 2:
      raise ValueError(f"num_heads: InterRoPE needs an even head width, got {width}")
    _checks.check_positive("rope_theta", rope_theta)
    h, g, d, std = num_heads, qk_groups, d_model, init_std
    self.num_heads, self.head_dim, self.qk_groups = h, width, g
    self.chunk_size = chunk_size
    self.rope_theta = rope_theta if position == "inter_rope" else None
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    heads = ("embed", "heads", "head_dim")
    self.z_proj = Dense(d, (h, width), heads, std=std, **kw)
    self.v_proj = Dense(d, (h, width), heads, std=std, **kw)
    self.g_proj = Dense(d, (h, width), heads, std=std, **kw)
    self.q_proj = Dense(d, (g, width), ("embed", None, "head_dim"), std=std, **kw)
    self.k_proj = Dense(d, (g, width), ("embed", None, "head_dim"), std=std, **kw)
    high = max(chunk_size - 1, 1)

    def chrono(key, shape, dtype):
      return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, high)).astype(dtype)

    self.gate_bias = logical_param(
      chrono, rngs.params(), (h, width), param_dtype, ("heads", "head_dim"), weight_decay=False
    )
    out_std = std / math.sqrt(2 * num_layers)
    self.o_proj = Dense((h, width), d, ("heads", "head_dim", "embed"), std=out_std, **kw)

  def __call__(
    self,
    x: Activations,
    *,
    segment_ids: SegmentIds | None = None,
    cache: RATCache | None = None,
  ) -> tuple[Activations, RATCache | None]:
    """Mixes ``x [B, T, D]``; a cache is the state before ``x`` and comes back advanced."""
    tile = self.num_heads // self.qk_groups
    q = jnp.tile(self.q_proj(x), (1, 1, tile, 1))
    k = jnp.tile(self.k_proj(x), (1, 1, tile, 1))
    gate_logits = self.g_proj(x).astype(jnp.float32) + self.gate_bias[...].astype(jnp.float32)
    o, cache = rat(
      q,
      k,
      self.v_proj(x),
      jax.nn.sigmoid(gate_logits),
      chunk_size=self.chunk_size,
      rope_theta=self.rope_theta,
      initial_state=cache,
      output_final_state=cache is not None,
      segment_ids=segment_ids,
    )
    return self.o_proj(jax.nn.sigmoid(self.z_proj(x)) * o.astype(x.dtype)), cache

  def init_cache(self, batch_size: int, max_length: int, dtype: jnp.dtype) -> RATCache:
    """Room for ``ceil(max_length / chunk_size)`` chunk states; always fp32."""
    del dtype
    return rat_init_state(batch_size, max_length, self.num_heads, self.head_dim, self.chunk_size)
