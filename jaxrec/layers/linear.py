"""Dense projections whose kernels keep head axes as separate, named axes."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrec.layers._params import logical_param


def _as_shape(dims: int | Sequence[int]) -> tuple[int, ...]:
  return (dims,) if isinstance(dims, int) else tuple(dims)


class Dense(nnx.Module):
  """``y = x · W (+ b)`` contracting the trailing ``len(in_shape)`` axes of ``x``.

  The kernel is ``[*in_shape, *out_shape]`` (e.g. ``[D, H, K]`` for a query projection), so each
  axis has its own logical name and heads shard cleanly.

  Args:
    in_shape: the trailing axes of ``x`` that are contracted.
    out_shape: the axes that replace them.
    names: logical axis names of the kernel, one per axis of ``[*in_shape, *out_shape]``.
    std: standard deviation of the normal kernel initializer.
    dtype: compute dtype; the output comes back in it.
    param_dtype: storage dtype of the parameters.
    use_bias: add a bias ``[*out_shape]`` (initialized to zero, named like the output axes).
    rngs: the ``params`` stream initializes the kernel.
  """

  def __init__(
    self,
    in_shape: int | Sequence[int],
    out_shape: int | Sequence[int],
    names: Sequence[str | None],
    *,
    std: float,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    use_bias: bool = False,
    rngs: nnx.Rngs,
  ):
    in_shape, out_shape = _as_shape(in_shape), _as_shape(out_shape)
    self.num_in = len(in_shape)
    self.dtype = dtype
    init = nnx.initializers.normal(std)
    self.kernel = logical_param(init, rngs.params(), (*in_shape, *out_shape), param_dtype, names)
    if use_bias:
      zeros = nnx.initializers.zeros_init()
      bias_names = tuple(names)[self.num_in :]
      self.bias = logical_param(zeros, rngs.params(), out_shape, param_dtype, bias_names)
    else:
      self.bias = None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.tensordot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), axes=self.num_in)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y
