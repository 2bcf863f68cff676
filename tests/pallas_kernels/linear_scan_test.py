"""Tests of the Pallas linear-scan kernel (interpret mode) against independent references: the
float64 numpy loop and the plain lax.scan of testing_utils.

Tolerances (testing_utils' error model): two roundings a step on the longest chain of the kernel
and of the sequential form, against per-element magnitudes of the scan over absolute values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_utils import (
  assert_close,
  lax_linear_scan,
  linear_scan_atol,
  linear_scan_gradient_magnitudes,
  numpy_linear_scan,
  rounding_atol,
)

from jaxrec import ops
from pallas_kernels.linear_scan import linear_scan

# (shape [B, T, ...], block_t): T=1; T not a multiple of the block (several time blocks, so the
# carry crosses blocks); D not a multiple of 128; more than 8 lane rows (two feature blocks);
# extra trailing axes; the default block with T > 128.
CASES = [
  pytest.param((2, 1, 7), 8, id="T1"),
  pytest.param((2, 37, 3, 5), 8, id="ragged_T_trailing_axes"),
  pytest.param((1, 19, 300), 4, id="ragged_D"),
  pytest.param((2, 12, 1100), 8, id="two_feature_blocks"),
  pytest.param((1, 300, 5), None, id="default_block"),
]


def _inputs(shape, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.uniform(0.5, 1.0, shape).astype(np.float32)
  b = rng.normal(size=shape).astype(np.float32)
  h0 = rng.normal(size=(shape[0], *shape[2:])).astype(np.float32)
  return a, b, h0


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize(("shape", "block_t"), CASES)
def test_matches_numpy_and_sequential(shape, block_t, reverse):
  a, b, h0 = _inputs(shape)
  h = linear_scan(a, b, h0, reverse=reverse, interpret=True, block_t=block_t)
  assert h.shape == shape and h.dtype == jnp.float32
  chain = 2 * shape[1] + 1
  atol = linear_scan_atol(a, b, h0, reverse, terms=chain)
  assert_close(h, numpy_linear_scan(a, b, h0, reverse), rtol=0, atol=atol)
  seq, _ = ops.linear_scan(a, b, initial_state=h0, reverse=reverse, method="sequential")
  assert_close(h, seq, rtol=0, atol=2 * atol)  # two computations


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize(("shape", "block_t"), [CASES[1], pytest.param((1, 1, 4), None, id="T1")])
def test_gradients_match_lax_scan(shape, block_t, reverse):
  a, b, h0 = _inputs(shape, seed=1)
  weights = np.random.default_rng(2).normal(size=shape).astype(np.float32)

  def loss(scan):
    # A weighted sum with a nonlinearity, so every dh_t is different.
    return lambda a, b, h0: jnp.sum(weights * jnp.tanh(scan(a, b, h0)))

  pallas = loss(
    lambda a, b, h0: linear_scan(a, b, h0, reverse=reverse, interpret=True, block_t=block_t)
  )
  reference = loss(lambda a, b, h0: lax_linear_scan(a, b, h0, reverse)[0])
  got = jax.jit(jax.grad(pallas, argnums=(0, 1, 2)))(a, b, h0)
  want = jax.grad(reference, argnums=(0, 1, 2))(a, b, h0)
  # |tanh'| <= 1: the gradient of Σ|w|·h at absolute inputs bounds the terms of each entry; the
  # forward error δh <= n·u·|h|_abs moves tanh'(h) by up to 2δh, so a forward pass adds the same
  # pulled back with weights 2·max|h|_abs. Two computations, each a forward and a backward scan.
  h_abs = numpy_linear_scan(np.abs(a), np.abs(b), np.abs(h0), reverse)
  magnitudes = linear_scan_gradient_magnitudes(a, b, h0, weights, 0.0 * h0, reverse)
  terms = 4 * (2 * shape[1] + 1)
  for name, g, w, m in zip(("da", "db", "dh0"), got, want, magnitudes, strict=True):
    atol = rounding_atol(m * (1 + 2 * np.max(h_abs)), terms=terms)
    assert_close(g, w, rtol=0, atol=atol, err_msg=name)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_jaxrec_pallas_method_with_segments(reverse):
  a, b, h0 = _inputs((2, 21, 2, 3), seed=3)
  segment_ids = np.repeat(np.array([[0, 0, 1, 1, 1, 2, 3], [5, 5, 5, 5, 6, 6, 6]]), 3, axis=1)
  kwargs = dict(initial_state=h0, output_final_state=True, reverse=reverse, segment_ids=segment_ids)
  h, last = ops.linear_scan(a, b, method="pallas", **kwargs)
  h_seq, last_seq = ops.linear_scan(a, b, method="sequential", **kwargs)
  atol = linear_scan_atol(a, b, h0, reverse, segment_ids, terms=2 * (2 * 21 + 1))  # two forms
  assert_close(h, h_seq, rtol=0, atol=atol)
  assert_close(last, last_seq, rtol=0, atol=atol[:, 0] if reverse else atol[:, -1])


def test_vmap_and_empty_time():
  a, b, _ = _inputs((3, 2, 9, 4), seed=4)
  h0 = np.random.default_rng(5).normal(size=(3, 2, 4)).astype(np.float32)
  h = jax.vmap(lambda a, b, h0: linear_scan(a, b, h0, interpret=True))(a, b, h0)
  want = np.stack([numpy_linear_scan(a[i], b[i], h0[i], False) for i in range(3)])
  atol = np.stack([linear_scan_atol(a[i], b[i], h0[i], terms=2 * 9 + 1) for i in range(3)])
  assert_close(h, want, rtol=0, atol=atol)
  assert linear_scan(a[0, :, :0], b[0, :, :0], h0[0], interpret=True).shape == (2, 0, 4)


@pytest.mark.parametrize(
  ("a_shape", "b_shape", "h0_shape", "block_t", "match"),
  [
    ((2,), (2,), (2,), None, "a: expected rank >= 2"),
    ((2, 5, 3), (2, 5, 4), (2, 3), None, "b: expected shape"),
    ((2, 5, 3), (2, 5, 3), (2, 5), None, r"h0: expected shape \(2, 3\)"),
    ((2, 5, 3), (2, 5, 3), (2, 3), 0, "block_t: expected a positive int"),
  ],
)
def test_bad_arguments_raise(a_shape, b_shape, h0_shape, block_t, match):
  with pytest.raises(ValueError, match=match):
    linear_scan(jnp.ones(a_shape), jnp.ones(b_shape), jnp.ones(h0_shape), block_t=block_t)


def test_integer_input_raises():
  with pytest.raises(ValueError, match="a: expected a floating dtype"):
    linear_scan(jnp.ones((1, 2, 3), jnp.int32), jnp.ones((1, 2, 3)), jnp.ones((1, 3)))
