"""The mLSTM layer of xLSTM 7B (Beck et al. 2025, "xLSTM 7B: A Recurrent LLM for Fast and
Efficient Inference", §3; ``xlstm.xlstm_large.model.mLSTMLayer``), as a token mixer."""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrec.layers import _checks
from jaxrec.layers._params import logical_param
from jaxrec.layers.linear import Dense
from jaxrec.layers.norms import LayerNorm
from jaxrec.ops.mlstm import MLSTMState, mlstm, mlstm_step
from jaxrec.typing import Activations, SegmentIds


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
  """``cap · tanh(x / cap)`` (Gemma 2's soft-capping); ``x`` unchanged when ``cap`` is None."""
  return x if cap is None else cap * jnp.tanh(x / cap)


class MLSTM(nnx.Module):
  """xLSTM 7B's mLSTM layer::

    q, k, v = W_q x, W_k x, W_v x                       (per head: K = qk_dim_factor · D / H,
    ĩ = cap(W_i x + b_i), f̃ = cap(W_f x + b_f)            V = v_dim_factor · D / H)
    h = mlstm(q, k, v, ĩ, f̃)                           (jaxrec.ops.mlstm)
    y = W_out (σ(W_o x) ⊙ LayerNorm_per_head(h))

  with one input and one forget gate per head, soft-capped (``cap``) and computed in fp32.
  Initialized as published: the gate projections at zero, the input-gate bias at
  ``igate_bias_init`` (-10: the memory starts nearly closed to input) and the forget-gate biases
  spread over ``linspace(3, 6, H)`` (``σ`` of 0.95 to 0.998: long memories).

  Args:
    d_model: width ``D`` of the input and output.
    num_heads: heads ``H``.
    qk_dim_factor: query/key width (all heads) as a multiple of ``d_model``.
    v_dim_factor: value width (all heads) as a multiple of ``d_model``.
    gate_soft_cap: soft cap of the gate pre-activations; ``None`` for none.
    igate_bias_init: initial input-gate bias.
    chunk_size: chunk length of the chunkwise form.
    eps: ``ε`` of the mLSTM's denominator.
    norm_eps: epsilon of the per-head LayerNorm.
    init_std: standard deviation of the query, key and value projections.
    num_layers: depth of the model; the output projection starts at
      ``init_std / sqrt(2 num_layers)`` (as ``MLP``).
    dtype: compute dtype; the output comes back in it. The gates are always fp32.
    param_dtype: parameter storage dtype.
    rngs: the ``params`` stream.
  """

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    *,
    qk_dim_factor: float = 0.5,
    v_dim_factor: float = 1.0,
    gate_soft_cap: float | None = 15.0,
    igate_bias_init: float = -10.0,
    chunk_size: int = 64,
    eps: float = 1e-6,
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
    key_dim = _checks.head_width("qk_dim_factor", qk_dim_factor, d, h)
    value_dim = _checks.head_width("v_dim_factor", v_dim_factor, d, h)
    if gate_soft_cap is not None:
      _checks.check_positive("gate_soft_cap", gate_soft_cap)
    _checks.check_positive_int("chunk_size", chunk_size)
    _checks.check_positive("eps", eps, allow_zero=True)
    _checks.check_positive("norm_eps", norm_eps, allow_zero=True)
    self.num_heads, self.key_dim, self.value_dim = h, key_dim, value_dim
    self.gate_soft_cap = gate_soft_cap
    self.chunk_size = chunk_size
    self.eps = eps
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    heads = ("embed", "heads", "head_dim")
    self.q_proj = Dense(d, (h, key_dim), heads, std=init_std, **kw)
    self.k_proj = Dense(d, (h, key_dim), heads, std=init_std, **kw)
    self.v_proj = Dense(d, (h, value_dim), heads, std=init_std, **kw)
    self.o_gate = Dense(d, (h, value_dim), heads, std=0.0, **kw)
    fp32 = kw | dict(dtype=jnp.float32)
    self.i_gate = Dense(d, h, ("embed", "heads"), std=0.0, **fp32)
    self.f_gate = Dense(d, h, ("embed", "heads"), std=0.0, **fp32)
    # Gate biases set the memory's time scales: never weight-decayed.
    self.i_bias = logical_param(
      lambda key, shape, dt: jnp.full(shape, igate_bias_init, dt),
      rngs.params(),
      (h,),
      param_dtype,
      ("heads",),
      weight_decay=False,
    )
    self.f_bias = logical_param(
      lambda key, shape, dt: jnp.linspace(3.0, 6.0, shape[0], dtype=dt),
      rngs.params(),
      (h,),
      param_dtype,
      ("heads",),
      weight_decay=False,
    )
    self.out_norm = LayerNorm(
      (h, value_dim),
      names=("heads", "head_dim"),
      eps=norm_eps,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    out_std = init_std / math.sqrt(2 * num_layers)
    self.out_proj = Dense((h, value_dim), d, ("heads", "head_dim", "embed"), std=out_std, **kw)

  def __call__(
    self,
    x: Activations,
    *,
    segment_ids: SegmentIds | None = None,
    cache: MLSTMState | None = None,
  ) -> tuple[Activations, MLSTMState | None]:
    """Mixes ``x [B, T, D]``; a cache is the state before ``x`` and comes back advanced."""
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    i_gate = soft_cap(self.i_gate(x) + self.i_bias[...].astype(jnp.float32), self.gate_soft_cap)
    f_gate = soft_cap(self.f_gate(x) + self.f_bias[...].astype(jnp.float32), self.gate_soft_cap)
    options = dict(eps=self.eps, chunk_size=self.chunk_size, segment_ids=segment_ids)
    if cache is None:
      h, _ = mlstm(q, k, v, i_gate, f_gate, **options)
    elif x.shape[1] == 1:
      # Decoding: one step of the recurrence; a single token never crosses a segment boundary.
      h, cache = mlstm_step(
        q[:, 0], k[:, 0], v[:, 0], i_gate[:, 0], f_gate[:, 0], cache, eps=self.eps
      )
      h = h[:, None]
    else:
      h, cache = mlstm(
        q, k, v, i_gate, f_gate, initial_state=cache, output_final_state=True, **options
      )
    h = jax.nn.sigmoid(self.o_gate(x)) * self.out_norm(h)
    return self.out_proj(h), cache

  def init_cache(self, batch_size: int, max_length: int, dtype: jnp.dtype) -> MLSTMState:
    """A zero state (``m = 0`` too); ``max_length`` and ``dtype`` do not matter, the state is
    always fp32 and O(1) in the sequence length."""
    del max_length, dtype
    b, h = batch_size, self.num_heads
    return MLSTMState(
      jnp.zeros((b, h, self.key_dim, self.value_dim), jnp.float32),
      jnp.zeros((b, h, self.key_dim), jnp.float32),
      jnp.zeros((b, h), jnp.float32),
    )
