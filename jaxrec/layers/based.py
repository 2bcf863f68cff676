"""Based linear attention and prefix linear attention (JRT-RNN) as token mixers.

Both project the input to per-head queries and keys of ``feature_dim`` channels (expanded by the
Taylor feature map to ``1 + F + F²``) and values of ``head_dim`` channels, run the op of
``jaxrec.ops.based`` and project back: ``y = W_o attn(W_q x, W_k x, W_v x)`` (Based, Arora et al.
2024, without an output norm or gate, as its release).

``PrefixLinearAttention`` adds encoder projections ``W_ke, W_ve`` that read the first
``prefix_len`` tokens of every document non-causally (JRT-RNN, "Just read twice", eq. 3). A cached
call starting at position 0 (the prefill) takes its documents' prefixes; later calls, decoding
included, continue from the prefix state as plain Based, with O(1) memory per token. A prefill
shorter than ``prefix_len`` is all prefix, which is what JRT's left-padding of the prompt to the
prefix length with masked padding computes.

Recurrent state: ``[B, H, 1 + F + F², head_dim + 1]`` fp32 (numerator and normalizer).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrec.layers import _checks
from jaxrec.layers.linear import Dense
from jaxrec.ops import based as based_ops
from jaxrec.typing import Activations, MatrixState, SegmentIds


class BasedCache(NamedTuple):
  """Based's recurrent state ``[B, H, 1 + F + F², V + 1]`` fp32: O(1) in the sequence length."""

  state: MatrixState


class PLACache(NamedTuple):
  """Prefix linear attention's decoding state.

  Attributes:
    state: ``[B, H, 1 + F + F², V + 1]`` fp32, decoder and encoder sums together.
    index: int32 scalar, the tokens seen so far; the prefix is read by the call that starts at 0.
  """

  state: MatrixState
  index: jax.Array


class BasedLinearAttention(nnx.Module):
  """Based: normalized causal linear attention with the 2nd-order Taylor feature map.

  Args:
    d_model: width ``D`` of the input and output.
    num_heads: heads ``H``.
    feature_dim: query/key width ``F`` per head before the feature map (16 in Based and JRT).
    head_dim: value width per head; ``None`` means ``d_model // num_heads``.
    eps: added to the normalizer.
    chunk_size: chunk length of the recurrence's chunkwise form.
    init_std: standard deviation of the input projections.
    num_layers: depth of the model; the output projection starts at
      ``init_std / sqrt(2 num_layers)`` (as ``MLP``).
    dtype: compute dtype; the output comes back in it. The feature maps and sums are fp32.
    param_dtype: parameter storage dtype.
    rngs: the ``params`` stream.
  """

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    *,
    feature_dim: int = 16,
    head_dim: int | None = None,
    eps: float = 1e-12,
    chunk_size: int = 64,
    init_std: float = 0.02,
    num_layers: int = 1,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    dtype, param_dtype = _checks.check_mixer_args(
      d_model, num_heads, init_std, num_layers, dtype, param_dtype
    )
    _checks.check_positive_int("feature_dim", feature_dim)
    if head_dim is None and d_model % num_heads:
      raise ValueError(
        f"num_heads: expected a divisor of d_model={d_model} (head_dim=None), got {num_heads}"
      )
    head_dim = d_model // num_heads if head_dim is None else head_dim
    _checks.check_positive_int("head_dim", head_dim)
    _checks.check_positive("eps", eps, allow_zero=True)
    _checks.check_positive_int("chunk_size", chunk_size)
    h = num_heads
    self.num_heads, self.feature_dim, self.head_dim = h, feature_dim, head_dim
    self.eps, self.chunk_size = eps, chunk_size
    kw = dict(std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    names = ("embed", "heads", "head_dim")
    self.q_proj = Dense(d_model, (h, feature_dim), names, **kw)
    self.k_proj = Dense(d_model, (h, feature_dim), names, **kw)
    self.v_proj = Dense(d_model, (h, head_dim), names, **kw)
    self.o_proj = Dense(
      (h, head_dim),
      d_model,
      ("heads", "head_dim", "embed"),
      **kw | dict(std=init_std / math.sqrt(2 * num_layers)),
    )

  def __call__(
    self,
    x: Activations,
    *,
    segment_ids: SegmentIds | None = None,
    cache: BasedCache | None = None,
  ) -> tuple[Activations, BasedCache | None]:
    """Mixes ``x [B, T, D]``; a cache is the state before ``x`` and comes back advanced."""
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    if cache is not None and x.shape[1] == 1:
      # Decoding: one step of the recurrence; a single token never crosses a segment boundary.
      o, state = based_ops.based_attention_step(
        q[:, 0], k[:, 0], v[:, 0], cache.state, eps=self.eps
      )
      return self.o_proj(o[:, None]), BasedCache(state)
    o, state = based_ops.based_attention(
      q,
      k,
      v,
      initial_state=None if cache is None else cache.state,
      output_final_state=cache is not None,
      segment_ids=segment_ids,
      eps=self.eps,
      chunk_size=self.chunk_size,
    )
    return self.o_proj(o), None if cache is None else BasedCache(state)

  def init_cache(self, batch_size: int, max_length: int, dtype: jnp.dtype) -> BasedCache:
    """A zero state; ``max_length`` and ``dtype`` do not matter, the state is always fp32."""
    del max_length, dtype
    return BasedCache(jnp.zeros(self._state_shape(batch_size), jnp.float32))

  def _state_shape(self, batch_size: int) -> tuple[int, ...]:
    width = based_ops.feature_width(self.feature_dim)
    return (batch_size, self.num_heads, width, self.head_dim + 1)


class PrefixLinearAttention(BasedLinearAttention):
  """Prefix linear attention (JRT-RNN): Based plus an encoder over each document's prefix.

  Args:
    d_model: width ``D`` of the input and output.
    num_heads: heads ``H``.
    prefix_len: ``M``, the tokens of each document the encoder reads (1024 in JRT-RNN); ``0``
      makes the layer Based with unused encoder projections.
    feature_dim, head_dim, eps, chunk_size, init_std, num_layers, dtype, param_dtype, rngs: as
      ``BasedLinearAttention``'s; the encoder projections are initialized like ``W_k``, ``W_v``.
  """

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    *,
    prefix_len: int = 1024,
    feature_dim: int = 16,
    head_dim: int | None = None,
    eps: float = 1e-12,
    chunk_size: int = 64,
    init_std: float = 0.02,
    num_layers: int = 1,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    super().__init__(
      d_model,
      num_heads,
      feature_dim=feature_dim,
      head_dim=head_dim,
      eps=eps,
      chunk_size=chunk_size,
      init_std=init_std,
      num_layers=num_layers,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 0:
      raise ValueError(f"prefix_len: expected an int >= 0, got {prefix_len!r}")
    self.prefix_len = prefix_len
    kw = dict(std=init_std, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype), rngs=rngs)
    names = ("embed", "heads", "head_dim")
    self.k_enc_proj = Dense(d_model, (num_heads, feature_dim), names, **kw)
    self.v_enc_proj = Dense(d_model, (num_heads, self.head_dim), names, **kw)

  def __call__(
    self,
    x: Activations,
    *,
    segment_ids: SegmentIds | None = None,
    cache: PLACache | None = None,
  ) -> tuple[Activations, PLACache | None]:
    """Mixes ``x [B, T, D]``; with a cache, only a call at position 0 reads the prefix."""
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    k_enc, v_enc = self.k_enc_proj(x), self.v_enc_proj(x)
    t = x.shape[1]
    if cache is None:
      o, _ = based_ops.prefix_linear_attention(
        q,
        k,
        v,
        k_enc,
        v_enc,
        prefix_len=self.prefix_len,
        segment_ids=segment_ids,
        eps=self.eps,
        chunk_size=self.chunk_size,
      )
      return self.o_proj(o), None
    continues = cache.index > 0
    if t == 1:
      o, state = based_ops.prefix_linear_attention_step(
        q[:, 0],
        k[:, 0],
        v[:, 0],
        k_enc[:, 0],
        v_enc[:, 0],
        cache.state,
        in_prefix=~continues & (self.prefix_len > 0),
        eps=self.eps,
      )
      o = o[:, None]
    else:
      o, state = based_ops.prefix_linear_attention(
        q,
        k,
        v,
        k_enc,
        v_enc,
        prefix_len=self.prefix_len,
        continues=continues,
        initial_state=cache.state,
        output_final_state=True,
        segment_ids=segment_ids,
        eps=self.eps,
        chunk_size=self.chunk_size,
      )
    return self.o_proj(o), PLACache(state, cache.index + t)

  def init_cache(self, batch_size: int, max_length: int, dtype: jnp.dtype) -> PLACache:
    """A zero state at position 0; ``max_length`` and ``dtype`` do not matter."""
    del max_length, dtype
    state = jnp.zeros(self._state_shape(batch_size), jnp.float32)
    return PLACache(state, jnp.zeros((), jnp.int32))
