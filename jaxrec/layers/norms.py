"""RMSNorm (Zhang & Sennrich 2019) and LayerNorm without bias, computed in fp32 whatever the
compute dtype."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrec.layers._params import logical_param


class RMSNorm(nnx.Module):
  """``y = x / sqrt(mean(x², -1) + eps) · scale`` over the last axis.

  Args:
    dim: size of the normalized (last) axis.
    eps: added to the mean square.
    dtype: output dtype; ``None`` keeps the input dtype.
    param_dtype: storage dtype of ``scale``.
    rngs: unused by the ones initializer, taken for a uniform constructor signature.
  """

  def __init__(
    self,
    dim: int,
    *,
    eps: float = 1e-6,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.eps = eps
    self.dtype = dtype
    self.scale = logical_param(
      nnx.initializers.ones_init(), rngs.params(), (dim,), param_dtype, ("norm",)
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    # The mean square of bf16 activations loses too much precision; normalize in fp32.
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(y.dtype)).astype(dtype)


class LayerNorm(nnx.Module):
  """``y = (x - mean(x)) / sqrt(var(x) + eps) · scale`` over the last axis, no bias.

  ``scale`` may span more axes than the normalized one: a ``[H, V]`` scale on ``[..., H, V]``
  inputs normalizes every head separately (xLSTM's multi-head LayerNorm).

  Args:
    shape: shape of ``scale``, the trailing axes of the input (the last is normalized).
    names: logical axis names of ``scale``.
    eps: added to the variance.
    dtype: output dtype; ``None`` keeps the input dtype.
    param_dtype: storage dtype of ``scale``.
    rngs: unused by the ones initializer, taken for a uniform constructor signature.
  """

  def __init__(
    self,
    shape: int | tuple[int, ...],
    *,
    names: tuple[str, ...] = ("norm",),
    eps: float = 1e-6,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    self.eps = eps
    self.dtype = dtype
    self.scale = logical_param(
      nnx.initializers.ones_init(), rngs.params(), shape, param_dtype, names
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    centered = x - jnp.mean(x, axis=-1, keepdims=True)
    y = centered * jax.lax.rsqrt(jnp.mean(jnp.square(centered), axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(y.dtype)).astype(dtype)
