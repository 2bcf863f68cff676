"""RMSNorm, SwiGLU MLP, RoPE and Dense against numpy references; logical axis and weight-decay
metadata. Tolerances: testing_utils' error model, per element."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from testing_utils import assert_close, rounding_atol

from jaxrec import layers
from jaxrec.layers import logical_param


def _rng(seed=0):
  return np.random.default_rng(seed)


def test_rms_norm_matches_numpy_and_keeps_bf16():
  norm = layers.RMSNorm(6, eps=1e-5, rngs=nnx.Rngs(0))
  norm.scale[...] = _rng().standard_normal(6).astype(np.float32)
  x = _rng(1).standard_normal((2, 3, 6)).astype(np.float32)
  scale = np.asarray(norm.scale[...])
  want = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-5) * scale
  f = jax.jit(lambda m, x: m(x))
  # A mean of 6 positive squares, then rsqrt, the product and the scale: relative to |y|.
  atol = rounding_atol(np.abs(want), terms=6 + 4)
  assert_close(f(norm, x), want, rtol=0, atol=atol)
  got_bf16 = f(norm, x.astype(jnp.bfloat16))
  assert got_bf16.dtype == jnp.bfloat16
  # Normalized in fp32 from bf16 inputs: the rounding of x and (at most as much) of its rms, and
  # of the output.
  bf16 = rounding_atol(np.abs(want), terms=3, dtype=jnp.bfloat16)
  assert_close(got_bf16.astype(np.float32), want, rtol=0, atol=atol + bf16)


def test_swiglu_mlp_matches_numpy():
  mlp = layers.MLP(4, 8, init_std=0.5, rngs=nnx.Rngs(0))
  x = _rng(2).standard_normal((2, 3, 4)).astype(np.float32)
  gate, up, down = (np.asarray(d.kernel[...]) for d in (mlp.gate, mlp.up, mlp.down))
  a, b = x @ gate, x @ up
  silu = a / (1 + np.exp(-a))
  want = (silu * b) @ down
  # Each factor's error carried into the product (|silu'| <= 1.1), then the down projection:
  # the gate's and up's 4-long dots, silu's few roundings, the product and the 8-long dot.
  factors = 1.1 * (np.abs(x) @ np.abs(gate)) * np.abs(b) + np.abs(silu) * (np.abs(x) @ np.abs(up))
  magnitude = factors @ np.abs(down)
  atol = rounding_atol(magnitude, terms=4 + 3 + 1 + 8)
  assert_close(jax.jit(lambda m, x: m(x))(mlp, x), want, rtol=0, atol=atol)


def test_dense_contracts_trailing_axes_with_bias():
  dense = layers.Dense(
    (2, 3), 5, ("heads", "head_dim", "embed"), std=1.0, use_bias=True, rngs=nnx.Rngs(0)
  )
  dense.bias[...] = np.arange(5, dtype=np.float32)
  x = _rng(3).standard_normal((4, 2, 3)).astype(np.float32)
  kernel = np.asarray(dense.kernel[...]).reshape(6, 5)
  want = x.reshape(4, 6) @ kernel + np.arange(5)
  magnitude = np.abs(x.reshape(4, 6)) @ np.abs(kernel) + np.arange(5)
  assert_close(dense(x), want, rtol=0, atol=rounding_atol(magnitude, terms=6 + 1))
  assert dense.kernel.get_metadata()["out_sharding"] == ("heads", "head_dim", "embed")
  assert dense.bias.get_metadata()["out_sharding"] == ("embed",)


def test_dense_rejects_wrong_number_of_axis_names():
  with pytest.raises(ValueError, match="names: expected 3 axis names"):
    layers.Dense(2, (3, 4), ("embed", "heads"), std=1.0, rngs=nnx.Rngs(0))


def _rope_atol(x, pos):
  """The fp32 rotation's error per element: the angle ``pos · freq`` off by a few roundings
  relative to itself (the frequency's power, the product), which moves cos and sin by that much
  absolutely, plus their own and the rotation's roundings: ``(|x1| + |x2|)(1 + |angle|)``."""
  angle = np.abs(pos[:, None, None] * 100.0 ** (-np.arange(4) / 4))
  pair = np.abs(x[..., :4]) + np.abs(x[..., 4:])
  return rounding_atol(np.concatenate([pair * (1 + angle)] * 2, -1), terms=4)


def test_rope_matches_numpy_rotation_and_is_relative():
  x = _rng(4).standard_normal((1, 5, 2, 8)).astype(np.float32)
  pos = np.arange(5)
  got = np.asarray(layers.apply_rope(x, pos, theta=100.0))
  freq = 100.0 ** (-np.arange(4) / 4)
  angle = pos[:, None, None] * freq
  x1, x2 = x[..., :4], x[..., 4:]
  want = np.concatenate(
    [x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1
  )
  assert_close(got, want, rtol=0, atol=_rope_atol(x, pos))
  # q·k depends only on the distance: shifting every position leaves the scores unchanged. Each
  # side: the rotations' errors through the 8-long dot, and its own rounding.
  shifted = np.asarray(layers.apply_rope(x, pos + 7, theta=100.0))
  scores = np.einsum("bthd,bshd->bhts", got, got)
  atol = 0.0
  for rotated, error in ((got, _rope_atol(x, pos)), (shifted, _rope_atol(x, pos + 7))):
    size = np.abs(rotated)
    atol = atol + 2 * np.einsum("bthd,bshd->bhts", size, error)
    atol = atol + rounding_atol(np.einsum("bthd,bshd->bhts", size, size), terms=8)
  assert_close(np.einsum("bthd,bshd->bhts", shifted, shifted), scores, rtol=0, atol=atol)


def test_logical_param_records_weight_decay_only_when_given():
  init, key = nnx.initializers.zeros_init(), jax.random.key(0)
  kept = logical_param(init, key, (2, 3), jnp.float32, ("embed", "mlp"), weight_decay=False)
  assert kept.get_metadata()["weight_decay"] is False
  assert kept.get_metadata()["out_sharding"] == ("embed", "mlp")
  assert "weight_decay" not in logical_param(init, key, (2,), jnp.float32, ("norm",)).get_metadata()
  with pytest.raises(ValueError, match="weight_decay: expected True, False or None, got 1"):
    logical_param(init, key, (2,), jnp.float32, ("norm",), weight_decay=1)
