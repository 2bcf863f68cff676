"""The SwiGLU feed-forward block (Shazeer 2020, "GLU Variants Improve Transformer")."""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrec.layers.linear import Dense
from jaxrec.typing import Activations


class MLP(nnx.Module):
  """``y = W_down (silu(W_gate x) ⊙ W_up x)``, no biases.

  Args:
    dim: model width ``D``.
    hidden: hidden width ``F``.
    init_std: standard deviation of the input projections.
    num_layers: depth of the model; the output projection starts at
      ``init_std / sqrt(2 num_layers)`` so the residual stream's variance does not grow with depth
      (GPT-2).
    dtype: compute dtype.
    param_dtype: parameter storage dtype.
    rngs: the ``params`` stream.
  """

  def __init__(
    self,
    dim: int,
    hidden: int,
    *,
    init_std: float = 0.02,
    num_layers: int = 1,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate = Dense(dim, hidden, ("embed", "mlp"), std=init_std, **kw)
    self.up = Dense(dim, hidden, ("embed", "mlp"), std=init_std, **kw)
    out_std = init_std / math.sqrt(2 * num_layers)
    self.down = Dense(hidden, dim, ("mlp", "embed"), std=out_std, **kw)

  def __call__(self, x: Activations) -> Activations:
    """``x [..., D] -> [..., D]``."""
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
