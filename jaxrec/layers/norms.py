"""RMSNorm (Zhang & Sennrich 2019), computed in fp32 whatever the compute dtype."""

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
