"""jaxrec.ops.linear_scan against independent references (testing_utils): a float64 numpy loop
for values, and jax.grad of a plain lax.scan (no custom_vjp) for gradients.

Tolerances (testing_utils' error model): every form's longest chain takes two roundings a step
(a multiply and an add, or a product of decays and an add), against per-element magnitudes of
the same scan over absolute values."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from testing_utils import (
  assert_close,
  lax_linear_scan,
  linear_scan_atol,
  linear_scan_gradient_magnitudes,
  numpy_linear_scan,
  rounding_atol,
)

from jaxrec.ops import linear_scan

METHODS = ["sequential", "associative", "chunk", "pallas"]


def _lax_scan_loss(a, b, h0, reverse, segment_ids, w_h, w_last):
  """Autodiff reference: sum(w_h * h) + sum(w_last * h_last) with a plain lax.scan."""
  h, h_last = lax_linear_scan(a, b, h0, reverse, segment_ids)
  return jnp.sum(w_h * h) + jnp.sum(w_last * h_last)


def _inputs(shape, seed=0, dtype=jnp.float32):
  ka, kb, kh, kw, kl = jax.random.split(jax.random.key(seed), 5)
  a = jax.random.uniform(ka, shape, minval=0.3, maxval=1.0).astype(dtype)
  b = jax.random.normal(kb, shape).astype(dtype)
  h0 = jax.random.normal(kh, (shape[0], *shape[2:]))
  w_h = jax.random.normal(kw, shape)
  w_last = jax.random.normal(kl, h0.shape)
  return a, b, h0, w_h, w_last


def _segments(batch, t, seed=0):
  starts = jax.random.bernoulli(jax.random.key(seed + 7), 0.15, (batch, t))
  return jnp.cumsum(starts, axis=1).astype(jnp.int32)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
  "shape,reverse,with_h0,with_segments",
  [
    ((2, 1, 3), False, True, False),  # T = 1
    ((1, 37, 4), False, True, True),  # T not a multiple of any chunk, packed
    ((2, 37, 2, 3), True, True, True),  # reverse, two feature axes
    ((3, 50), False, False, False),  # no feature axes, zero initial state
  ],
)
def test_forward_and_gradients_match_reference(method, shape, reverse, with_h0, with_segments):
  a, b, h0, w_h, w_last = _inputs(shape)
  h0 = h0 if with_h0 else jnp.zeros_like(h0)
  seg = _segments(shape[0], shape[1]) if with_segments else None
  kwargs = dict(reverse=reverse, segment_ids=seg, method=method, chunk_size=8)

  h, h_last = linear_scan(
    a, b, initial_state=h0 if with_h0 else None, output_final_state=True, **kwargs
  )
  expected = numpy_linear_scan(a, b, h0, reverse, seg)
  steps = shape[1]
  atol = linear_scan_atol(a, b, h0, reverse, seg, terms=2 * steps + 1)
  assert_close(h, expected, rtol=0, atol=atol)
  last = (lambda x: x[:, 0]) if reverse else (lambda x: x[:, -1])
  assert_close(h_last, last(expected), rtol=0, atol=last(atol))
  assert h.dtype == jnp.float32 and h_last.dtype == jnp.float32

  def loss(a, b, h0):
    h, h_last = linear_scan(a, b, initial_state=h0, output_final_state=True, **kwargs)
    return jnp.sum(w_h * h) + jnp.sum(w_last * h_last)

  grads = jax.grad(loss, argnums=(0, 1, 2))(a, b, h0)
  ref_grads = jax.grad(_lax_scan_loss, argnums=(0, 1, 2))(a, b, h0, reverse, seg, w_h, w_last)
  magnitudes = linear_scan_gradient_magnitudes(a, b, h0, w_h, w_last, reverse, seg)
  # Two computations, each a forward and a backward scan.
  terms = 4 * (2 * steps + 1)
  for name, g, r, m in zip(["a", "b", "h0"], grads, ref_grads, magnitudes, strict=True):
    assert_close(g, r, rtol=0, atol=rounding_atol(m, terms=terms), err_msg=f"d{name} ({method})")


@pytest.mark.parametrize("method", METHODS)
def test_bf16_inputs(method):
  a, b, h0, _, _ = _inputs((2, 40, 8), dtype=jnp.bfloat16)
  h, h_last = linear_scan(
    a, b, initial_state=h0, output_final_state=True, method=method, chunk_size=8
  )
  assert h.dtype == jnp.bfloat16 and h_last.dtype == jnp.float32
  # fp32 arithmetic on the bf16 values; the output rounded to bf16.
  want = numpy_linear_scan(a, b, h0)
  atol = linear_scan_atol(a, b, h0, terms=2 * 40 + 1)
  atol = atol + rounding_atol(np.abs(want), terms=1, dtype=jnp.bfloat16)
  assert_close(h, want, rtol=0, atol=atol)


@pytest.mark.parametrize("method", ["chunk"])
def test_split_sequence_with_state_handover_equals_one_pass(method):
  a, b, h0, _, _ = _inputs((2, 45, 3))
  scan = functools.partial(linear_scan, output_final_state=True, method=method)
  full, full_last = scan(a, b, initial_state=h0)
  first, mid = scan(a[:, :20], b[:, :20], initial_state=h0)
  second, last = scan(a[:, 20:], b[:, 20:], initial_state=mid)
  atol = linear_scan_atol(a, b, h0, terms=2 * (2 * 45 + 1))  # two computations
  assert_close(jnp.concatenate([first, second], axis=1), full, rtol=0, atol=atol)
  assert_close(last, full_last, rtol=0, atol=atol[:, -1])


@settings(max_examples=5, deadline=None)
@given(
  batch=st.integers(1, 3),
  t=st.integers(1, 70),
  width=st.integers(1, 5),
  chunk=st.sampled_from([1, 4, 16, 128]),
  reverse=st.booleans(),
)
def test_chunk_matches_reference_over_random_shapes(batch, t, width, chunk, reverse):
  a, b, h0, _, _ = _inputs((batch, t, width), seed=t)
  h, _ = linear_scan(a, b, initial_state=h0, reverse=reverse, method="chunk", chunk_size=chunk)
  atol = linear_scan_atol(a, b, h0, reverse, terms=2 * t + 1)
  assert_close(h, numpy_linear_scan(a, b, h0, reverse), rtol=0, atol=atol)


def test_auto_matches_sequential():
  a, b, h0, _, _ = _inputs((2, 33, 4))
  h_auto, _ = linear_scan(a, b, initial_state=h0)
  h_seq, _ = linear_scan(a, b, initial_state=h0, method="sequential")
  assert_close(h_auto, h_seq, rtol=0, atol=linear_scan_atol(a, b, h0, terms=2 * (2 * 33 + 1)))


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(b=jnp.ones((2, 5, 4))), r"b: expected shape \(2, 5, 3\)"),
    (dict(a=jnp.ones((2,)), b=jnp.ones((2,))), r"a: expected rank >= 2"),
    (dict(a=jnp.ones((2, 5, 3), jnp.int32)), r"a: expected a floating dtype, got int32"),
    (dict(initial_state=jnp.ones((2, 4))), r"initial_state: expected shape \(2, 3\)"),
    (dict(segment_ids=jnp.zeros((2, 4), jnp.int32)), r"segment_ids: expected shape \(2, 5\)"),
    (dict(segment_ids=jnp.zeros((2, 5))), r"segment_ids: expected an integer dtype"),
    (dict(method="magic"), r"method: expected one of .*got 'magic'"),
    (dict(chunk_size=0), r"chunk_size: expected a positive int, got 0"),
  ],
)
def test_bad_input_names_the_argument(kwargs, match):
  args = dict(a=jnp.ones((2, 5, 3)), b=jnp.ones((2, 5, 3)))
  args.update(kwargs)
  a, b = args.pop("a"), args.pop("b")
  with pytest.raises(ValueError, match=match):
    linear_scan(a, b, **args)


def test_final_state_only_when_asked():
  a, b, h0, _, _ = _inputs((2, 9, 3))
  h, final = linear_scan(a, b, initial_state=h0, method="sequential")
  assert final is None and h.shape == a.shape
