"""BaseConv: the gated short convolution that Based pairs with its linear attention.

``y = conv(x) ⊙ (W x + b)`` with ``conv`` a causal depthwise convolution of ``kernel_size`` taps
(3 in Based and JRT-RNN) plus a bias (Zoology's ``BaseConv`` with a short kernel). Zoology's block
adds ``+ x`` itself; here the ``Block``'s residual stream already does, so the mixer returns the
gated convolution alone.

Packed documents: a tap reaching into an earlier document reads zero, so a packed row equals its
documents run separately. Decoding keeps the last ``kernel_size - 1`` inputs of the current
document (zeros before its start): O(1) memory per token.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrec.layers import _checks
from jaxrec.layers._params import logical_param
from jaxrec.layers.linear import Dense
from jaxrec.ops import segment_starts
from jaxrec.typing import Activations, SegmentIds


def _uniform(limit: float):
  def init(key, shape, dtype):
    return jax.random.uniform(key, shape, dtype, -limit, limit)

  return init


class BaseConvCache(NamedTuple):
  """The last ``kernel_size - 1`` inputs ``[B, kernel_size - 1, D]`` of the current document,
  oldest first, in the compute dtype (zeros where the document had not begun)."""

  window: jax.Array


class BaseConv(nnx.Module):
  """Gated short causal convolution.

  Args:
    d_model: width ``D`` of the input and output.
    kernel_size: taps of the depthwise causal convolution (the current token and
      ``kernel_size - 1`` before it).
    init_std: standard deviation of the gate projection ``W``, scaled by
      ``1 / sqrt(2 num_layers)`` (it sets the mixer's output scale, as an output projection).
    num_layers: depth of the model.
    dtype: compute dtype; the output comes back in it.
    param_dtype: parameter storage dtype.
    rngs: the ``params`` stream.
  """

  def __init__(
    self,
    d_model: int,
    *,
    kernel_size: int = 3,
    init_std: float = 0.02,
    num_layers: int = 1,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    dtype, param_dtype = _checks.check_mixer_args(
      d_model, 1, init_std, num_layers, dtype, param_dtype
    )
    _checks.check_positive_int("kernel_size", kernel_size)
    self.kernel_size, self.dtype = kernel_size, dtype
    # PyTorch's Conv1d default for a depthwise kernel: uniform in ±1/sqrt(fan-in = kernel_size).
    uniform = _uniform(kernel_size**-0.5)
    self.conv_kernel = logical_param(
      uniform, rngs.params(), (kernel_size, d_model), param_dtype, ("taps", "embed")
    )
    self.conv_bias = logical_param(
      uniform, rngs.params(), (d_model,), param_dtype, ("embed",), weight_decay=False
    )
    self.gate = Dense(
      d_model,
      d_model,
      # A d -> d projection: its output axis is named like an MLP's hidden one ("embed" twice
      # would shard both axes on the same mesh axis).
      ("embed", "mlp"),
      std=init_std / math.sqrt(2 * num_layers),
      dtype=dtype,
      param_dtype=param_dtype,
      use_bias=True,
      rngs=rngs,
    )

  def __call__(
    self,
    x: Activations,
    *,
    segment_ids: SegmentIds | None = None,
    cache: BaseConvCache | None = None,
  ) -> tuple[Activations, BaseConvCache | None]:
    """Mixes ``x [B, T, D]``; a cache holds the inputs before ``x`` and comes back advanced."""
    batch, t, d = x.shape
    x = x.astype(self.dtype)
    width = self.kernel_size - 1
    past = jnp.zeros((batch, width, d), x.dtype) if cache is None else cache.window
    padded = jnp.concatenate([past.astype(x.dtype), x], axis=1)  # [B, width + T, D]
    # Document number of every padded step: the cached window continues document 0.
    starts = jnp.zeros((batch, t), bool) if segment_ids is None else segment_starts(segment_ids)
    doc = jnp.pad(jnp.cumsum(starts, axis=1), ((0, 0), (width, 0)))
    kernel = self.conv_kernel[...].astype(x.dtype)
    conv = self.conv_bias[...].astype(x.dtype)
    for tap in range(self.kernel_size):  # tap 0 is the current token, tap j the token j before
      lo = width - tap
      same_doc = doc[:, lo : lo + t] == doc[:, width:]
      conv = conv + jnp.where(same_doc[..., None], padded[:, lo : lo + t], 0) * kernel[tap]
    y = conv * self.gate(x)
    if cache is None:
      return y, None
    window = padded[:, t:]  # the last `width` inputs
    last = doc[:, t:] == doc[:, -1:]
    return y, BaseConvCache(jnp.where(last[..., None], window, 0).astype(past.dtype))

  def init_cache(self, batch_size: int, max_length: int, dtype: jnp.dtype) -> BaseConvCache:
    """A zero window of ``kernel_size - 1`` inputs in ``dtype``; ``max_length`` does not matter."""
    del max_length
    d = self.gate.kernel.shape[0]
    return BaseConvCache(jnp.zeros((batch_size, self.kernel_size - 1, d), dtype))
