"""Liger attention (Lan et al. 2025, "Liger: Linearizing Large Language Models to Gated Recurrent
Structures"): a pretrained attention layer's query, key, value and output weights reused as a
gated recurrent layer, with no new parameters.

From the layer's projections ``q [B, T, H, K]``, ``k, v [B, T, G, K]`` (before RoPE; ``k``, ``v``
and the gate repeated over the ``H / G`` query heads of each key/value head), per head::

  GLA   (variant "gla"):   φ(q) = softmax(q),  φ(k) = softmax(k),  log α_t = logsigmoid(k_t) / 16
  HGRN2 (variant "hgrn2"): φ(q) = softmax(q),  φ(k) = 1 - σ(k_t),  log α_t = logsigmoid(k_t)

  S_t = diag(α_t) S_{t-1} + φ(k_t) v_tᵀ        o^rec_t = S_tᵀ φ(q_t)

with the softmaxes over the head width, query scale 1 and no RoPE, in fp32
(``jaxrec.ops.gated_linear_attention``). The gate is the key projection pooled to the key width,
which is the identity, as in the reference code (its ``AdaptiveAvgPool1d`` maps a width onto
itself); ``gate_source="projection"`` takes it from a new, randomly initialized projection
``g_proj`` of the key's shape instead (the paper's ablation).

Liger Attention mixes the recurrence with sliding-window softmax attention on RoPE'd queries and
keys (scale ``K^-1/2``), half and half (the paper finds ``α + β = 1`` critical)::

  y = o_proj(½ o^rec + ½ o^swa)

and ``window=None`` keeps the recurrence alone, ``y = o_proj(o^rec)``; ``recurrence=False`` keeps
the window alone, ``y = o_proj(o^swa)`` (sliding-window attention: the ablation that measures what
the recurrence adds). ``window`` counts the keys
a query sees, its own included, as ``Attention``'s does; the reference code's flash-attention
window of 64 sees keys ``t - 64 .. t``.

Decoding keeps the recurrent state ``[B, H, K, V]`` and a ring buffer of the last ``window`` keys
and values: the same size at every context length. (The reference code keeps only the recurrent
state, so there its sliding-window branch sees the current token alone when generating; here
decoding equals the parallel forward.)
"""

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrec.layers import _checks
from jaxrec.layers.attention import Attention, KVCache, continue_segments
from jaxrec.layers.linear import Dense
from jaxrec.ops import attention as attention_ops
from jaxrec.ops import gla as gla_ops
from jaxrec.typing import Activations, MatrixState, SegmentIds

LigerVariant = Literal["gla", "hgrn2"]
LigerGateSource = Literal["key", "projection"]
VARIANTS = get_args(LigerVariant)
GATE_SOURCES = get_args(LigerGateSource)


class LigerCache(NamedTuple):
  """The decoding state of ``LigerAttention``: constant in the context length.

  Attributes:
    state: the recurrent state ``[B, H, K, V]``, fp32; ``None`` without the recurrence.
    window: the sliding-window branch's ring of the last ``window`` RoPE'd keys and values (an
      ``Attention`` ring ``KVCache``); ``None`` without a sliding window.
    index: int32 scalar, the number of tokens seen.
  """

  state: MatrixState
  window: KVCache | None
  index: jax.Array


class LigerAttention(Attention):
  """A linearized attention layer: ``Attention``'s parameters, a gated recurrence (see the module
  docstring) and, with a ``window``, sliding-window softmax attention.

  Args:
    d_model: width ``D`` of the input and output.
    num_heads: query heads ``H``.
    variant: ``"gla"`` or ``"hgrn2"``, the recurrence built from the key projection.
    window: keys seen by the sliding-window softmax branch (own included); ``None`` drops the
      branch.
    recurrence: ``False`` drops the recurrent branch (needs a ``window``).
    gate_source: ``"key"`` (Liger) or ``"projection"`` (a new random projection ``g_proj``).
    chunk_size: chunk length of the recurrence's chunkwise-parallel form.
    num_kv_heads, head_dim, rope_theta, rope_scaling, qkv_bias, init_std, num_layers, dtype,
      param_dtype, rngs: as ``Attention``'s.
  """

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    *,
    variant: LigerVariant = "gla",
    window: int | None = 64,
    recurrence: bool = True,
    gate_source: LigerGateSource = "key",
    chunk_size: int = 64,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    rope_theta: float = 10_000.0,
    rope_scaling: Mapping[str, Any] | None = None,
    qkv_bias: bool = False,
    init_std: float = 0.02,
    num_layers: int = 1,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    if variant not in VARIANTS:
      raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    if gate_source not in GATE_SOURCES:
      raise ValueError(f"gate_source: expected one of {GATE_SOURCES}, got {gate_source!r}")
    _checks.check_positive_int("chunk_size", chunk_size)
    if not isinstance(recurrence, bool) or (not recurrence and window is None):
      raise ValueError(
        f"recurrence: expected True, or False with a window (one branch at least), got "
        f"recurrence={recurrence!r} with window={window!r}"
      )
    super().__init__(
      d_model,
      num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      window=window,
      rope_theta=rope_theta,
      rope_scaling=rope_scaling,
      qkv_bias=qkv_bias,
      init_std=init_std,
      num_layers=num_layers,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.variant, self.gate_source, self.chunk_size = variant, gate_source, chunk_size
    self.recurrence = recurrence
    if gate_source == "projection":
      shape, names = (self.num_kv_heads, self.head_dim), ("embed", "kv_heads", "head_dim")
      self.g_proj = Dense(
        d_model, shape, names, std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs
      )

  def __call__(
    self,
    x: Activations,
    *,
    segment_ids: SegmentIds | None = None,
    cache: LigerCache | None = None,
  ) -> tuple[Activations, LigerCache | None]:
    """Mixes ``x [B, T, D]``; a cache holds the state before ``x`` and comes back advanced."""
    batch, t = x.shape[:2]
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    gate = self.g_proj(x) if self.gate_source == "projection" else k
    index = jnp.zeros((), jnp.int32) if cache is None else cache.index
    if cache is not None and self.window is not None:
      ring = cache.window
      last = jnp.take(ring.segment_ids, (index - 1) % ring.segment_ids.shape[1], axis=1)[:, None]
      segment_ids = continue_segments(last, segment_ids, (batch, t))
    o, state = None, None
    if self.recurrence:
      o, state = self._recurrent(q, k, v, gate, segment_ids, cache)
    if self.window is not None:
      positions = index + jnp.arange(t)
      q, k = self.rope(q, positions), self.rope(k, positions)
      if cache is None:
        swa = attention_ops.dot_product_attention(
          q, k, v, window=self.window, segment_ids=segment_ids, q_positions=positions
        )
      else:
        swa, ring = self.attend_cached(
          q, k, v, cache.window, positions=positions, segment_ids=segment_ids
        )
      o = swa if o is None else 0.5 * o + 0.5 * swa.astype(o.dtype)
    y = self.o_proj(o.astype(x.dtype))
    if cache is None:
      return y, None
    return y, LigerCache(state, ring if self.window is not None else None, index=index + t)

  def _recurrent(self, q, k, v, gate, segment_ids, cache):
    """``o^rec [B, T, H, K]`` in fp32 and the state after the last step (with a cache)."""
    group = self.num_heads // self.num_kv_heads
    f32 = jnp.float32
    q, k, v, gate = (a.astype(f32) for a in (q, k, v, gate))
    if self.variant == "gla":
      k, log_decay = jax.nn.softmax(k, axis=-1), jax.nn.log_sigmoid(gate) / 16.0
    else:
      k, log_decay = 1.0 - jax.nn.sigmoid(gate), jax.nn.log_sigmoid(gate)
    q = jax.nn.softmax(q, axis=-1)
    k, v, log_decay = (jnp.repeat(a, group, axis=2) for a in (k, v, log_decay))
    if cache is None:
      o, _ = gla_ops.gated_linear_attention(
        q, k, v, log_decay, segment_ids=segment_ids, scale=1.0, chunk_size=self.chunk_size
      )
      return o, None
    if q.shape[1] == 1:
      # Decoding: one step of the recurrence; a single token never crosses a segment boundary.
      o, state = gla_ops.gated_linear_attention_step(
        q[:, 0], k[:, 0], v[:, 0], log_decay[:, 0], cache.state, scale=1.0
      )
      return o[:, None], state
    return gla_ops.gated_linear_attention(
      q,
      k,
      v,
      log_decay,
      initial_state=cache.state,
      output_final_state=True,
      segment_ids=segment_ids,
      scale=1.0,
      chunk_size=self.chunk_size,
    )

  def init_cache(self, batch_size: int, max_length: int, dtype: jnp.dtype) -> LigerCache:
    """An empty cache; its size does not depend on ``max_length``. Keys and values in ``dtype``,
    the recurrent state in fp32."""
    del max_length
    h, d = self.num_heads, self.head_dim
    state = jnp.zeros((batch_size, h, d, d), jnp.float32) if self.recurrence else None
    index = jnp.zeros((), jnp.int32)
    if self.window is None:
      return LigerCache(state, None, index)
    return LigerCache(state, self.init_ring(batch_size, dtype), index)
