"""jaxrec.ops.gla against independent references: a float64 numpy loop over time for values, and
jax.grad of a plain lax.scan (testing_utils.scan_gla) for gradients.

Tolerances follow testing_utils' error model: per element, the same numpy loop over ``|q|, |k|,
|v|, |h0|`` gives the magnitude, ``_chain`` counts the roundings of the form under test, and
``_exponent_terms`` what the chunkwise forms' in-chunk cumulative log-decays add.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from testing_utils import (
  assert_close,
  gla_atols,
  gla_chain,
  gla_exponent_terms,
  gla_gradient_magnitudes,
  gla_gradient_terms,
  gla_magnitudes,
  numpy_gla,
  rounding_atol,
  scan_gla,
)

from jaxrec.ops import gated_linear_attention, gated_linear_attention_step

FORMS = ["sequential", "chunk", "three_pass"]


def _inputs(b, t, h, key_dim, value_dim, scalar, seed=0, decay=(0.01, 1.0)):
  """float32 numpy inputs (numpy, so that building them compiles nothing)."""
  rng = np.random.default_rng(seed)
  q, k = (rng.standard_normal((b, t, h, key_dim), np.float32) for _ in range(2))
  v = rng.standard_normal((b, t, h, value_dim), np.float32)
  g_shape = (b, t, h) if scalar else (b, t, h, key_dim)
  g = -rng.uniform(decay[0], decay[1], g_shape).astype(np.float32)
  h0 = rng.standard_normal((b, h, key_dim, value_dim), np.float32)
  return q, k, v, g, h0


def _segments(b, t, seed=0):
  starts = np.random.default_rng(seed + 11).random((b, t)) < 0.1
  return np.cumsum(starts, axis=1).astype(np.int32)


@functools.cache
def _gla(method, chunk_size=16, with_state=True, scale=None):
  return jax.jit(
    functools.partial(
      gated_linear_attention,
      method=method,
      chunk_size=chunk_size,
      output_final_state=with_state,
      scale=scale,
    )
  )


CASES = {
  # name: (B, T, H, K, V, scalar decay, initial state, segments)
  "channel_h0_ragged": (2, 37, 3, 8, 5, False, True, False),
  "scalar_h0_ragged": (2, 37, 3, 8, 5, True, True, False),
  "T1_H1": (1, 1, 1, 4, 4, False, False, False),
  "scalar_T1": (1, 1, 2, 4, 6, True, True, False),
  "channel_segments": (2, 50, 2, 8, 4, False, True, True),
  "scalar_segments": (2, 50, 2, 8, 4, True, True, True),
  "channel_exact_chunks": (1, 64, 1, 16, 8, False, False, True),
}


@pytest.mark.parametrize("method", FORMS)
@pytest.mark.parametrize("case", CASES)
def test_matches_numpy_reference(method, case):
  b, t, h, key_dim, value_dim, scalar, with_h0, with_seg = CASES[case]
  q, k, v, g, h0 = _inputs(b, t, h, key_dim, value_dim, scalar)
  h0 = h0 if with_h0 else None
  seg = _segments(b, t) if with_seg else None
  o, state = _gla(method)(q, k, v, g, initial_state=h0, segment_ids=seg)
  o_ref, state_ref = numpy_gla(q, k, v, g, h0, seg)
  assert o.dtype == jnp.float32 and state.dtype == jnp.float32
  o_atol, state_atol = gla_atols(
    q,
    k,
    v,
    g,
    h0,
    seg,
    terms=gla_chain(method, t, key_dim),
    exponent_terms=gla_exponent_terms(method, g),
  )
  assert_close(o, o_ref, rtol=0.0, atol=o_atol)
  assert_close(state, state_ref, rtol=0.0, atol=state_atol)


def test_resets_at_chunk_edges_and_scale():
  """Resets on the first and last step of a chunk, two in one chunk, and an explicit scale."""
  q, k, v, g, h0 = _inputs(1, 40, 2, 8, 8, False, seed=3)
  seg = np.zeros((1, 40), np.int32)
  seg[0, 16:] += 1
  seg[0, 31:] += 1
  seg[0, 33:] += 1
  seg[0, 36:] = 0  # an id seen before still starts a new segment
  o_ref, state_ref = numpy_gla(q, k, v, g, h0, seg, scale=0.3)
  for method in FORMS:
    o, state = _gla(method, scale=0.3)(q, k, v, g, initial_state=h0, segment_ids=seg)
    o_atol, state_atol = gla_atols(
      q,
      k,
      v,
      g,
      h0,
      seg,
      0.3,
      terms=gla_chain(method, 40, 8),
      exponent_terms=gla_exponent_terms(method, g),
    )
    assert_close(o, o_ref, rtol=0.0, atol=o_atol)
    assert_close(state, state_ref, rtol=0.0, atol=state_atol)


@pytest.mark.parametrize("scalar", [False, True])
def test_bf16_inputs(scalar):
  q, k, v, g, h0 = (jnp.asarray(x, jnp.bfloat16) for x in _inputs(2, 40, 2, 8, 8, scalar, seed=1))
  exact = [np.asarray(x, np.float32) for x in (q, k, v, g, h0)]  # bf16 values, exactly
  o_ref, state_ref = numpy_gla(*exact)
  for method in FORMS:
    o, state = _gla(method)(q, k, v, g, initial_state=h0)
    assert o.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    # fp32 arithmetic on the bf16 values; the output is rounded to bf16.
    o_atol, state_atol = gla_atols(
      *exact, terms=gla_chain(method, 40, 8), exponent_terms=gla_exponent_terms(method, exact[3])
    )
    o_atol = o_atol + rounding_atol(np.abs(o_ref), terms=1, dtype=jnp.bfloat16)
    if method == "three_pass":
      # bf16 matmul operands: an output term is a product of at most three roundings to bf16
      # (the decayed query or the score, the decayed key, the state); a state term of one (the
      # decayed key).
      (o_mag, _), (state_mag, _) = gla_magnitudes(*exact)
      o_atol = o_atol + rounding_atol(o_mag, terms=3, dtype=jnp.bfloat16)
      state_atol = state_atol + rounding_atol(state_mag, terms=1, dtype=jnp.bfloat16)
    assert_close(o, o_ref, rtol=0.0, atol=o_atol)
    assert_close(state, state_ref, rtol=0.0, atol=state_atol)


@pytest.mark.parametrize("scalar", [False, True])
def test_gradients_match_scan_reference(scalar):
  b, t, h = 2, 37, 2
  q, k, v, g, h0 = _inputs(b, t, h, 8, 4, scalar, seed=2)
  seg = _segments(b, t, seed=2)
  w_o, w_s = (
    np.random.default_rng(7).standard_normal((b, t, h, 4), np.float32),
    np.random.default_rng(8).standard_normal(h0.shape, np.float32),
  )

  def loss(fn, *args):
    o, state = fn(*args)
    return jnp.sum(w_o * o) + jnp.sum(w_s * state)

  argnums = (0, 1, 2, 3, 4)
  ref = jax.jit(jax.grad(lambda *a: loss(lambda *x: scan_gla(*x, seg), *a), argnums))(
    q, k, v, g, h0
  )
  magnitudes = gla_gradient_magnitudes(q, k, v, g, h0, seg, w_o, w_s)
  for method in FORMS:
    fn = lambda *x, m=method: _gla(m)(*x[:4], initial_state=x[4], segment_ids=seg)
    got = jax.jit(jax.grad(lambda *a, f=fn: loss(f, *a), argnums))(q, k, v, g, h0)
    terms = gla_gradient_terms(method, g, 8)
    for name, x, r, m in zip(("q", "k", "v", "log_decay", "initial_state"), got, ref, magnitudes):
      assert np.all(np.isfinite(x)), (method, name)
      assert_close(x, r, rtol=0.0, atol=rounding_atol(m, terms=terms), err_msg=f"{method} {name}")


@pytest.mark.parametrize("method", FORMS)
def test_split_sequence_with_state_passing(method):
  """Two calls with the state handed over equal one pass; the segment live at the cut continues
  into the second call (an initial state feeds the first segment of a call)."""
  q, k, v, g, h0 = _inputs(2, 48, 2, 8, 8, False, seed=4)
  cut = 21
  seg = np.zeros((2, 48), np.int32)
  seg[:, 7:] += 1
  seg[:, 30:] += 1
  seg[1, 12:] += 1
  o, state = _gla(method)(q, k, v, g, initial_state=h0, segment_ids=seg)
  first = (x[:, :cut] for x in (q, k, v, g))
  second = (x[:, cut:] for x in (q, k, v, g))
  o_a, state_a = _gla(method)(*first, initial_state=h0, segment_ids=seg[:, :cut])
  o_b, state_b = _gla(method)(*second, initial_state=state_a, segment_ids=seg[:, cut:])
  # Two computations, neither with a longer chain than one pass.
  o_atol, state_atol = gla_atols(
    q,
    k,
    v,
    g,
    h0,
    seg,
    terms=2 * gla_chain(method, 48, 8),
    exponent_terms=2 * gla_exponent_terms(method, g),
  )
  assert_close(np.concatenate([o_a, o_b], axis=1), o, rtol=0.0, atol=o_atol)
  assert_close(state_b, state, rtol=0.0, atol=state_atol)


@pytest.mark.parametrize("scalar", [False, True])
def test_step_matches_full_sequence(scalar):
  t = 9
  q, k, v, g, h0 = _inputs(2, t, 3, 8, 4, scalar, seed=5)
  o, state = _gla("chunk")(q, k, v, g, initial_state=h0)
  step = jax.jit(gated_linear_attention_step)
  state_t = h0
  outs = []
  for i in range(t):
    o_t, state_t = step(q[:, i], k[:, i], v[:, i], g[:, i], state_t)
    outs.append(o_t)
  assert state_t.dtype == jnp.float32
  o_atol, state_atol = gla_atols(
    q,
    k,
    v,
    g,
    h0,
    terms=gla_chain("chunk", t, 8) + gla_chain("sequential", t, 8),
    exponent_terms=gla_exponent_terms("chunk", g),
  )
  assert_close(np.stack(outs, axis=1), o, rtol=0.0, atol=o_atol)
  assert_close(state_t, state, rtol=0.0, atol=state_atol)


@pytest.mark.parametrize("decay", [(5.0, 30.0), (0.0, 1e-4)], ids=["near_zero", "near_one"])
def test_long_sequence_extreme_decays(decay):
  """T = 65536 in chunks: strong decays must not overflow in the intra-chunk factors, weak ones
  must not lose the long-range state."""
  t = 65536
  q, k, v, g, _ = _inputs(1, t, 1, 16, 16, False, seed=6, decay=decay)
  o, state = _gla("chunk", chunk_size=64, with_state=False)(q, k, v, g)
  assert state is None and np.all(np.isfinite(o))
  o_ref, _ = numpy_gla(q, k, v, g)
  o_atol, _ = gla_atols(
    q,
    k,
    v,
    g,
    terms=gla_chain("chunk", t, 16, 64),
    exponent_terms=gla_exponent_terms("chunk", g, 64),
  )
  assert_close(o, o_ref, rtol=0.0, atol=o_atol)
  # The three-pass form, as the GPU benchmark runs it: chunks of 64, 16-step diagonal blocks.
  o, _ = _gla("three_pass", chunk_size=64, with_state=False)(q, k, v, g)
  assert np.all(np.isfinite(o))
  assert_close(o, o_ref, rtol=0.0, atol=o_atol)


@settings(max_examples=8, deadline=None)
@given(
  starts=st.lists(st.booleans(), min_size=24, max_size=24),
  strength=st.sampled_from([1e-3, 0.3, 3.0, 40.0]),
  seed=st.integers(0, 2**16),
)
def test_random_resets_and_decay_strengths(starts, strength, seed):
  """One shape (one compile): random segment layouts and decay scales against numpy."""
  q, k, v, g, h0 = _inputs(1, 24, 2, 8, 4, False, seed=seed, decay=(0.0, strength))
  seg = np.cumsum(np.asarray(starts, np.int32))[None]
  o, state = _gla("chunk", chunk_size=8)(q, k, v, g, initial_state=h0, segment_ids=seg)
  o_ref, state_ref = numpy_gla(q, k, v, g, h0, seg)
  o_atol, state_atol = gla_atols(
    q,
    k,
    v,
    g,
    h0,
    seg,
    terms=gla_chain("chunk", 24, 8, 8),
    exponent_terms=gla_exponent_terms("chunk", g, 8),
  )
  assert_close(o, o_ref, rtol=0.0, atol=o_atol)
  assert_close(state, state_ref, rtol=0.0, atol=state_atol)


@functools.cache
def _values_and_grads(method, chunk_size):
  """``(o, state, grads of Σ w_o o + Σ w_s state w.r.t. q, k, v, log_decay, initial_state)``
  of ``gated_linear_attention`` in one compiled function."""

  def run(q, k, v, g, h0, seg, w_o, w_s):
    def fn(q, k, v, g, h0):
      return gated_linear_attention(
        q,
        k,
        v,
        g,
        initial_state=h0,
        output_final_state=True,
        segment_ids=seg,
        chunk_size=chunk_size,
        method=method,
      )

    (o, state), vjp = jax.vjp(fn, q, k, v, g, h0)
    return o, state, vjp((w_o, w_s))

  return jax.jit(run)


@pytest.mark.parametrize("chunk_size", [4, 32])
def test_three_pass_strong_decays_and_block_sizes(chunk_size):
  """The three-pass form's own structure: diagonal blocks of 1 step (levels only, C = 4) and of
  8 steps under two levels (C = 32), with weak and strong decays (its backward pass leaves out
  the exponent-0 terms so that ``dg ~ e^g`` survives them): values against numpy, gradients
  against autodiff of the scan; ragged T (padding in front of the first chunk), segments, an
  initial state."""
  b, t, h = 2, 50, 2
  seg = _segments(b, t, seed=9)
  fn = _values_and_grads("three_pass", chunk_size)
  for decay in ((0.01, 1.0), (5.0, 30.0)):
    q, k, v, g, h0 = _inputs(b, t, h, 8, 4, False, seed=9, decay=decay)
    rng = np.random.default_rng(10)
    w_o, w_s = rng.standard_normal((b, t, h, 4), np.float32), rng.standard_normal(h0.shape)
    w_s = w_s.astype(np.float32)
    o, state, grads = fn(q, k, v, g, h0, seg, w_o, w_s)
    o_ref, state_ref = numpy_gla(q, k, v, g, h0, seg)
    o_atol, state_atol = gla_atols(
      q,
      k,
      v,
      g,
      h0,
      seg,
      terms=gla_chain("three_pass", t, 8, chunk_size),
      exponent_terms=gla_exponent_terms("three_pass", g, chunk_size),
    )
    assert_close(o, o_ref, rtol=0.0, atol=o_atol)
    assert_close(state, state_ref, rtol=0.0, atol=state_atol)
    ref = jax.vjp(lambda *a: scan_gla(*a, seg), q, k, v, g, h0)[1]((w_o, w_s))
    magnitudes = gla_gradient_magnitudes(q, k, v, g, h0, seg, w_o, w_s)
    terms = gla_gradient_terms("three_pass", g, 8, chunk_size)
    for name, x, r, m in zip(("q", "k", "v", "log_decay", "initial_state"), grads, ref, magnitudes):
      assert np.all(np.isfinite(x)), (decay, name)
      atol = rounding_atol(m, terms=terms)
      assert_close(x, r, rtol=0.0, atol=atol, err_msg=f"{decay} {name}")


def _bad(**overrides):
  b, t, h, key_dim, value_dim = 2, 5, 3, 4, 6
  args = {
    "q": np.zeros((b, t, h, key_dim)),
    "k": np.zeros((b, t, h, key_dim)),
    "v": np.zeros((b, t, h, value_dim)),
    "log_decay": np.zeros((b, t, h)),
  }
  args.update({k: v for k, v in overrides.items() if k in args})
  kwargs = {k: v for k, v in overrides.items() if k not in args}
  return args, kwargs


@pytest.mark.parametrize(
  "overrides,match",
  [
    ({"q": np.zeros((2, 5, 4))}, r"q: expected rank 4 \[B, T, H, K\], got shape \(2, 5, 4\)"),
    ({"k": np.zeros((2, 5, 3, 5))}, r"k: expected shape \(2, 5, 3, 4\)"),
    ({"v": np.zeros((2, 4, 3, 6))}, r"v: expected shape \(2, 5, 3, 6\)"),
    ({"v": np.zeros((2, 5, 3))}, r"v: expected rank 4"),
    ({"log_decay": np.zeros((2, 5, 3, 6))}, r"log_decay: expected shape \(2, 5, 3, 4\) or"),
    ({"log_decay": np.zeros((2, 5))}, r"log_decay: .*got \(2, 5\)"),
    ({"q": np.zeros((2, 5, 3, 4), np.int32)}, r"q: expected a floating dtype, got int32"),
    ({"log_decay": np.zeros((2, 5, 3), np.int32)}, r"log_decay: expected a floating dtype"),
    ({"method": "fast"}, r"method: expected one of .*got 'fast'"),
    ({"chunk_size": 0}, r"chunk_size: expected a positive power of two, got 0"),
    ({"chunk_size": 48}, r"chunk_size: .*got 48"),
    ({"chunk_size": 16.0}, r"chunk_size: .*got 16.0"),
    ({"initial_state": np.zeros((2, 3, 6, 4))}, r"initial_state: expected shape \(2, 3, 4, 6\)"),
    ({"segment_ids": np.zeros((2, 4), np.int32)}, r"segment_ids: expected shape \(2, 5\)"),
    ({"segment_ids": np.zeros((2, 5))}, r"segment_ids: expected an integer dtype"),
  ],
)
def test_validation_errors(overrides, match):
  args, kwargs = _bad(**overrides)
  with pytest.raises(ValueError, match=match):
    gated_linear_attention(**args, **kwargs)


@pytest.mark.parametrize(
  "bad,match",
  [
    ({"state": np.zeros((2, 3, 4, 5))}, r"state: expected shape \(2, 3, 4, 6\) \[B, H, K, V\]"),
    ({"q": np.zeros((2, 1, 3, 4))}, r"q: expected rank 3 \[B, H, K\]"),
    ({"log_decay": np.zeros((2, 3, 6))}, r"log_decay: expected shape \(2, 3, 4\) or \(2, 3\)"),
    ({"k": np.zeros((2, 3, 4), np.int8)}, r"k: expected a floating dtype, got int8"),
  ],
)
def test_step_validation_errors(bad, match):
  args = {
    "q": np.zeros((2, 3, 4)),
    "k": np.zeros((2, 3, 4)),
    "v": np.zeros((2, 3, 6)),
    "log_decay": np.zeros((2, 3)),
    "state": np.zeros((2, 3, 4, 6)),
  }
  args.update(bad)
  with pytest.raises(ValueError, match=match):
    gated_linear_attention_step(**args)
