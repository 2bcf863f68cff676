"""jaxrec.ops.linear_scan against independent references: a float64 numpy loop for values, and
jax.grad of a plain lax.scan (written here, no custom_vjp) for gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrec.ops import linear_scan

METHODS = ["sequential", "associative", "chunk", "pallas"]


def _numpy_scan(a, b, h0, reverse=False, segment_ids=None):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  h = np.asarray(h0, np.float64).copy()
  out = np.zeros_like(b)
  steps = range(a.shape[1] - 1, -1, -1) if reverse else range(a.shape[1])
  prev = None
  for t in steps:
    at = a[:, t].copy()
    if segment_ids is not None and prev is not None:
      new = np.asarray(segment_ids)[:, t] != np.asarray(segment_ids)[:, prev]
      at[new] = 0.0
    h = at * h + b[:, t]
    out[:, t] = h
    prev = t
  return out


def _lax_scan_loss(a, b, h0, reverse, segment_ids, w_h, w_last):
  """Autodiff reference: sum(w_h * h) + sum(w_last * h_last) with a plain lax.scan."""
  if segment_ids is not None:
    if reverse:
      reset = jnp.pad(segment_ids[:, :-1] != segment_ids[:, 1:], ((0, 0), (0, 1)))
    else:
      reset = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))
    a = jnp.where(reset.reshape(reset.shape + (1,) * (a.ndim - 2)), 0.0, a)

  def step(h, ab):
    h = ab[0] * h + ab[1]
    return h, h

  h_last, h = jax.lax.scan(
    step, h0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)), reverse=reverse
  )
  return jnp.sum(w_h * jnp.moveaxis(h, 0, 1)) + jnp.sum(w_last * h_last)


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


def _assert_close(x, y, rtol):
  np.testing.assert_allclose(
    np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=rtol
  )


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

  h, h_last = linear_scan(a, b, initial_state=h0 if with_h0 else None, **kwargs)
  expected = _numpy_scan(a, b, h0, reverse, seg)
  _assert_close(h, expected, 1e-5)
  _assert_close(h_last, expected[:, 0] if reverse else expected[:, -1], 1e-5)
  assert h.dtype == jnp.float32 and h_last.dtype == jnp.float32

  def loss(a, b, h0):
    h, h_last = linear_scan(a, b, initial_state=h0, **kwargs)
    return jnp.sum(w_h * h) + jnp.sum(w_last * h_last)

  grads = jax.grad(loss, argnums=(0, 1, 2))(a, b, h0)
  ref_grads = jax.grad(_lax_scan_loss, argnums=(0, 1, 2))(a, b, h0, reverse, seg, w_h, w_last)
  for name, g, r in zip(["a", "b", "h0"], grads, ref_grads, strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=f"d{name} ({method})")


@pytest.mark.parametrize("method", METHODS)
def test_bf16_inputs(method):
  a, b, h0, _, _ = _inputs((2, 40, 8), dtype=jnp.bfloat16)
  h, h_last = linear_scan(a, b, initial_state=h0, method=method, chunk_size=8)
  assert h.dtype == jnp.bfloat16 and h_last.dtype == jnp.float32
  _assert_close(h, _numpy_scan(a, b, h0), 1e-2)


@pytest.mark.parametrize("method", ["chunk"])
def test_split_sequence_with_state_handover_equals_one_pass(method):
  a, b, h0, _, _ = _inputs((2, 45, 3))
  full, full_last = linear_scan(a, b, initial_state=h0, method=method)
  first, mid = linear_scan(a[:, :20], b[:, :20], initial_state=h0, method=method)
  second, last = linear_scan(a[:, 20:], b[:, 20:], initial_state=mid, method=method)
  _assert_close(jnp.concatenate([first, second], axis=1), full, 1e-6)
  _assert_close(last, full_last, 1e-6)


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
  _assert_close(h, _numpy_scan(a, b, h0, reverse), 1e-5)


def test_auto_matches_sequential():
  a, b, h0, _, _ = _inputs((2, 33, 4))
  h_auto, _ = linear_scan(a, b, initial_state=h0)
  h_seq, _ = linear_scan(a, b, initial_state=h0, method="sequential")
  _assert_close(h_auto, h_seq, 1e-5)


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
